"""``InfluenceTracker``: the Lightning adapter over the influence engine.

The callback validates the Trainer / module / optimizer configuration at fit start, allocates the
stacked states at train start (restoring them on a resumed run), collects the micro-batches and
the pre-step parameters of every real optimizer step, and hands the engine a plain description of
that step once the optimizer has run. At window boundaries it scores the registered queries and
passes the snapshot to the loggers and the artifact writer (rank zero). All maths lives in
:mod:`~lightning_influence.engine`, :mod:`~lightning_influence.optimizers`,
:mod:`~lightning_influence.clipping` and :mod:`~lightning_influence.queries`; when a window closes
in :mod:`~lightning_influence.windows`; what is logged in :mod:`~lightning_influence.reporting`.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_influence.artifacts import SnapshotWriter
from lightning_influence.clipping import GradientClip, NormClip, ValueClip
from lightning_influence.data import (
    SAMPLE_ID_KEY,
    IndexedDataset,
    SampleIdError,
    SampleIdsFn,
    default_sample_ids,
    validate_sample_ids,
)
from lightning_influence.engine import ESTIMATORS, InfluenceEngine, MicroBatch, chunk_rows_for_budget
from lightning_influence.functional import FlatParameters, FunctionalLoss, PerSampleLossFn, RegularizerFn
from lightning_influence.optimizers import OptimizerSpec, OptimizerStep, model_optimizer, read_group_step
from lightning_influence.patterns import InfluencePatterns, classify_patterns
from lightning_influence.queries import query_example_gradients, query_gradient
from lightning_influence.reporting import log_window
from lightning_influence.result import InfluenceResult
from lightning_influence.windows import WindowRecorder, WindowSchedule, WindowSnapshot


class InfluenceConfigurationError(RuntimeError):
    """The Trainer, module or optimizer is set up in a way the tracker cannot model exactly."""


class SelfCheckError(RuntimeError):
    """The tracker's model of the step does not reproduce what really happened."""


_GIB = 2**30
_SUPPORTED_PRECISION = ("32-true", "64-true", "32", "64", "bf16-mixed", "16-mixed")
_MIXED_PRECISION = ("bf16-mixed", "16-mixed")
# Relative gradient mismatch the self-check accepts: under autocast the step's gradient is computed in
# bf16/fp16 while the tracker differentiates the loss in the parameters' float32.
_MIXED_GRAD_TOLERANCE = 5e-2


class InfluenceTracker(Callback):
    """Track accumulative, optimizer-aware influence of training samples while the model trains.

    Args:
        track: ``None`` for every sample of the training set, or a sequence of training-set ids.
        loss_fn: ``(pl_module, batch) -> Tensor[B]`` of per-sample losses whose mean (plus
            ``regularizer``) is the training loss; default ``pl_module.per_sample_loss(batch)``.
        sample_ids: ``(batch) -> LongTensor[B]``; default: the :class:`IndexedDataset` convention.
        estimator: ``"acc"`` (leave-k-out transition, exact optimizer map; default),
            ``"first-order"`` (fully linear SGD-influence / AdamW-influence) or ``"tracin"``
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

    Sign convention: every score is the predicted ``f(θ_-j) − f(θ)`` when sample j is removed;
    negative = harmful to the query, positive = helpful.
    """

    def __init__(
        self,
        track: Sequence[int] | torch.Tensor | None = None,
        loss_fn: PerSampleLossFn | None = None,
        sample_ids: SampleIdsFn | None = None,
        estimator: str = "acc",
        optimizer_model: str = "auto",
        queries: Mapping[str, Any] | None = None,
        window_every_n_steps: int | None = None,
        window_every_n_epochs: int | None = None,
        dirpath: str | os.PathLike | None = None,
        write_artifacts: bool = True,
        log_top_k: int = 10,
        curvature: str = "exact",
        params: Sequence[str | nn.Module] | None = None,
        regularizer: RegularizerFn | None = None,
        num_samples: int | None = None,
        max_memory_bytes: int = 4 * _GIB,
        hvp_chunk_size: int | None = None,
        hvp_memory_bytes: int = _GIB // 4,
        self_check_steps: int = 2,
    ) -> None:
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}.")
        if optimizer_model not in ("auto", "sgd"):
            raise ValueError(f"optimizer_model must be 'auto' or 'sgd', got {optimizer_model!r}.")
        if curvature != "exact":
            raise ValueError(
                f"curvature={curvature!r} is not available: only 'exact' Hessian-vector products of the batch loss are"
                " implemented (an approximation is never substituted silently)."
            )
        self.window_schedule = WindowSchedule(window_every_n_steps, window_every_n_epochs)
        self.queries = dict(queries or {})
        if any(not isinstance(name, str) for name in self.queries):
            raise TypeError("queries must map string names to a batch or a DataLoader.")
        if estimator == "tracin" and not self.queries:
            raise ValueError(
                "estimator='tracin' needs registered queries (queries={'val': val_batch_or_loader}): TracIn"
                " accumulates query-gradient dot products during training and cannot answer new queries later."
            )
        if track is not None:
            track = torch.as_tensor(track)
            if track.numel() and (track.dtype.is_floating_point or track.dtype.is_complex or track.dtype == torch.bool):
                raise ValueError(f"track must hold integer training-set ids, got dtype {track.dtype}.")
            track = track.to(torch.long).flatten()
            if track.numel() == 0 or torch.unique(track).numel() != track.numel() or int(track.min()) < 0:
                raise ValueError("track must be a non-empty sequence of distinct, non-negative training-set ids.")
        if (window_every_n_steps or window_every_n_epochs) and not self.queries:
            raise ValueError(
                "Time windows score the registered queries: pass queries={'val': val_batch_or_loader} with"
                " window_every_n_steps / window_every_n_epochs."
            )
        if hvp_chunk_size is not None and hvp_chunk_size < 1:
            raise ValueError("hvp_chunk_size must be a positive integer.")
        if log_top_k < 1:
            raise ValueError("log_top_k must be a positive integer.")
        self.track = track
        self.loss_fn = loss_fn
        self.sample_ids = sample_ids or default_sample_ids
        self.estimator = estimator
        self.optimizer_model = optimizer_model
        self.params = params
        self.regularizer = regularizer
        self.num_samples = num_samples
        self.max_memory_bytes = int(max_memory_bytes)
        self.hvp_chunk_size = hvp_chunk_size
        self.hvp_memory_bytes = int(hvp_memory_bytes)
        self.self_check_steps = int(self_check_steps)
        self.dirpath = dirpath
        self.write_artifacts = write_artifacts
        self.log_top_k = int(log_top_k)

        # Lightning reads state_key several times per step: build it once
        track_key = "all" if track is None else hashlib.sha1(track.numpy().tobytes()).hexdigest()[:12]
        self._state_key = self._generate_state_key(
            estimator=estimator,
            optimizer_model=optimizer_model,
            track=track_key,
            params=repr(params),
            queries=sorted(self.queries),
            windows=(window_every_n_steps, window_every_n_epochs),
        )
        self.engine: InfluenceEngine | None = None
        self.tracked_ids: torch.Tensor | None = None
        self._optimizer_spec: OptimizerSpec | None = None
        self._loss: FunctionalLoss | None = None
        self._row_of: torch.Tensor | None = None  # training id -> state row (-1 if untracked)
        self._tracked_groups: list[list[nn.Parameter]] = []  # tracked parameters per optimizer param group
        self._tracked_params: list[nn.Parameter] = []
        self._untracked_trainable: dict[str, nn.Parameter] = {}
        self._micro: list[tuple[Any, torch.Tensor]] = []  # (batch, ids) of the micro-batches since the last step
        self._last_global_step = 0
        self._seen: torch.Tensor | None = None  # Tensor[k] bool: tracked samples that appeared in a step
        self._restored: dict[str, Any] | None = None  # a checkpoint's state, applied at train start
        self._pending: dict[str, Any] | None = None
        self._observed_after_check: torch.Tensor | None = None  # θ after a self-checked step
        self._steps_done = 0
        self._final: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None
        self._convert: Callable[[Any], Any] | None = None  # the precision plugin's input conversion
        self._expect_indexed = False
        self._recorder: WindowRecorder | None = None
        self._writer: SnapshotWriter | None = None

    @property
    def state_key(self) -> str:
        return self._state_key

    # ------------------------------------------------------------------ fit start: validate, lay out
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_trainer(trainer, pl_module)
        optimizer = trainer.optimizers[0]
        # TracIn needs only the learning rates, so any descending optimizer will do
        self._optimizer_spec = model_optimizer(optimizer, "sgd" if self.estimator == "tracin" else self.optimizer_model)
        self._steps_done, self._final, self._pending, self._observed_after_check = 0, None, None, None
        named = self._select_parameters(pl_module, optimizer)
        layout = FlatParameters.from_groups(named)
        tracked_ids = {id(p) for group in named for _, p in group}
        self._tracked_groups = [[p for _, p in group] for group in named]
        self._tracked_params = [p for group in self._tracked_groups for p in group]
        self._untracked_trainable = {
            n: p for n, p in pl_module.named_parameters() if p.requires_grad and id(p) not in tracked_ids
        }
        loss_fn = self.loss_fn
        if loss_fn is None:
            if not callable(getattr(pl_module, "per_sample_loss", None)):
                raise InfluenceConfigurationError(
                    f"{type(pl_module).__name__} has no `per_sample_loss(batch)` method. Either add one returning"
                    " Tensor[B] of per-sample losses whose mean is the training loss, or pass"
                    " `loss_fn=lambda module, batch: ...` to InfluenceTracker."
                )
            loss_fn = type(pl_module).per_sample_loss
        self._loss = FunctionalLoss(pl_module, loss_fn, layout, self.regularizer)
        self._convert = trainer.precision_plugin.convert_input
        self._strategy = trainer.strategy

    def _check_trainer(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        def refuse(what: str, fix: str) -> None:
            raise InfluenceConfigurationError(f"InfluenceTracker cannot model {what} exactly. {fix}")

        strategy = trainer.strategy
        # DeepSpeedStrategy subclasses DDPStrategy, hence the exact type test
        if type(strategy) not in (SingleDeviceStrategy, DDPStrategy):
            refuse(
                f"the {type(strategy).__name__} strategy (sharded parameters or optimizer state)",
                "Use a single device or strategy='ddp'.",
            )
        start_method = getattr(strategy, "_start_method", "popen")
        if isinstance(strategy, DDPStrategy) and start_method != "popen":
            refuse(
                f"strategy='ddp_{start_method}' (the tracker would live in worker processes and its results would"
                " not come back)",
                "Use strategy='ddp', which runs the script once per process.",
            )
        if not pl_module.automatic_optimization:
            refuse(
                "manual optimization (it cannot see which losses and steps the optimizer used)",
                "Use automatic optimization: one optimizer, return the loss from training_step.",
            )
        if len(trainer.optimizers) != 1:
            refuse(f"{len(trainer.optimizers)} optimizers", "Configure exactly one optimizer.")
        if trainer.gradient_clip_val and type(pl_module).configure_gradient_clipping is not pl.LightningModule.configure_gradient_clipping:
            refuse(
                f"{type(pl_module).__name__}.configure_gradient_clipping (a custom clipping rule)",
                "Remove the override and use Trainer(gradient_clip_val=..., gradient_clip_algorithm='norm'|'value').",
            )
        if str(trainer.precision) not in _SUPPORTED_PRECISION:
            refuse(
                f"precision={trainer.precision!r}",
                "Use precision='32-true', '64-true', 'bf16-mixed' or '16-mixed'.",
            )
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and getattr(trainer.optimizers[0], "_step_supports_amp_scaling", False):
            refuse(
                f"{type(trainer.optimizers[0]).__name__}(fused=True) under a GradScaler (it unscales inside its step,"
                " after the tracker has read the still-scaled gradients)",
                "Drop fused=True, or use precision='bf16-mixed' or '32-true'.",
            )
        if trainer.ckpt_path is not None and self._restored is None:
            refuse(
                f"a run resumed from {trainer.ckpt_path!r}, a checkpoint without this tracker's state (it was"
                " saved without the tracker, or with a tracker configured differently)",
                "Resume from a checkpoint saved with the same InfluenceTracker attached, or train from the start.",
            )

    def _select_parameters(self, pl_module: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[tuple[str, Any]]]:
        """Tracked ``(name, parameter)`` pairs per optimizer param group."""
        name_of = {id(p): n for n, p in pl_module.named_parameters()}
        wanted: set[int] | None = None
        if self.params is not None:
            selectors = [self.params] if isinstance(self.params, (str, nn.Module)) else list(self.params)
            wanted = set()
            for sel in selectors:
                if isinstance(sel, nn.Module):
                    found = {id(p) for p in sel.parameters()}
                    if not found <= name_of.keys():
                        raise InfluenceConfigurationError(
                            f"params= selector {type(sel).__name__} is not a submodule of {type(pl_module).__name__}."
                        )
                elif isinstance(sel, str):
                    found = {id(p) for n, p in pl_module.named_parameters() if n == sel or n.startswith(sel + ".")}
                else:
                    raise TypeError(f"params= takes name prefixes or nn.Module objects, got {type(sel).__name__}.")
                if not found:
                    raise InfluenceConfigurationError(f"params= selector {sel!r} matches no parameter of the module.")
                wanted |= found
        groups, seen = [], set()
        for group in optimizer.param_groups:
            chosen = []
            for p in group["params"]:
                if not p.requires_grad or (wanted is not None and id(p) not in wanted):
                    continue
                if id(p) not in name_of:
                    raise InfluenceConfigurationError("The optimizer holds a parameter that is not part of the module.")
                chosen.append((name_of[id(p)], p))
                seen.add(id(p))
            groups.append(chosen)
        if wanted is not None and (missing := wanted - seen):
            names = sorted(name_of[i] for i in missing if i in name_of)
            raise InfluenceConfigurationError(
                f"Parameters {names[:5]} are selected for tracking but the optimizer does not train them (or they are"
                " frozen). Track only parameters the optimizer updates."
            )
        if not seen:
            raise InfluenceConfigurationError("No trainable parameter to track: the optimizer holds none.")
        return groups

    # ------------------------------------------------------------------ train start: allocate
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._refuse_batch_coupled_layers(pl_module)
        num_samples = self.num_samples
        if num_samples is None:
            dataset = getattr(trainer.train_dataloader, "dataset", None)
            if dataset is None or not hasattr(dataset, "__len__"):
                raise InfluenceConfigurationError(
                    "Cannot tell the training set's size from train_dataloader.dataset. Pass num_samples= to"
                    " InfluenceTracker."
                )
            num_samples = len(dataset)
        self.num_samples = num_samples
        # With the default id reader, a plain (x, y) dataset would have its labels read as ids: insist on
        # IndexedDataset unless the batches turn out to be dicts carrying "sample_id".
        self._expect_indexed = self.sample_ids is default_sample_ids and not isinstance(
            getattr(trainer.train_dataloader, "dataset", None), IndexedDataset
        )
        track = torch.arange(num_samples) if self.track is None else self.track
        if int(track.max()) >= num_samples:
            raise ValueError(f"track holds ids >= {num_samples}, the training set's size.")
        self.tracked_ids = track
        self._row_of = torch.full((num_samples,), -1, dtype=torch.long)
        self._row_of[track] = torch.arange(track.numel())

        assert self._loss is not None and self._optimizer_spec is not None
        p = self._loss.layout.numel
        dtype = self._tracked_params[0].dtype
        itemsize = torch.finfo(dtype).bits // 8
        k = track.numel()
        blocks = 0 if self.estimator == "tracin" else len(self._optimizer_spec.jacobian.blocks)
        chunk = self.hvp_chunk_size or chunk_rows_for_budget(p, itemsize, self.hvp_memory_bytes, k)
        state_bytes = k * p * blocks * itemsize
        work_bytes = 0 if blocks == 0 else min(k, chunk) * p * itemsize * 6
        total = state_bytes + work_bytes
        rank_zero_info(
            f"InfluenceTracker: estimator={self.estimator!r}, optimizer model={self._optimizer_spec.kind},"
            f" k={k} tracked samples, p={p} tracked parameters, state blocks="
            f"{self._optimizer_spec.jacobian.blocks if blocks else ()}; memory ≈ {state_bytes / _GIB:.3f} GiB of"
            f" states + {work_bytes / _GIB:.3f} GiB HVP workspace; per step: {math.ceil(k / chunk) if blocks else 0}"
            f" vectorised HVP call(s) of ≤{min(k, chunk)} rows (≈ {k if blocks else 0} HVPs) plus per-sample"
            " gradients of the tracked samples in the batch."
        )
        if total > self.max_memory_bytes:
            raise InfluenceConfigurationError(
                f"InfluenceTracker needs ≈ {total / _GIB:.2f} GiB (k={k} samples × p={p} parameters × {blocks} state"
                f" block(s) × {itemsize} bytes, plus the HVP workspace), over max_memory_bytes="
                f"{self.max_memory_bytes / _GIB:.2f} GiB. Track fewer samples (track=[...]), fewer parameters"
                " (params=['head']), lower hvp_memory_bytes, or raise max_memory_bytes."
            )
        self.engine = InfluenceEngine(
            self._loss, self._optimizer_spec.jacobian, k, self.estimator, chunk, dtype, pl_module.device
        )
        self._recorder = WindowRecorder(track)
        self._seen = torch.zeros(k, dtype=torch.bool)
        self._micro, self._last_global_step, self._last_step_epoch = [], trainer.global_step, trainer.current_epoch
        if self._restored is not None:
            self._restore(self._restored)
            self._restored = None
        # several trackers with queries on one Trainer each get their own folder and logger tags
        trackers = [c for c in trainer.callbacks if isinstance(c, InfluenceTracker) and c.queries]
        self._namespace = "influence" if len(trackers) <= 1 else f"influence_{trackers.index(self)}"
        self._writer = None
        if self.queries and self.write_artifacts:
            dirpath = self._artifact_dir(trainer)  # on every rank: trainer.log_dir is a collective call
            if trainer.is_global_zero:
                self._writer = SnapshotWriter(dirpath)
                # a resumed run rewrites the windows the checkpoint does not know (closed after it was saved)
                self._writer.truncate({q: len(self._recorder.windows(q)) for q in self.queries})

    def _artifact_dir(self, trainer: pl.Trainer) -> str:
        if self.dirpath is not None:
            return os.fspath(self.dirpath)
        return os.path.join(trainer.log_dir or trainer.default_root_dir, self._namespace)

    @staticmethod
    def _refuse_batch_coupled_layers(pl_module: nn.Module) -> None:
        for name, mod in pl_module.named_modules():
            if isinstance(mod, nn.modules.dropout._DropoutNd) and mod.p > 0 and mod.training:
                raise InfluenceConfigurationError(
                    f"Module {name!r} is an active {type(mod).__name__}(p={mod.p}): the tracker cannot replay its"
                    " random masks, so its Hessians would not be the ones the step used. Set p=0 while tracking."
                )
            if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.training:
                raise InfluenceConfigurationError(
                    f"Module {name!r} is a {type(mod).__name__} in training mode: it couples the samples of a batch,"
                    " so per-sample losses are not independent. Use LayerNorm/GroupNorm, or freeze it (eval mode)."
                )

    # ------------------------------------------------------------------ every step
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        assert self.num_samples is not None
        if self._expect_indexed and not (isinstance(batch, Mapping) and SAMPLE_ID_KEY in batch):
            raise SampleIdError(
                "The training set is not an IndexedDataset, so its batches carry no sample ids (the default reader"
                " would take the last element, e.g. the labels, as ids). Wrap it: DataLoader(IndexedDataset(dataset),"
                " ...), or pass sample_ids=lambda batch: ... returning LongTensor[B] of training-set indices."
            )
        ids = validate_sample_ids(self.sample_ids(batch), None, self.num_samples)
        self._micro.append((batch, ids))

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Record θ_t, the gradient the optimizer is about to use and its hyper-parameters at this step."""
        assert self._loss is not None
        layout = self._loss.layout
        if all(p.grad is None for p in self._tracked_params):
            return  # training_step returned None: Lightning skips this step, and so does every counterfactual
        grads = []
        for name, p in zip(layout.names, self._tracked_params):
            if p.grad is None:
                raise InfluenceConfigurationError(
                    f"Parameter {name!r} received no gradient at step {trainer.global_step}, so the optimizer skipped it."
                    " Exclude parameters the loss does not use (params=...)."
                )
            grads.append(p.grad.detach())
        theta = layout.flatten([p.detach() for p in self._tracked_params])  # torch.cat copies
        if self._observed_after_check is not None:
            moved = float((theta - self._observed_after_check).abs().max())
            self._observed_after_check = None
            if moved > 0:
                raise SelfCheckError(
                    f"The tracked parameters changed outside the optimizer between optimizer steps {trainer.global_step - 1}"
                    f" and {trainer.global_step} (max abs change {moved:.2e}): e.g. a projection, weight clipping or an"
                    " EMA swap in a hook. The tracker models only the optimizer's update; remove that change."
                )
        groups = []
        for group, region, tracked in zip(optimizer.param_groups, layout.group_slices, self._tracked_groups):
            # read the state of a tracked parameter of the group (untracked/frozen ones may have none)
            first_state = optimizer.state.get(tracked[0], {}) if tracked else {}
            step_count = int(first_state.get("step", 0)) + 1
            first_momentum = first_state.get("momentum_buffer") is None
            groups.append(read_group_step(group, region, step_count, first_momentum))
        check = self._steps_done < self.self_check_steps
        raw_grad = layout.flatten(grads)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        skipped = scaler is not None and not bool(torch.isfinite(raw_grad).all())
        clip = None if skipped else self._gradient_clip(trainer, raw_grad)
        self._pending = {
            "step": OptimizerStep(groups, theta, raw_grad if clip is None else clip.clipped),
            "raw_grad": raw_grad,
            "clip": clip,
            "skipped": skipped,  # a GradScaler step with inf/NaN gradients: the optimizer will not run
            # GradScaler.update() lowers the scale after a skipped step, also when the inf/NaN appeared
            # in a hook after this one
            "scale": None if scaler is None else float(scaler.get_scale()),
            "frozen": {n: p.detach().clone() for n, p in self._untracked_trainable.items()},
            "pre_state": self._flat_optimizer_state(optimizer) if check else None,
        }

    def _all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the data-parallel processes (each holds its own micro-batches of the step)."""
        return self._strategy.reduce(tensor.contiguous(), reduce_op="sum")

    def _gradient_clip(self, trainer: pl.Trainer, raw_grad: torch.Tensor) -> GradientClip | None:
        """The Trainer's gradient clipping of this step, bound to the unclipped gradient."""
        if not trainer.gradient_clip_val:
            return None
        if str(trainer.gradient_clip_algorithm) in ("value", "GradClipAlgorithmType.VALUE"):
            return ValueClip(raw_grad, trainer.gradient_clip_val)
        # the global norm runs over all the optimizer's parameters, tracked or not
        tracked = {id(p) for p in self._tracked_params}
        other = sum(
            float(p.grad.double().pow(2).sum())
            for group in trainer.optimizers[0].param_groups
            for p in group["params"]
            if id(p) not in tracked and p.grad is not None
        )
        return NormClip(raw_grad, trainer.gradient_clip_val, other)

    def _flat_optimizer_state(
        self, optimizer: torch.optim.Optimizer, keys: Sequence[str] = ("exp_avg", "exp_avg_sq", "momentum_buffer")
    ) -> dict[str, torch.Tensor | None]:
        """Flat ``Tensor[p]`` copies of the per-parameter optimizer state the models use (None if absent)."""
        assert self._loss is not None
        out: dict[str, torch.Tensor | None] = {}
        for key in keys:
            parts = [optimizer.state.get(p, {}).get(key) for p in self._tracked_params]
            if all(t is None for t in parts):
                out[key] = None
            else:  # groups without this state (e.g. no momentum) read zeros they never use
                parts = [torch.zeros_like(p) if t is None else t for p, t in zip(self._tracked_params, parts)]
                out[key] = self._loss.layout.flatten(parts)
        return out

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        pending, self._pending = self._pending, None
        if not outputs and self._micro:
            self._micro.pop()  # training_step returned None: this micro-batch added no gradient
        if trainer.global_step == self._last_global_step:
            return  # accumulating: no optimizer step was taken on this batch
        self._last_global_step = trainer.global_step
        self._last_step_epoch = trainer.current_epoch  # at the end of fit current_epoch has moved on
        micro, self._micro = self._micro, []
        # no gradient (training_step returned None) or a GradScaler skip: the step did not happen
        if pending is not None and not self._scaler_skipped(trainer, pending):
            self._book_step(trainer, pending, micro)
        if self.window_schedule.closes_after_step(trainer.global_step):
            self._close_windows(trainer)

    @staticmethod
    def _scaler_skipped(trainer: pl.Trainer, pending: dict[str, Any]) -> bool:
        if pending["skipped"]:
            return True
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        return pending["scale"] is not None and scaler is not None and float(scaler.get_scale()) < pending["scale"]

    def _book_step(self, trainer: pl.Trainer, pending: dict[str, Any], micro: list[tuple[Any, torch.Tensor]]) -> None:
        """Advance the states over the optimizer step just taken on the micro-batches ``micro``."""
        assert self.engine is not None and self._loss is not None and self._row_of is not None
        step: OptimizerStep = pending["step"]
        if self._optimizer_spec.kind in ("adam", "adamw"):
            post = self._flat_optimizer_state(trainer.optimizers[0], ("exp_avg", "exp_avg_sq"))
            step.exp_avg, step.exp_avg_sq = post["exp_avg"], post["exp_avg_sq"]
        # the step's loss: DDP averages the processes' gradients, and Lightning divides each of the
        # accumulated micro-batch losses by accumulate_grad_batches
        weight = 1.0 / (trainer.accumulate_grad_batches * trainer.world_size)
        parts = []
        for batch, ids in micro:
            rows = self._row_of[ids]
            present = rows >= 0
            self._seen[rows[present]] = True
            parts.append(MicroBatch(batch, ids.numel(), rows[present], present.nonzero().flatten(), weight))
        reduce = self._all_reduce_sum if trainer.world_size > 1 else None
        checking = pending["pre_state"] is not None
        tracin_grads = None
        if self.estimator == "tracin":
            tracin_grads = {
                name: query_gradient(self._loss, step.theta, q, self._to_module, pending["frozen"])
                for name, q in self.queries.items()
            }
        started = time.perf_counter()
        try:
            with torch.enable_grad():
                grad_t = self.engine.step(parts, step, pending["frozen"], tracin_grads, pending["clip"], reduce)
        except RuntimeError as err:
            if "random" not in str(err):
                raise
            raise InfluenceConfigurationError(
                "loss_fn calls a random operation (e.g. F.dropout, torch.rand): the tracker cannot replay the draws the"
                " training step used, so its gradients and Hessians would differ. Make loss_fn deterministic."
            ) from err
        elapsed = time.perf_counter() - started
        if checking:
            self._self_check(
                step, pending["raw_grad"], pending["pre_state"], pending["frozen"], grad_t, parts, reduce, trainer
            )
        if self.estimator != "tracin":
            self.engine.check_finite(trainer.global_step - 1, self.tracked_ids)
        self._steps_done += 1
        if self._steps_done == 3:
            rank_zero_info(f"InfluenceTracker: measured {elapsed * 1e3:.1f} ms of tracker work per optimizer step.")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.window_schedule.closes_after_epoch(trainer.current_epoch):
            self._close_windows(trainer)

    def _close_windows(self, trainer: pl.Trainer) -> None:
        """Close every registered query's current window at the current parameters θ(global_step)."""
        assert self._recorder is not None and self.engine is not None and self._loss is not None
        end = trainer.global_step
        if not self.queries or end <= self._recorder.last_boundary:
            return  # no optimizer step since the last boundary (e.g. an epoch and a step window coincide)
        theta = self._loss.layout.flatten([p.detach() for p in self._tracked_params])
        frozen = {n: p.detach() for n, p in self._untracked_trainable.items()}
        for name, query in self.queries.items():
            if self.estimator == "tracin":
                totals = self.engine.tracin_scores.get(name, torch.zeros(self.engine.num_tracked))
            else:
                with torch.enable_grad():
                    grad = query_gradient(self._loss, theta, query, self._to_module, frozen)
                totals = self.engine.project(grad.to(self.engine.theta.device))
            snapshot = self._recorder.close(name, end, self._last_step_epoch, totals)
            if trainer.is_global_zero:
                if self._writer is not None:
                    self._writer.write(snapshot)
                history = self._recorder.windows(name)
                log_window(
                    trainer.loggers,
                    snapshot,
                    self._recorder.window_matrix(name),
                    self.log_top_k,
                    end_steps=[s.end_step for s in history],
                    namespace=self._namespace,
                )

    def _self_check(
        self,
        step: OptimizerStep,
        raw_grad: torch.Tensor,
        pre_state: dict,
        frozen: dict,
        grad_t: torch.Tensor | None,
        parts: list[MicroBatch],
        reduce: Callable[[torch.Tensor], torch.Tensor] | None,
        trainer: pl.Trainer,
    ) -> None:
        """Stop if the per-sample losses or the optimizer model do not reproduce the real step."""
        step_index = trainer.global_step
        mixed = str(trainer.precision) in _MIXED_PRECISION
        tol = _MIXED_GRAD_TOLERANCE if mixed else 1e-6 if step.theta.dtype == torch.float64 else 1e-3
        if grad_t is None:
            assert self._loss is not None
            with torch.enable_grad():
                batches, weights = [p.batch for p in parts], [p.weight for p in parts]
                grad_t = torch.func.grad(self._loss.step_loss)(step.theta, batches, weights, frozen)
            for part, num_losses in zip(parts, self._loss.last_batch_sizes):
                self._loss.check_batch_size(part.batch_size, num_losses)
            grad_t = grad_t if reduce is None else reduce(grad_t)
        err = float((grad_t - raw_grad).norm() / raw_grad.norm().clamp_min(torch.finfo(raw_grad.dtype).tiny))
        if err > tol:
            raise SelfCheckError(
                f"At optimizer step {step_index - 1}, the mean of loss_fn's per-sample losses does not reproduce the"
                f" gradient the optimizer received (relative difference {err:.2e} > {tol:g}). Usual causes: a"
                " regulariser or auxiliary loss in training_step that loss_fn lacks (pass regularizer=), a loss"
                " that is not the mean of per-sample losses (reduction='sum', extra scaling), or random layers."
            )
        tol = 1e-6 if step.theta.dtype == torch.float64 else 1e-3
        assert self._optimizer_spec is not None and self._loss is not None
        observed = self._loss.layout.flatten([p.detach() for p in self._tracked_params])
        self._observed_after_check = observed
        if self._optimizer_spec.kind == "sgd-approx":
            return  # plain SGD stands in for the real optimizer by choice: the update is not expected to match
        predicted = self._optimizer_spec.jacobian.predict(step, pre_state)
        update = (observed - step.theta).abs().max()
        eps = torch.finfo(step.theta.dtype).eps
        err = float((predicted - observed).abs().max())
        if err > tol * float(update) + 16 * eps * float(step.theta.abs().max()):
            raise SelfCheckError(
                f"At optimizer step {step_index - 1}, the tracker's model of {self._optimizer_spec.kind} does not"
                f" reproduce the observed parameter update (max abs difference {err:.2e}, update size {float(update):.2e})."
                " Usual causes: gradient clipping or gradient changes in a hook, an optimizer option the tracker does"
                " not model, or parameters changed outside the optimizer."
            )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self._loss is not None
        theta = self._loss.layout.flatten([p.detach() for p in self._tracked_params])
        self._final = (theta, {n: p.detach().clone() for n, p in self._untracked_trainable.items()})
        self._close_windows(trainer)  # the end of fit closes the last window
        self._report_unseen(trainer)
        if self._writer is not None:
            final = {name: self.influence(name) for name in self.queries}
            self._writer.write_final(
                final, {"estimator": self.estimator, "optimizer_model": self._optimizer_spec.kind, "steps": trainer.global_step}
            )

    def _report_unseen(self, trainer: pl.Trainer) -> None:
        """Warn (not an error) about tracked samples that no optimizer step consumed: their score is 0."""
        assert self._seen is not None and self.tracked_ids is not None
        seen = self._seen
        if trainer.world_size > 1:  # each process saw its own shard
            seen = self._all_reduce_sum(seen.to(torch.float32).to(self._tracked_params[0].device)).cpu() > 0
            self._seen = seen
        if not bool(seen.all()):
            unseen = self.tracked_ids[~seen]
            rank_zero_warn(
                f"InfluenceTracker: {unseen.numel()} tracked sample(s) never appeared in an optimizer step (e.g. ids"
                f" {unseen[:10].tolist()}): their influence is 0. `tracker.unseen_ids` lists them all; check track="
                " against the training set and the sampler (drop_last, limit_train_batches)."
            )

    @property
    def unseen_ids(self) -> torch.Tensor:
        """``LongTensor``: tracked ids that no optimizer step of the fit consumed (influence 0)."""
        if self._seen is None or self.tracked_ids is None:
            raise RuntimeError("unseen_ids is available once trainer.fit(...) has started with this tracker.")
        return self.tracked_ids[~self._seen]

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs: the influence states, the windows so far and the step count.
        The states are k × p × blocks floats: checkpoints grow by that much."""
        if self.engine is None:
            return {}
        assert self._recorder is not None and self.tracked_ids is not None
        return {
            "version": 1,
            "tracked_ids": self.tracked_ids.clone(),
            "steps_done": self._steps_done,
            "seen": self._seen.clone(),
            "engine": {k: {n: t.detach().cpu().clone() for n, t in v.items()} for k, v in self.engine.state_dict().items()},
            "windows": self._recorder.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks before fit start, when no engine exists yet: apply at train start
        if state_dict:
            if state_dict.get("version") != 1:
                raise ValueError(f"Unknown InfluenceTracker checkpoint state version {state_dict.get('version')!r}.")
            self._restored = state_dict

    def _restore(self, state: dict[str, Any]) -> None:
        assert self.engine is not None and self._recorder is not None and self.tracked_ids is not None
        if not torch.equal(state["tracked_ids"], self.tracked_ids):
            raise InfluenceConfigurationError(
                "The checkpoint's influence state tracks different sample ids than this tracker. Resume with the"
                " same track= and training set."
            )
        saved = state["engine"]["states"]
        if {b: tuple(t.shape) for b, t in saved.items()} != {b: tuple(t.shape) for b, t in self.engine.states.items()}:
            raise InfluenceConfigurationError(
                "The checkpoint's influence states do not fit this tracker (different parameters, estimator or"
                " optimizer). Resume with the same model, params= and optimizer."
            )
        self.engine.load_state_dict(state["engine"])
        self._recorder.load_state_dict(state["windows"])
        self._steps_done = int(state["steps_done"])
        self._seen = state["seen"].clone()

    # ------------------------------------------------------------------ after fit
    def windows(self, query: str) -> list[WindowSnapshot]:
        """The DIT window snapshots of registered query ``query``, in time order.

        Each :class:`WindowSnapshot` carries ``start_step``, ``end_step``, ``sample_ids: LongTensor[k]``
        and ``scores: Tensor[k]`` = I(end) − I(start) (negative = harmful over that window). The
        windows telescope: their scores sum to ``influence(query).scores``.
        Available during training (windows closed so far) and after fit.
        """
        self._check_registered(query)
        return [] if self._recorder is None else self._recorder.windows(query)

    def patterns(self, query: str, **thresholds: float) -> InfluencePatterns:
        """Classify tracked samples as stable / early / late / fluctuating from their window scores
        on ``query`` (SPEC §4); ``thresholds`` go to :func:`~lightning_influence.patterns.classify_patterns`."""
        self._check_registered(query)
        if self._recorder is None or not self._recorder.windows(query):
            raise RuntimeError(f"No window of {query!r} has closed yet: patterns() needs the window snapshots of a fit.")
        return classify_patterns(self._recorder.window_matrix(query), self.tracked_ids, **thresholds)

    def _check_registered(self, query: str) -> None:
        if query not in self.queries:
            raise KeyError(f"No registered query named {query!r}; registered: {sorted(self.queries)}.")

    def _to_module(self, batch: Any) -> Any:
        """A query batch in the module's precision, on the device its parameters are on now (Lightning
        may have moved the module back to the CPU at teardown)."""
        batch = batch if self._convert is None else self._convert(batch)
        return move_data_to_device(batch, self._tracked_params[0].device)

    def influence(self, query: Any, per_example: bool = False) -> InfluenceResult:
        """Influence of every tracked training sample on ``query``.

        Args:
            query: a batch or a DataLoader (f = mean per-sample loss over it), a callable
                ``f(pl_module) -> scalar``, or the name of a registered query.
            per_example: also return ``per_example: Tensor[k, n]``, the scores on each query example.

        Returns:
            :class:`InfluenceResult` with ``scores[j]`` ≈ f(θ_-j(T)) − f(θ(T)): negative = harmful.
            "Harmful" reads f as a loss (lower is better): for a callable such as a logit or an
            accuracy proxy, where higher is better, negate it (``lambda m: -m(x)[0, c]``).
        """
        if self.engine is None or self._final is None or self._loss is None:
            raise RuntimeError("influence() is available after trainer.fit(...) has run with this tracker.")
        assert self.tracked_ids is not None
        if isinstance(query, str):
            self._check_registered(query)
            if self.estimator == "tracin":
                if per_example:
                    raise ValueError("per_example=True is not available with estimator='tracin'.")
                scores = self.engine.tracin_scores.get(query)
                if scores is None:
                    scores = torch.zeros(self.tracked_ids.numel())
                return InfluenceResult(self.tracked_ids.clone(), scores.detach().cpu().clone(), None, "tracin")
            query = self.queries[query]
        elif self.estimator == "tracin":
            raise ValueError(
                "estimator='tracin' only answers registered queries: pass the name given in queries={...}."
            )
        device = self._tracked_params[0].device
        theta = self._final[0].to(device)
        frozen = {n: t.to(device) for n, t in self._final[1].items()}
        with torch.enable_grad():
            if per_example:
                grads = query_example_gradients(self._loss, theta, query, self._to_module, frozen)
                per = self.engine.project(grads.to(self.engine.theta.device)).cpu()
                return InfluenceResult(self.tracked_ids.clone(), per.mean(dim=1), per, self.estimator)
            grad = query_gradient(self._loss, theta, query, self._to_module, frozen)
        scores = self.engine.project(grad.to(self.engine.theta.device)).cpu()
        return InfluenceResult(self.tracked_ids.clone(), scores, None, self.estimator)
