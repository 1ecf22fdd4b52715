"""``InfluenceTracker``: the Lightning adapter over one :class:`~lightning_influence.core.fit.TrackedFit` per fit.

Each hook translates Lightning into a call on the fit's core: the configuration is validated once at
construction (:mod:`~lightning_influence.core.config`), the Trainer is probed in
:mod:`~lightning_influence.callbacks.trainer_probe`, and the per-fit state, the step record, the estimators and the
windows live in :mod:`~lightning_influence.core.fit` and the modules it uses.

Lifecycle: a fit is created when training starts (from a checkpoint's state when this very fit resumed
from one, or continuing the previous fit when the same Trainer goes on training the same weights);
state restored outside a fit (``trainer.test(ckpt_path=...)``, a tuner) is dropped at the next fit's
setup; a fit with nothing to train leaves the previous results in place; training hooks that run
outside a fit this tracker started (e.g. inside a learning-rate finder) are ignored.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_influence.autodiff.functional import PerSampleLossFn, RegularizerFn
from lightning_influence.callbacks import trainer_probe as lit
from lightning_influence.callbacks.outputs import attach_outputs, publish_every_sample
from lightning_influence.core.answers import TrackerAnswers
from lightning_influence.core.build import build_fit, why_not_recorded
from lightning_influence.core.config import GIB, TrackerConfig
from lightning_influence.core.default_path import resolve_default_path
from lightning_influence.core.fit import FitContext, TrackedFit
from lightning_influence.errors import InfluenceConfigurationError, SelfCheckError
from lightning_influence.estimators.registry import EstimatorName
from lightning_influence.io.files import FolderLock
from lightning_influence.optimizers.state import OptimizerModelName
from lightning_influence.results.audit import poor_agreement_message
from lightning_influence.results.previews import PreviewFn
from lightning_influence.results.windows import WindowSink
from lightning_influence.sample_ids import SampleIdsFn, default_sample_ids

__all__ = ["InfluenceConfigurationError", "InfluenceTracker", "SelfCheckError"]

LOCK_FILE = "fit.lock"  # in the artifact folder while a fit writes there (rank zero)


class InfluenceTracker(Callback, TrackerAnswers):
    """Track accumulative, optimizer-aware influence of training samples while the model trains.

    Args:
        track: ``"auto"`` (default): every sample scored, the cheapest exact way for the training set at hand
            (:mod:`~lightning_influence.core.default_path`): up to 64 samples, every sample tracked forward; more,
            the run recorded and replayed once at the end of fit for the registered queries (every sample scored,
            its windows logged), with 16 samples tracked forward for live windows. ``None``: forward states for
            every sample. A sequence of training-set ids: forward states for those.
        loss_fn: ``(pl_module, batch) -> Tensor[B]`` of per-sample losses whose mean (plus
            ``regularizer``) is the training loss; default ``pl_module.per_sample_loss(batch)``.
        sample_ids: ``(batch) -> LongTensor[B]``; default: the :class:`IndexedDataset` convention.
        estimator: ``"acc"`` (leave-k-out transition, exact optimizer map; default),
            ``"first-order"`` (fully linear SGD-influence / AdamW-influence), ``"exact"`` (the counterfactual
            run itself: true gradient differences, queries evaluated at θ + δθ_j) or ``"tracin"``
            (no propagation; registered ``queries`` only).
        optimizer_model: ``"auto"`` (the real optimizer's Jacobian) or ``"sgd"`` (model any
            optimizer as plain SGD: the classic optimizer-mismatch approximation).
        queries: ``{"name": batch or DataLoader}``, evaluated at every window boundary;
            ``influence("name")`` and ``windows("name")`` answer for them, and ``"tracin"``
            accumulates on them during training.
        window_every_n_steps, window_every_n_epochs: close a DIT time window after every n optimizer
            steps, or at the end of every n-th epoch (at most one); the end of fit closes the last
            window. With neither, the whole run is one window.
        dirpath: where window snapshots and final scores are written (``windows.jsonl``,
            ``final_scores.json``); default ``<trainer.log_dir>/influence`` (next to the logger's logs).
        write_artifacts: write the files above (rank zero only) when queries are registered.
        log_top_k: how many most harmful / helpful sample ids the TensorBoard text table lists.
        log_figure_every_n_windows: draw the images (the influence figure and the pictures of the window's most
            harmful and helpful samples) every n-th window and at the end (tens of ms each).
        curvature: ``"exact"``: Hessian-vector products of the real batch loss (the only option).
        params: which parameters to track: ``None`` (all trainable ones), or a sequence of name
            prefixes and/or ``nn.Module`` objects. Untracked parameters are held fixed in the
            counterfactual (see the docs' limitations page).
        regularizer: ``(pl_module) -> scalar`` sample-independent term R(θ) that the training loss
            adds to the mean per-sample loss (e.g. an explicit L2 penalty).
        num_samples: size of the training set, when ``len(train_dataloader.dataset)`` is unknown.
        max_memory_bytes: refuse configurations whose states and HVP workspace exceed this.
        hvp_chunk_size: rows per vectorised HVP call; default: derived from ``hvp_memory_bytes``.
        hvp_memory_bytes: working-memory budget of one vectorised HVP call.
        self_check_steps: number of first optimizer steps on which the tracker checks that the
            per-sample losses reproduce the optimizer's gradient and that its optimizer model
            reproduces the observed update (0 disables; not recommended).
        record_trajectory: record the run (sample ids, hyper-parameters, checkpoints) under
            ``<artifact dir>/trajectory`` so that ``influence(..., all_samples=True)`` scores every training
            sample by an adjoint replay after fit; ``track=()`` then records without forward states. None
            (default): ``track="auto"`` decides; False with ``track="auto"`` tracks every sample forward.
        checkpoint_every_n_steps: store the parameters and optimizer state every n steps (default ≈ √T).
        record_batches: also store each step's batches, for data that cannot be read again identically.
        audit, audit_seed, audit_ids: track ``audit`` tracked samples drawn with ``audit_seed`` (or ``audit_ids``)
            with ``estimator="exact"`` next to the main estimator, and compare the two at every window and
            for any query (``tracker.audit(query)``): a measurement of faithfulness on this very run.
        name: tag prefix and artifact folder of this tracker (default ``influence``; ``influence_<i>`` for several).
        sample_preview: images of each window's most harmful / helpful samples in TensorBoard: ``"auto"``
            (image tensors), None, or ``(dataset, ids) -> Tensor[N, C, H, W]``.
        states_in_checkpoint: False keeps the states (k × p × blocks) out of checkpoints, in ``states.pt`` next to
            the artifacts, overwritten at each save: only the last checkpoint can be resumed (exactly).

    Sign convention: every score is the predicted ``f(θ_-j) − f(θ)`` when sample j is removed;
    negative = harmful to the query, positive = helpful.
    """

    def __init__(
        self,
        track: Sequence[int] | torch.Tensor | Literal["auto"] | None = "auto",
        loss_fn: PerSampleLossFn | None = None,
        sample_ids: SampleIdsFn | None = None,
        estimator: EstimatorName = "acc",
        optimizer_model: OptimizerModelName = "auto",
        queries: Mapping[str, Any] | None = None,
        window_every_n_steps: int | None = None,
        window_every_n_epochs: int | None = None,
        dirpath: Any = None,
        write_artifacts: bool = True,
        log_top_k: int = 10,
        log_figure_every_n_windows: int = 10,
        curvature: Literal["exact"] = "exact",
        params: Sequence[str | nn.Module] | None = None,
        regularizer: RegularizerFn | None = None,
        num_samples: int | None = None,
        max_memory_bytes: int = 4 * GIB,
        hvp_chunk_size: int | None = None,
        hvp_memory_bytes: int = GIB // 4,
        self_check_steps: int = 2,
        record_trajectory: bool | None = None,
        checkpoint_every_n_steps: int | None = None,
        record_batches: bool = False,
        audit: int = 0,
        audit_seed: int = 0,
        audit_ids: Sequence[int] | None = None,
        name: str | None = None,
        sample_preview: Literal["auto"] | PreviewFn | None = "auto",
        states_in_checkpoint: bool = True,
    ) -> None:
        arguments = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.config = TrackerConfig(**arguments)
        # Lightning reads state_key several times per step: build it once
        self._state_key = self._generate_state_key(**self.config.state_key_fields())
        self._fit: TrackedFit | None = None  # the fit whose results this tracker answers for
        self._fit_started = False  # on_fit_start ran for the fit in progress (its training hooks are ours)
        self._training = False  # on_train_start ran for the fit in progress
        self._namespace = "influence"
        self._artifact_dir: str | None = None
        self._checkpoint_step: int | None = None
        self._restored: tuple[dict[str, Any], int | None] | None = None  # (state, the checkpoint's global_step)
        self._window_sinks: list[WindowSink] = []  # added by other callbacks (the data selector), every process
        self._lock: FolderLock | None = None  # held on rank zero while a fit writes the artifact folder

    @property
    @override
    def state_key(self) -> str:
        return self._state_key

    def add_window_sink(self, sink: WindowSink) -> None:
        """Hand every window this tracker closes to ``sink`` as well, on every process, from the next fit on.

        ``sink.window(snapshot, recorder)`` runs as soon as the window closes, after the loggers and files;
        ``sink.final(results, metadata)`` at the end of fit. The data selector acts this way.
        """
        if all(s is not sink for s in self._window_sinks):
            self._window_sinks.append(sink)

    # ------------------------------------------------------------------ lifecycle
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":  # state restored before this fit (by test(ckpt_path=...), a tuner...) is not this fit's
            self._restored, self._fit_started, self._training = None, False, False

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        lit.check_trainer(trainer, pl_module, restored=self._restored is not None)
        self._fit_started = True

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._fit_started:
            return  # training run by another callback outside this fit (e.g. a learning-rate finder's trial steps)
        if self._training:
            raise InfluenceConfigurationError(
                "Training started twice within one fit (a callback ran trial steps after the tracker's on_fit_start)."
                " Run such trials before fit, e.g. Tuner(trainer).lr_find(model)."
            )
        self._training = True
        lit.refuse_batch_coupled_layers(pl_module)
        previous, fit = self._fit, self._new_fit(trainer, pl_module)
        resumed, continued = self._restored is not None, False
        if self._restored is not None:  # resumed
            state, step = self._restored
            fit.load_state_dict(state, step if step is not None else trainer.global_step)
        elif continued := fit.continues(previous, trainer.global_step):
            assert previous is not None  # continues() is False without a previous fit
            fit.load_state_dict(previous.state_dict(), trainer.global_step)
        self._restored, self._fit = None, fit
        self._lock_artifact_dir(trainer)
        if fit.parts.recorder is not None:
            fit.parts.recorder.start(fit.state.global_step if resumed or continued else None)
        if self.config.queries and trainer.is_global_zero:  # loggers and files: rank zero
            dirpath = self._artifact_dir if self.config.write_artifacts else None
            attach_outputs(trainer, fit, self._namespace, dirpath, keep=resumed or continued)
        fit.context.sinks.extend(self._window_sinks)
        fit.close_missed_windows(trainer.current_epoch)  # a boundary a resumed run passed: closed before any batch

    def _lock_artifact_dir(self, trainer: pl.Trainer) -> None:
        """Rank zero holds ``fit.lock`` in the artifact folder for the fit's duration: a second live fit writing
        the same folder (another process, or another tracker with the same dirpath) is refused."""
        if self._artifact_dir is None or not trainer.is_global_zero:
            return
        self._lock = FolderLock(Path(self._artifact_dir) / LOCK_FILE, "an artifact folder")
        self._lock.acquire(
            "Give each run its own folder: InfluenceTracker(dirpath=...), or another Trainer(default_root_dir=...)"
            " or logger version."
        )

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _new_fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> TrackedFit:
        self._namespace = lit.namespace(trainer, self)
        context = self._context(trainer, pl_module)
        num_samples = lit.training_set_size(trainer, self.config.num_samples)
        online = any(getattr(sink, "acts_on_every_sample", False) for sink in self._window_sinks)
        path = resolve_default_path(
            self.config, num_samples, trainer.world_size, lambda c: why_not_recorded(c, pl_module, context), online
        )
        config = path.config
        context.replay_at_end, context.answers_by_replay = path.replay_at_end, path.answers_by_replay
        if path.line:
            rank_zero_info(f"InfluenceTracker: {path.line}.")
        needs_dir = (
            config.record_trajectory or not config.states_in_checkpoint or (config.queries and config.write_artifacts)
        )
        # trainer.log_dir is a collective call under DDP: every rank asks
        self._artifact_dir = lit.artifact_dir(trainer, self.config.dirpath, self._namespace) if needs_dir else None
        if self._artifact_dir is not None:
            context.trajectory_dir = os.path.join(self._artifact_dir, "trajectory")
        if not config.states_in_checkpoint:
            assert self._artifact_dir is not None  # needs_dir: the states go next to the artifacts
            context.states_file = os.path.join(self._artifact_dir, "states.pt")
        move, optimizer = lit.batch_mover(trainer, next(p for p in pl_module.parameters())), trainer.optimizers[0]
        return build_fit(config, pl_module, optimizer, num_samples, trainer.global_step, context, move, rank_zero_info)

    def _context(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> FitContext:
        dataset, collate_fn = lit.training_data(trainer)
        return FitContext(
            micro_batch_weight=lit.micro_batch_weight(trainer),
            reduce=lit.reducer(trainer),
            agree=lit.agreement(trainer),
            saves_checkpoints=bool(trainer.checkpoint_callbacks),
            mixed_precision=lit.is_mixed_precision(trainer),
            autocast=lit.autocast_setting(trainer),
            expect_indexed=lit.expects_indexed_batches(trainer, self.config.sample_ids),
            expected_steps=lit.expected_steps(trainer),
            gather_ids=lit.id_gatherer(trainer),
            writes_files=trainer.is_global_zero,
            world_size=trainer.world_size,
            rank=trainer.global_rank,
            train_dataset=dataset,
            collate_fn=collate_fn,
            train_batch_size=lit.train_batch_size(pl_module),
        )

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._fit_started = False
            self._release()

    # ------------------------------------------------------------------ every step
    def _active(self) -> TrackedFit | None:
        return self._fit if self._fit_started else None

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if (fit := self._active()) is not None:
            fit.add_micro_batch(batch)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if (fit := self._active()) is not None:
            fit.read_step(
                optimizer,
                trainer.global_step,
                trainer.current_epoch,
                lit.gradient_clip(trainer),
                lit.loss_scale(trainer),
            )

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if (fit := self._active()) is None:
            return
        if not outputs:
            fit.drop_micro_batch()  # training_step returned None: this micro-batch added no gradient
        if trainer.global_step == fit.state.global_step:
            return  # accumulating: no optimizer step was taken on this batch
        fit.complete_step(trainer.optimizers[0], trainer.global_step, lit.loss_scale(trainer))
        if (tracker_ms := fit.clock.progress_ms(fit.state.steps_booked)) is not None:
            pl_module.log("tracker_ms", tracker_ms, prog_bar=True, logger=False)
            if fit.state.steps_booked == 3:
                assert fit.clock.last is not None  # progress_ms() answered: a step was booked
                steps, tracked = lit.expected_steps(trainer), fit.tracked_ids.numel()
                rank_zero_info(lit.cost_message(fit.clock.last, steps, 3, tracked))
        if fit.schedule.closes_after_step(trainer.global_step):
            fit.close_windows(trainer.global_step, trainer.current_epoch)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (fit := self._active()) is not None:
            default_ids = self.config.sample_ids is default_sample_ids
            lit.check_same_training_set(trainer, fit.context.train_dataset, default_ids)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (fit := self._active()) is not None and fit.schedule.closes_after_epoch(trainer.current_epoch):
            fit.close_windows(trainer.global_step, trainer.current_epoch)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (fit := self._active()) is None:
            return
        fit.finish(lit.reducer(trainer))
        if fit.context.replay_at_end and fit.config.queries:  # the default path: every sample, once, now
            windows = self.replay_registered()
            if trainer.is_global_zero:
                results = {name: self.influence(name) for name in self.config.queries}
                dirpath = self._artifact_dir if self.config.write_artifacts else None
                publish_every_sample(trainer, fit, self._namespace, dirpath, windows, results)
        if fit.parts.audit is not None:  # the whole run, per registered query: warn when agreement is poor
            for name in self.config.queries:
                report = fit.audit(name)
                if report.is_poor():
                    rank_zero_warn(poor_agreement_message(report))
        unseen = fit.unseen_ids
        if unseen.numel():
            rank_zero_warn(
                f"InfluenceTracker: {unseen.numel()} tracked sample(s) never appeared in an optimizer step (e.g. ids"
                f" {unseen[:10].tolist()}): their influence is 0. `tracker.unseen_ids` lists them all; check track="
                " against the training set and the sampler (drop_last, limit_train_batches)."
            )

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # runs before checkpoint callbacks' on_exception (Lightning orders those last): a step the optimizer took
        # but the batch-end hook never saw is booked now, so that a checkpoint saved on the exception is consistent
        try:
            if (fit := self._active()) is not None and trainer.optimizers:
                fit.complete_interrupted_step(trainer.optimizers[0], trainer.global_step, lit.loss_scale(trainer))
        finally:  # the failed fit's trajectory stays unfinished, with no handle open; its folder is free again
            if self._fit is not None and self._fit.parts.recorder is not None:
                self._fit.parts.recorder.abort()
            self._release()

    # ------------------------------------------------------------------ checkpoints
    @override
    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs: the states (k × p × blocks floats), the windows and the step count."""
        return {} if self._fit is None else self._fit.state_dict()

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._checkpoint_step = checkpoint.get("global_step")

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks before training starts, when no fit exists yet: applied at train start
        if state_dict:
            if state_dict.get("version") not in (1, 2):
                raise ValueError(f"Unknown InfluenceTracker checkpoint state version {state_dict.get('version')!r}.")
            self._restored = (state_dict, self._checkpoint_step)
