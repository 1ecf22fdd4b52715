"""The tracker's answers after (or during) a fit: influence on any query, windows, patterns, bookkeeping.

:class:`TrackerAnswers` reads one :class:`~lightning_influence.core.fit.TrackedFit` (the current or last fit)
and the configuration; the Lightning callback inherits it. Sign of every score: f(θ_-j) − f(θ),
negative = harmful. Nothing here knows Lightning.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, cast

import torch
from torch.utils.data import default_collate

from lightning_influence.core.config import TrackerConfig
from lightning_influence.core.fit import TrackedFit
from lightning_influence.estimators.base import Estimator
from lightning_influence.estimators.engine import InfluenceEngine
from lightning_influence.estimators.tracin import TracInAccumulator
from lightning_influence.results.audit import AuditReport
from lightning_influence.results.patterns import InfluencePatterns, classify_patterns
from lightning_influence.results.result import COUNTERFACTUAL, IN_RUN, InfluenceResult
from lightning_influence.results.windows import WindowSnapshot
from lightning_influence.trajectory.reader import load_trajectory
from lightning_influence.trajectory.replay import TrajectoryReplay
from lightning_influence.trajectory.shards import ReplayShard


class TrackerAnswers:
    """Query methods over ``self._fit`` (a :class:`TrackedFit` or None) and ``self.config``."""

    config: TrackerConfig
    _fit: TrackedFit | None

    def __getattr__(self, name: str) -> Any:
        # the constructor's arguments read back as given (tracker.estimator, tracker.queries, tracker.params)
        config = self.__dict__.get("config")
        if config is not None and name in TrackerConfig.__dataclass_fields__:
            return getattr(config, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def _finished(self) -> TrackedFit:
        fit = self._fit
        if fit is None or fit.final is None:
            why = "" if fit is None or fit.state.broken is None else f" (the last fit failed: {fit.state.broken})"
            raise RuntimeError(f"influence() is available after trainer.fit(...) has run with this tracker{why}.")
        return fit

    def _check_registered(self, query: str) -> None:
        if query not in self.config.queries:
            raise KeyError(f"No registered query named {query!r}; registered: {sorted(self.config.queries)}.")

    def _forward_tracked(self, fit: TrackedFit | None, call: str, instead: str) -> None:
        """Refuse a forward-state answer of a record-only fit (``track=()``): it would be empty, or all zeros."""
        if fit is not None and fit.tracked_ids.numel() == 0:
            raise ValueError(f"nothing is forward-tracked (track=()): {call} would be empty; {instead}")

    @staticmethod
    def _every_sample_by_default(fit: TrackedFit | None, query: Any = None) -> bool:
        """What ``all_samples=None`` means: the replay after a recorded fit with nothing forward-tracked
        (``track=()``), or on the default path (``track="auto"`` recorded the run, a few samples live) for a
        registered query (``query`` a name, or None: self-influence); the forward states otherwise (``track=ids``)."""
        if fit is None or fit.final is None or fit.parts.recorder is None:
            return False
        if fit.tracked_ids.numel() == 0:
            return True
        return fit.context.answers_by_replay and (query is None or isinstance(query, str))

    def replay_registered(self) -> dict[str, list[WindowSnapshot]]:
        """Every registered query's windows over every sample, by one adjoint replay of the recorded run for all of
        them (then read back: the windows and the final scores of ``influence(name)``, ``windows(name)``); what the
        default path runs at the end of fit. ``{name: [WindowSnapshot, ...]}``."""
        fit = self._finished()
        cache = self._replay_cache(fit)
        names = [n for n in self.config.queries if ("windows", n, False) not in cache]
        if names:
            ends = sorted({w.end_step for n in names for w in fit.windows(n)}) or None
            found = self._count_replay().all_windows({n: fit.parts.queries.resolve(n) for n in names}, ends)
            for name, snapshots in found.items():
                cache[("windows", name, False)] = snapshots
                cache.setdefault(("influence", name, False), _final_scores(snapshots))
        return {n: cache[("windows", n, False)] for n in self.config.queries}

    def _replay_cache(self, fit: TrackedFit) -> dict[tuple[str, str, bool], Any]:
        """The all-sample answers of registered queries already replayed in ``fit`` (a new fit starts afresh)."""
        held = self.__dict__.get("_replayed")
        if held is None or held[0] is not fit:
            held = (fit, {})
            self.__dict__["_replayed"] = held
        return cast("dict[tuple[str, str, bool], Any]", held[1])

    @property
    def replays(self) -> int:
        """How many replays the ``all_samples=True`` answers of this tracker have run (all fits together).
        The answer of a registered query, and the in-run :meth:`self_influence`, is replayed once per fit and read
        back afterwards: a repeated ``influence(name, all_samples=True)``, ``windows(name, all_samples=True)`` or
        ``self_influence(all_samples=True)`` leaves this count unchanged."""
        return int(self.__dict__.get("_replays", 0))

    def _count_replay(self) -> TrajectoryReplay:
        replay = self.replay()
        self.__dict__["_replays"] = self.replays + 1
        return replay

    def influence(self, query: Any, per_example: bool = False, all_samples: bool | None = None) -> InfluenceResult:
        """Influence of every tracked training sample on ``query``.

        Args:
            query: a batch or a DataLoader (f = mean per-sample loss over it), a callable
                ``f(pl_module) -> scalar``, or the name of a registered query.
            per_example: also return ``per_example: Tensor[k, n]``, the scores on each query example.
            all_samples: score every training sample that took part in a booked step, by an adjoint replay
                of the recorded trajectory (``record_trajectory=True``); always the ``"first-order"`` numbers.
                The answer of a registered query is replayed once per fit (keyed by name and ``per_example``)
                and read back afterwards (:attr:`replays` counts the replays); any other query replays each time.
                None (default): every sample on the default path (``track="auto"`` recorded the run) for a
                registered query, or when nothing is forward-tracked (``track=()``); the forward-tracked samples
                otherwise (``track=ids``). False: the forward-tracked samples. After a fit on several processes
                (DDP) a replay is shared by them: ask on every process (on the default path a registered query's
                answer, replayed at the end of fit, is read back on any one).

        Raises:
            ValueError: without ``all_samples`` when nothing is forward-tracked (``track=()``, recording only).

        Returns:
            :class:`InfluenceResult` with ``scores[j]`` ≈ f(θ_-j(T)) − f(θ(T)): negative = harmful.
            "Harmful" reads f as a loss (lower is better): for a callable such as a logit or an
            accuracy proxy, where higher is better, negate it (``lambda m: -m(x)[0, c]``).
        """
        if isinstance(query, str):
            self._check_registered(query)
        fit = self._finished()
        if all_samples is None:
            all_samples = self._every_sample_by_default(fit, query)
        if all_samples:
            if not isinstance(query, str):
                return self._count_replay().influence(fit.parts.queries.resolve(query), per_example)
            cache, key = self._replay_cache(fit), ("influence", query, per_example)
            if key not in cache and not per_example:
                self.replay_registered()  # every registered query in one sweep, windows and final scores
            if key not in cache:
                cache[key] = self._count_replay().influence(fit.parts.queries.resolve(query), per_example)
            held: InfluenceResult = cache[key]
            per = None if held.per_example is None else held.per_example.clone()
            return dataclasses.replace(held, sample_ids=held.sample_ids.clone(), scores=held.scores.clone(),
                                       per_example=per)  # fmt: skip
        name = repr(query) if isinstance(query, str) else "query"
        self._forward_tracked(
            fit,
            "influence() without all_samples=True",
            f"ask influence({name}, all_samples=True) for every sample's scores from the recorded trajectory.",
        )
        if per_example and isinstance(fit.estimator, TracInAccumulator):  # the per-example sums kept during training
            per = fit.estimator.answer_registered(query, per_example=True).detach().cpu().clone()
            mean = fit.estimator.answer_registered(query).detach().cpu().clone()
            return InfluenceResult(fit.tracked_ids.clone(), mean, per, self.config.estimator)
        return fit.influence(query, per_example)

    def self_influence(self, chunk_size: int = 64, all_samples: bool | None = None) -> InfluenceResult:
        """Each sample's influence on its own loss; ``result.definition`` says which of two ([concepts.md:
        Self-influence of every sample]):

        - ``"counterfactual"`` (forward-tracked samples, the default when some are tracked): ℓ_j(θ_-j(T)) −
          ℓ_j(θ(T)), predicted as ⟨∇ℓ_j(θ_T), δθ_j(T)⟩ (with ``"exact"``: the difference itself); the samples are
          read back from the training set by id, ``chunk_size`` at a time. Not with ``"tracin"`` (no states).
        - ``"in-run"`` (``all_samples=True``; by default (None) on the default path, ``track="auto"`` having
          recorded the run, and with ``track=()``; needs a recorded run): every sample id of the training set,
          s_j = Σ_t Σ_{m∋j} (η_t w_m/|B_m|) ⟨∇ℓ_j(θ_t), P_t ∇ℓ_j(θ_t)⟩ with P_t the optimizer's preconditioner at
          step t (a sample no step consumed scores 0), by one forward replay of the recorded trajectory
          (``chunk_size`` rows per per-sample-gradient call), once per fit: read back afterwards (:attr:`replays`
          counts it).

        Removing a sample usually raises its own loss, so scores are mostly positive; an unusually large one
        means the model bends to fit that sample alone, the classic sign of a mislabelled sample: rank with
        ``result.most_helpful(n)`` (largest first). The sign convention is the one of every score.
        """
        fit = self._finished()
        if all_samples is None:
            all_samples = self._every_sample_by_default(fit)
        if all_samples or fit.tracked_ids.numel() == 0:
            return self._in_run_self_influence(fit, chunk_size)
        if not self.config.keeps_states:
            raise ValueError("self_influence() needs per-sample states; estimator='tracin' keeps none.")
        dataset, collate = fit.context.train_dataset, fit.context.collate_fn or default_collate
        if dataset is None:
            raise RuntimeError("self_influence() reads the tracked samples from the training set, which is unknown.")
        assert fit.final is not None  # _finished() checked it
        theta, frozen = fit.final
        device = fit.parts.params.device
        theta, frozen = theta.to(device), {n: t.to(device) for n, t in frozen.items()}
        # keeps_states: an InfluenceEngine (NoStates only when nothing is tracked, and then no chunk reads it)
        engine = cast(InfluenceEngine, fit.estimator)
        parts = []
        for start in range(0, fit.tracked_ids.numel(), chunk_size):
            ids = fit.tracked_ids[start : start + chunk_size]
            probe = fit.parts.queries.probe(collate([dataset[int(i)] for i in ids]), theta, frozen)
            parts.append(engine.own_scores(probe, slice(start, start + chunk_size)))
        scores = torch.cat(parts).detach().cpu() if parts else torch.zeros(0)
        return InfluenceResult(fit.tracked_ids.clone(), scores, None, self.config.estimator, COUNTERFACTUAL)

    def _in_run_self_influence(self, fit: TrackedFit, chunk_size: int) -> InfluenceResult:
        """The in-run self-influence of every sample from the recorded trajectory, replayed once per fit."""
        cache, key = self._replay_cache(fit), ("self_influence", IN_RUN, False)
        if key not in cache:
            cache[key] = self._count_replay().self_influence(chunk_size)
        held: InfluenceResult = cache[key]
        return dataclasses.replace(held, sample_ids=held.sample_ids.clone(), scores=held.scores.clone())

    def windows(self, query: str, all_samples: bool | None = None) -> list[WindowSnapshot]:
        """The DIT window snapshots of registered query ``query``, in time order.

        Each :class:`WindowSnapshot` carries ``start_step``, ``end_step``, ``sample_ids: LongTensor[k]``
        and ``scores: Tensor[k]`` = I(end) − I(start) (negative = harmful over that window). The
        windows telescope: their scores sum to ``influence(query).scores``.
        Available during training (windows closed so far) and after fit. With ``all_samples=True`` (after
        fit, ``record_trajectory=True``), the same windows over every training sample, by the adjoint replay:
        replayed once per fit and read back afterwards (:attr:`replays`). None (default): every sample after a fit on
        the default path (``track="auto"`` recorded the run) or with ``track=()``, else the tracked ones.

        Raises:
            ValueError: without ``all_samples`` when nothing is forward-tracked (``track=()``, recording only).
        """
        self._check_registered(query)
        if all_samples is None:
            all_samples = self._every_sample_by_default(self._fit, query)
        if not all_samples:
            self._forward_tracked(
                self._fit,
                f"windows({query!r}) without all_samples=True",
                f"after fit, ask windows({query!r}, all_samples=True) for every sample's windows from the recorded"
                " trajectory.",
            )
            return [] if self._fit is None else self._fit.windows(query)
        held = self.replay_registered()[query]
        return [dataclasses.replace(w, sample_ids=w.sample_ids.clone(), scores=w.scores.clone()) for w in held]

    def audit(self, query: Any) -> AuditReport:
        """The faithfulness audit (``audit=N``) of the whole run on ``query`` (a registered name, a batch, a
        DataLoader or a callable): the main estimator's scores of the audited samples against their exact
        counterfactual scores f(θ_T + δθ_j) − f(θ_T). Per-window reports: :meth:`audit_windows`.
        ValueError when nothing is forward-tracked (``track=()``): the audit compares tracked samples."""
        if isinstance(query, str):
            self._check_registered(query)
        fit = self._finished()
        self._forward_tracked(
            fit,
            "audit() compares the forward scores of tracked samples with exact ones, so it",
            "pass track=[ids] (with audit=N) to audit those samples.",
        )
        return fit.audit(query)

    def audit_windows(self, query: str) -> list[AuditReport]:
        """The audit's report of every window of registered query ``query`` so far, in time order."""
        self._check_registered(query)
        audit = None if self._fit is None else self._fit.parts.audit
        return [] if audit is None else list(audit.reports.get(query, []))

    @property
    def artifact_dir(self) -> str | None:
        """The folder of this tracker's files (windows, scores, audit, trajectory) in the current or last fit;
        None before fit or when it writes none."""
        return self.__dict__.get("_artifact_dir")

    @property
    def dirpath(self) -> Path | None:
        """The resolved artifact folder of the current or last fit, a ``pathlib.Path`` (read-only; :attr:`artifact_dir`
        as a path): the constructor's ``dirpath=`` when given, else ``<trainer.log_dir>/<namespace>``. None before
        fit, or when the tracker writes no file (no registered query, ``write_artifacts=False``, no recording). The
        constructor's argument as given: ``tracker.config.dirpath``."""
        folder = self.artifact_dir
        return None if folder is None else Path(folder)

    @property
    def namespace(self) -> str:
        """The first part of this tracker's logger tags (``name``, else ``influence`` / ``influence_<i>``)."""
        return self.__dict__.get("_namespace", "influence")

    @property
    def trajectory_path(self) -> str | None:
        """The folder of the recorded trajectory (``record_trajectory=True``; None otherwise or before fit)."""
        fit = self._fit
        return None if fit is None or fit.parts.recorder is None else str(fit.parts.recorder.dirpath)

    def replay(self, progress: bool = True) -> TrajectoryReplay:
        """The adjoint replay over this fit's recorded trajectory (what ``all_samples=True`` uses), once every file
        the fit submitted is written (the recording thread is waited for). After a fit on several processes (DDP)
        the replay is shared by them, each replaying its part of every step's batch as in training
        (:mod:`~lightning_influence.trajectory.shards`): every process must ask, as for any collective."""
        fit = self._finished()
        if fit.parts.recorder is None:
            raise RuntimeError(
                "all_samples=True replays the recorded trajectory: pass record_trajectory=True to InfluenceTracker"
                " (track=() records without forward states)."
            )
        fit.parts.recorder.flush()
        loss, context, shard = fit.parts.queries.loss, fit.context, None
        if context.world_size > 1 and context.reduce is not None:
            if context.agree is not None:
                context.agree(None)  # a barrier: rank zero has written every file when the others read them
            shard = ReplayShard(context.rank, context.world_size, context.reduce)
        return TrajectoryReplay(
            load_trajectory(fit.parts.recorder.dirpath),
            loss.module,
            fit.context.train_dataset,
            loss_fn=loss.loss_fn,
            regularizer=loss.regularizer,
            collate_fn=fit.context.collate_fn,
            move=fit.parts.queries.move,
            progress=progress and context.rank == 0,
            shard=shard,
        )

    def patterns(self, query: str, **thresholds: float) -> InfluencePatterns:
        """Classify tracked samples as stable / early / late / fluctuating from their window scores
        on ``query`` ([concepts.md: Time windows]); ``thresholds`` go to
        :func:`~lightning_influence.results.patterns.classify_patterns`. ValueError when nothing is
        forward-tracked (``track=()``): classify the replayed windows of every sample instead. After a fit on the
        default path (``track="auto"`` recorded the run), every sample's replayed windows are classified."""
        self._check_registered(query)
        if self._every_sample_by_default(self._fit, query):
            replayed = self.windows(query)
            matrix = torch.stack([w.scores for w in replayed])
            return classify_patterns(matrix, replayed[0].sample_ids, **thresholds)
        self._forward_tracked(
            self._fit,
            f"patterns({query!r})",
            f"after fit, classify every sample's replayed windows: w = windows({query!r}, all_samples=True);"
            " classify_patterns(torch.stack([s.scores for s in w]), w[0].sample_ids).",
        )
        if self._fit is None or not self._fit.windows(query):
            raise RuntimeError(
                f"No window of {query!r} has closed yet: patterns() needs the window snapshots of a fit."
            )
        return classify_patterns(self._fit.recorder.window_matrix(query), self._fit.tracked_ids, **thresholds)

    def _current(self, what: str) -> TrackedFit:
        if self._fit is None:
            raise RuntimeError(f"{what} is available once trainer.fit(...) has started with this tracker.")
        return self._fit

    @property
    def engine(self) -> Estimator:
        """The estimator of the current (or last) fit: its states (``engine.states``) or running scores."""
        return self._current("engine").estimator

    @property
    def tracked_ids(self) -> torch.Tensor:
        """``LongTensor[k]``: the tracked training-set ids, in state-row order."""
        return self._current("tracked_ids").tracked_ids

    @property
    def unseen_ids(self) -> torch.Tensor:
        """``LongTensor``: tracked ids that no optimizer step of the fit consumed (influence 0)."""
        return self._current("unseen_ids").unseen_ids

    @property
    def samples_seen(self) -> torch.Tensor:
        """``BoolTensor[k]``: which tracked samples a booked optimizer step consumed."""
        return self._current("samples_seen").state.seen.clone()

    @property
    def steps_booked(self) -> int:
        """Optimizer steps booked into the states (GradScaler-skipped steps are not booked)."""
        return self._current("steps_booked").state.steps_booked

    @property
    def global_step(self) -> int:
        """The Trainer's step count after the last optimizer step the tracker handled."""
        return self._current("global_step").state.global_step


def _final_scores(windows: list[WindowSnapshot]) -> InfluenceResult:
    """The scores at the last window's end, I(end) = Σ of the windows (``"first-order"``, the replay's numbers)."""
    total = torch.stack([w.scores.to(torch.float64) for w in windows]).sum(dim=0).to(windows[0].scores.dtype)
    return InfluenceResult(windows[0].sample_ids.clone(), total, estimator="first-order")
