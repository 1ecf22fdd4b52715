"""``InfluenceDataSelector``: online data selection with a K-step look-ahead, as a Lightning callback.

At every window boundary of its :class:`~lightning_influence.InfluenceTracker` (K = the window's length in
optimizer steps) it receives the window's scores on one registered query, as a window sink of the tracker
(:meth:`~lightning_influence.InfluenceTracker.add_window_sink`), and removes the most harmful samples
from training for the rest of the run (:class:`~lightning_influence.results.selection.SelectionPolicy` decides,
:class:`~lightning_influence.ExcludeSamples` removes). The tracker stays exact for the run that really
happened: a removed sample's rows are no longer in the batches it books, and its state keeps evolving
(the Jacobians act on it), so it keeps its scores and later windows.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping

import lightning.pytorch as pl
import torch
from typing_extensions import override

from lightning_influence.callbacks import trainer_probe as lit
from lightning_influence.callbacks.exclusion import ExcludeSamples, FilterBatchFn
from lightning_influence.callbacks.tracker import InfluenceTracker
from lightning_influence.errors import InfluenceConfigurationError
from lightning_influence.io.selection import SelectionWriter
from lightning_influence.reporting.selection import log_decision
from lightning_influence.results.selection import SelectionDecision, SelectionPolicy
from lightning_influence.results.windows import WindowRecorder, WindowSnapshot

MODES = ("remove",)
RANKINGS = ("window", "cumulative")


class InfluenceDataSelector(ExcludeSamples):
    """Remove harmful training samples at every window boundary of ``tracker``, on ``query``.

    Pass both to the Trainer, in any order: ``Trainer(callbacks=[tracker, selector])``.

    Args:
        tracker: the :class:`~lightning_influence.InfluenceTracker`, with ``query`` registered and windows set
            (``window_every_n_steps`` or ``window_every_n_epochs``: the look-ahead K).
        query: the registered query whose window scores decide.
        fraction: at most ``ceil(fraction × k)`` samples removed per window (k = tracked samples), most harmful
            first; None: ``threshold`` alone decides.
        threshold: only samples whose window score is ≤ −threshold are removed (None: any negative score).
        max_fraction: at most ``floor(max_fraction × k)`` samples removed over the run.
        mode: ``"remove"``: the samples' rows are dropped from every later training batch (see
            :class:`~lightning_influence.ExcludeSamples`).
        by: ``"window"``: rank by the window's scores W_j (what the last K steps did; the DIT view);
            ``"cumulative"``: by the influence accumulated since the start of the run, I_j(end of the window).
        filter_batch: how to drop rows from a batch (default: every tensor with B rows is indexed).
        dirpath: where ``selection.jsonl`` goes (default: the tracker's artifact folder; None without one).
        log_top_k: rows of the TensorBoard table of removed ids.

    After (or during) fit: ``removed`` (``LongTensor``, in removal order) and ``decisions``
    (:class:`~lightning_influence.results.selection.SelectionDecision` per window).
    """

    def __init__(
        self,
        tracker: Any,
        query: str = "val",
        fraction: float | None = 0.02,
        threshold: float | None = None,
        max_fraction: float = 0.1,
        mode: Literal["remove"] = "remove",
        by: Literal["window", "cumulative"] = "window",
        filter_batch: FilterBatchFn | None = None,
        dirpath: Any = None,
        log_top_k: int = 20,
    ) -> None:
        if not isinstance(tracker, InfluenceTracker):
            raise TypeError(f"tracker must be an InfluenceTracker, got {type(tracker).__name__}.")
        if mode not in MODES:
            raise ValueError(
                f"mode={mode!r} is not supported; modes: {MODES}. Down-weighting would need per-sample loss weights"
                " in your training_step and in the tracker's loss model, which lightning-influence does not model yet."
            )
        if by not in RANKINGS:
            raise ValueError(f"by={by!r}: use one of {RANKINGS}.")
        if query not in tracker.config.queries:
            raise ValueError(
                f"query={query!r} is not registered with the tracker (registered: {sorted(tracker.config.queries)})."
                " Register it: InfluenceTracker(queries={'" + str(query) + "': val_batch_or_loader}, ...)."
            )
        if tracker.config.window_every_n_steps is None and tracker.config.window_every_n_epochs is None:
            raise ValueError(
                "The tracker has no windows, so the whole run is one window and the selector never acts. Pass"
                " window_every_n_epochs=K or window_every_n_steps=K to InfluenceTracker (K = the look-ahead)."
            )
        super().__init__(sample_ids=tracker.config.sample_ids, filter_batch=filter_batch)
        self.tracker, self.query, self.mode, self.by = tracker, query, mode, by
        self.policy = SelectionPolicy(fraction, threshold, max_fraction)
        self.dirpath, self.log_top_k = dirpath, log_top_k
        self.decisions: list[SelectionDecision] = []
        self._windows_seen = 0
        self._restored: dict[str, Any] | None = None
        self._writer: SelectionWriter | None = None
        self._loggers: list = []
        self._last_step: int | None = None  # the fit's last optimizer step: a window ending there changes nothing
        self._started = False  # on_train_start ran: windows are acted on as they close

    acts_on_every_sample = True
    """The tracker's default path (``track="auto"``) then tracks every sample forward: the selector acts on every
    sample's windows while training."""

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(query=self.query, by=self.by, tracker=self.tracker.state_key)

    # ------------------------------------------------------------------ lifecycle
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if all(c is not self.tracker for c in lit.trainer_callbacks(trainer)):
            raise InfluenceConfigurationError(
                "The selector's tracker is not among the Trainer's callbacks: pass both,"
                " Trainer(callbacks=[tracker, selector])."
            )
        self.tracker.add_window_sink(self)
        self._restored, self._started = None, False

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        restored, self._restored = self._restored, None
        continued = len(self.tracker.windows(self.query)) >= max(self._windows_seen, 1)  # the tracker went on
        if restored is not None:
            self._load(restored)
        elif not continued or trainer.global_step == 0:
            self._reset()  # a fresh run: nothing removed yet
            self.decisions, self._windows_seen = [], 0
        self._loggers = list(trainer.loggers) if trainer.is_global_zero else []
        self._last_step = lit.expected_steps(trainer)
        dirpath = self.dirpath if self.dirpath is not None else self.tracker.artifact_dir
        self._writer = None
        if dirpath is not None and trainer.is_global_zero and self.tracker.config.write_artifacts:
            self._writer = SelectionWriter(dirpath)
            self._writer.start(len(self.decisions) if self.decisions or restored is not None else None)
        self._started = True
        self._act()  # windows the tracker closed at the start of a resumed or continued fit, if it started first

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._started = False

    # ------------------------------------------------------------------ the tracker's window sink
    def window(self, snapshot: WindowSnapshot, recorder: WindowRecorder) -> None:
        """A window of the tracker closed: decide on it now, so that its removals apply from the next batch."""
        if self._started and snapshot.query == self.query:
            self._act()

    def final(self, results: Mapping[str, Any], metadata: Mapping[str, Any]) -> None:
        """The end of fit: nothing left to remove samples from."""

    # ------------------------------------------------------------------ decisions
    def _act(self) -> None:
        """Decide on every window of the query closed since the last call (usually none or one)."""
        snapshots = self.tracker.windows(self.query)
        for position in range(self._windows_seen, len(snapshots)):
            snapshot = snapshots[position]
            if self._last_step is not None and snapshot.end_step >= self._last_step:
                break  # the run ends there: nothing left to remove the samples from
            chosen = snapshots[position : position + 1] if self.by == "window" else snapshots[: position + 1]
            scores = torch.stack([w.scores.detach().cpu().to(torch.float64) for w in chosen]).sum(0)  # telescoping
            rows = self.policy.choose(scores, torch.isin(snapshot.sample_ids, self.removed))
            ids = snapshot.sample_ids[rows]
            self.exclude(ids)
            decision = SelectionDecision(
                self.query, snapshot.index, snapshot.start_step, snapshot.end_step, snapshot.epoch,
                ids.clone(), scores[rows], len(self._order),
            )  # fmt: skip
            self.decisions.append(decision)
            self._report(decision)
        self._windows_seen = len(snapshots)

    def _report(self, decision: SelectionDecision) -> None:
        if self._loggers:
            step = max(decision.end_step - 1, 0)  # the window's last step, where its influence is logged
            log_decision(self._loggers, decision, self.tracker.namespace, step, self.log_top_k)
        if self._writer is not None:
            self._writer.write(decision)

    # ------------------------------------------------------------------ checkpoints
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "removed": self.removed,
            "decisions": [d.to_record() for d in self.decisions],
            "windows_seen": self._windows_seen,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("version") != 1:
            raise ValueError(f"Unknown InfluenceDataSelector checkpoint state version {state_dict.get('version')!r}.")
        self._restored = state_dict  # applied at train start, with the tracker's own state

    def _load(self, state: dict[str, Any]) -> None:
        self._reset(state["removed"].tolist())
        self.decisions = [SelectionDecision.from_record(r) for r in state["decisions"]]
        self._windows_seen = int(state["windows_seen"])
