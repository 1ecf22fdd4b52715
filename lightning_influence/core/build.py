"""Assemble one :class:`~lightning_influence.core.fit.TrackedFit` from a module, its optimizer and the configuration.

Here the tracked parameters are chosen, the per-sample loss resolved, the optimizer modelled, the
memory planned (measured on a training batch by :mod:`~lightning_influence.core.memory`; refused when over
budget) and the estimator created. Nothing here knows Lightning.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import IterableDataset

from lightning_influence.autodiff.draws import draws_randomly, needs_batch_forward
from lightning_influence.autodiff.functional import FunctionalLoss, PerSampleLossFn
from lightning_influence.autodiff.hvp_plan import HvpChoice
from lightning_influence.autodiff.parameters import TrackedParameters, select_parameters
from lightning_influence.autodiff.queries import MoveFn, QueryEvaluator
from lightning_influence.core.audit import FitAudit, choose_audit_ids
from lightning_influence.core.config import GIB, TrackerConfig
from lightning_influence.core.fit import FitContext, FitParts, TrackedFit
from lightning_influence.core.memory import plan_fit_memory
from lightning_influence.core.selfcheck import StepSelfCheck
from lightning_influence.errors import InfluenceConfigurationError
from lightning_influence.estimators.base import NoStates
from lightning_influence.estimators.engine import MemoryPlan, plan_memory
from lightning_influence.estimators.exact import ExactEngine
from lightning_influence.estimators.registry import EstimatorInputs
from lightning_influence.optimizers import OptimizerSpec, model_optimizer
from lightning_influence.records import StepRecord
from lightning_influence.trajectory.reader import default_checkpoint_every
from lightning_influence.trajectory.recorder import TrajectoryRecorder, trajectory_meta


def check_tracked_ids(track: torch.Tensor | None, num_samples: int) -> torch.Tensor:
    """The tracked ids (``None``: every sample), checked against the training set's size."""
    ids = torch.arange(num_samples) if track is None else track
    if ids.numel() and int(ids.max()) >= num_samples:
        raise ValueError(f"track holds ids >= {num_samples}, the training set's size.")
    return ids


def resolve_loss_fn(config: TrackerConfig, module: nn.Module) -> PerSampleLossFn:
    """``config.loss_fn``, or the module's ``per_sample_loss`` method."""
    if config.loss_fn is not None:
        return config.loss_fn
    if not callable(getattr(module, "per_sample_loss", None)):
        raise InfluenceConfigurationError(
            f"{type(module).__name__} has no `per_sample_loss(batch)` method. Either add one returning"
            " Tensor[B] of per-sample losses whose mean is the training loss, or pass"
            " `loss_fn=lambda module, batch: ...` to InfluenceTracker."
        )
    # the user's method, checked above: nn.Module does not declare it, so it is looked up by name
    return getattr(type(module), "per_sample_loss")  # noqa: B009


def describe_plan(config: TrackerConfig, spec: OptimizerSpec, plan: MemoryPlan, hvp: HvpChoice | None = None) -> str:
    """The one-line cost estimate printed at fit start (``hvp``: the HVP method chosen on the probe batch)."""
    k, chunk = plan.num_tracked, min(plan.num_tracked, plan.chunk_rows)
    how = "measured on a training batch" if plan.measured else "parameter vectors only, activations not measured"
    saving = plan.state_bytes + plan.checkpoint_bytes
    return (
        f"InfluenceTracker: estimator={config.estimator!r}, optimizer model={spec.kind}, k={k} tracked samples,"
        f" p={plan.num_params} tracked parameters, state blocks={plan.blocks}; memory ≈"
        f" {plan.state_bytes / GIB:.3f} GiB of states + {plan.work_bytes / GIB:.3f} GiB HVP workspace ({how}):"
        f" peak ≈ {plan.total_bytes / GIB:.3f} GiB above training (≈ {saving / GIB:.3f} GiB while a checkpoint is"
        f" saved); per step: {plan.hvp_calls} HVP call(s) of ≤{chunk} rows ({_method(hvp)}, ≈ {k if plan.blocks else 0}"
        f" HVPs{_timed(hvp, k if plan.blocks else 0)}) plus per-sample gradients of the tracked samples in the batch."
    )


def _timed(hvp: HvpChoice | None, k: int) -> str:
    """``"; ≈ 12.3 ms, timed on a training batch before the first step"`` when the HVP's methods were timed."""
    seconds = None if hvp is None or k == 0 else hvp.step_seconds(k)
    return "" if seconds is None else f"; ≈ {seconds * 1e3:.1f} ms, timed on a training batch before the first step"


def _method(hvp: HvpChoice | None) -> str:
    if hvp is None:
        return "vmap over each call's rows"
    return "vmap over each call's rows" if hvp.method == "vmap" else "a loop of single backwards, measured cheaper here"


def check_plan(
    config: TrackerConfig, plan: MemoryPlan, states_only: bool = False, saves_checkpoints: bool = True
) -> None:
    """Refuse a configuration whose peak is over ``max_memory_bytes``, saying which peak and what to reduce. The peak
    is the larger of a step's (the states and the HVP workspace) and, when the Trainer saves checkpoints (and the
    states go into them), a checkpoint save's (the states, their copy in the state dict and its serialised bytes).
    ``states_only``: the plan's workspace is not measured yet, and only the states' figures (exact, known before
    anything is allocated) are checked."""
    states = plan.state_bytes
    saving = states + plan.checkpoint_bytes if saves_checkpoints else 0
    step = states if states_only else plan.total_bytes
    if max(step, saving) <= config.max_memory_bytes:
        return
    if saving >= step:
        when = f"while a checkpoint is saved (3 × the states' {_size(states)}: them, their copy, its serialised bytes)"
        fix = "Track fewer samples (track=[...]), fewer parameters (params=['head']), or raise max_memory_bytes."
    else:
        when = f"during a step (the states' {_size(states)} and the HVP workspace)"
        fix = (
            "Track fewer samples (track=[...]), fewer parameters (params=['head']), lower hvp_memory_bytes, or raise"
            " max_memory_bytes."
        )
    budget = config.max_memory_bytes
    raise InfluenceConfigurationError(
        f"InfluenceTracker needs ≈ {_size(max(step, saving))} at its peak, {when}; the states are"
        f" k={plan.num_tracked} samples × p={plan.num_params} parameters × {len(plan.blocks)} state block(s) ×"
        f" {plan.itemsize} bytes. That is over max_memory_bytes={budget} ({_size(budget)}). {fix}"
    )


def _size(num_bytes: int) -> str:
    """``num_bytes`` in GiB, MiB or KiB, two decimals."""
    for unit, scale in (("GiB", GIB), ("MiB", 2**20)):
        if num_bytes >= scale / 10:
            return f"{num_bytes / scale:.2f} {unit}"
    return f"{num_bytes / 2**10:.2f} KiB"


def _step_gradient(loss: FunctionalLoss, context: FitContext):
    """The step gradient as the tracker differentiates it (for estimators that do not compute it themselves)."""

    def recompute(record: StepRecord) -> torch.Tensor:
        batches = [m.batch for m in record.micro_batches]
        weights = [m.weight for m in record.micro_batches]
        with torch.enable_grad():
            grad, losses = torch.func.grad(loss.step_loss_and_losses, has_aux=True)(
                record.theta, batches, weights, record.frozen
            )
        for micro, part_losses in zip(record.micro_batches, losses):
            loss.check_batch_size(micro.batch_size, part_losses.shape[0])
        return grad if context.reduce is None else context.reduce(grad)

    return recompute


def refuse_unreplayable_draws(config: TrackerConfig, module: nn.Module, context: FitContext) -> None:
    """Draws and buffers the tracker cannot follow. BatchNorm in train mode under DDP: each process moves its own
    running statistics. Attention whose dropout runs inside ``scaled_dot_product_attention`` draws its masks
    differently under torch.func's vmap and forward-mode transforms, which ``"exact"``, the audit and the replay use:
    refused there (the forward ``"acc"`` / ``"first-order"`` / ``"tracin"`` differentiate it by plain autograd, and
    are exact). Under DDP each process draws its own masks, which a one-process replay cannot."""
    if config.record_trajectory and draws_randomly(module) and context.world_size > 1:
        raise InfluenceConfigurationError(
            "record_trajectory=True under DDP with dropout: each process draws its own masks, and the replay of the"
            " recorded trajectory (on one process) replays rank zero's only. Forward tracking (track=[...]) works"
            " under DDP with dropout; or record on a single device."
        )
    moving = [n for n, m in module.named_modules() if isinstance(m, _BatchNorm) and m.training]
    if moving and context.world_size > 1:
        raise InfluenceConfigurationError(
            f"BatchNorm {moving[0]!r} in train mode under data parallelism: each process moves its own running"
            " statistics from its own samples (and DDP overwrites them with rank zero's before each forward), which"
            " the tracker does not follow yet. Track on one device (devices=1), or, for a DDP run, use GroupNorm or"
            " LayerNorm, or freeze the BatchNorm (eval mode)."
        )
    names = unreplayed_attention_dropouts(module)
    uses = [what for what, on in (("estimator='exact'", config.estimator_spec.exact), ("an audit", config.audits),
                                  ("record_trajectory=True", config.record_trajectory)) if on]  # fmt: skip
    if names and uses:
        raise InfluenceConfigurationError(
            f"{' and '.join(uses)} with attention dropout ({', '.join(repr(n) for n in names)}): these draw their"
            " masks differently under the vectorised transforms these need than in the training forward (the"
            " attention's inside a fused kernel; nn.TransformerEncoderLayer's / DecoderLayer's residual dropouts"
            " after it, as measured). Track forward with estimator='acc' or 'first-order' (exact for this model), or"
            " set those to 0: layer.self_attn.dropout = 0.0 and layer.dropout1.p = layer.dropout2.p = 0.0 (and"
            " dropout3 in a decoder layer) keep the layer's feed-forward dropout (layer.dropout)."
        )


def unreplayed_attention_dropouts(module: nn.Module) -> list[str]:
    """The active dropouts of attention that the vectorised transforms redraw: ``nn.MultiheadAttention``'s own, and
    the residual dropouts of ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer`` after it."""
    names = [
        n for n, m in module.named_modules() if isinstance(m, nn.MultiheadAttention) and m.dropout > 0 and m.training
    ]
    for name, layer in module.named_modules():
        if isinstance(layer, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)) and layer.training:
            for part in ("dropout1", "dropout2", "dropout3"):
                drop = getattr(layer, part, None)
                if isinstance(drop, nn.Dropout) and drop.p > 0:
                    names.append(f"{name}.{part}")
    return names


def why_not_recorded(config: TrackerConfig, module: nn.Module, context: FitContext) -> str | None:
    """Why a recording of this fit would be refused (the refusal's message), or None: for the default path, which
    records only what it can."""
    try:
        refuse_unrecordable(config, context)
        refuse_unreplayable_draws(config, module, context)
    except InfluenceConfigurationError as refusal:
        return str(refusal)
    return None


def refuse_unrecordable(config: TrackerConfig, context: FitContext) -> None:
    """A recording whose replay could not rebuild the run's steps: refused at train start, with the fix."""
    if context.mixed_precision and context.autocast is None:
        raise InfluenceConfigurationError(
            "record_trajectory=True under a mixed-precision plugin that exposes no torch.autocast settings: the"
            " replay recomputes each step's gradient under the training forward's autocast, and cannot read it"
            " from this plugin. Use Lightning's MixedPrecision plugin (precision='bf16-mixed' or '16-mixed'), or"
            " record with precision='32-true'."
        )
    if config.record_batches and context.world_size > 1:
        raise InfluenceConfigurationError(
            "record_batches=True stores rank zero's batches only; under DDP the replay reads the other ranks'"
            " samples from the dataset. Drop record_batches, or record on a single device."
        )
    dataset = context.train_dataset
    if not config.record_batches and isinstance(dataset, IterableDataset):
        raise InfluenceConfigurationError(
            f"record_trajectory=True with an IterableDataset ({type(dataset).__name__}) as the training set:"
            " the replay (all_samples=True) reads each recorded step's samples back by id, which an iterable"
            " dataset cannot give. Pass record_batches=True to store each step's batches with the trajectory."
        )


def make_recorder(
    config: TrackerConfig,
    module: nn.Module,
    params: TrackedParameters,
    optimizer: torch.optim.Optimizer,
    num_samples: int,
    context: FitContext,
) -> TrajectoryRecorder | None:
    """The trajectory recorder of ``record_trajectory=True`` (None otherwise)."""
    if not config.record_trajectory:
        return None
    refuse_unrecordable(config, context)
    # the replay re-runs every trainable parameter's update: with params= the recorder reads them all itself
    recorded = select_parameters(module, optimizer, None) if params.untracked else params
    spec = model_optimizer(optimizer, "auto")  # the replay re-runs the real update, whatever the estimator models
    every = config.checkpoint_every_n_steps or default_checkpoint_every(context.expected_steps)
    meta = trajectory_meta(
        recorded.layout,
        spec.kind,
        bool(getattr(spec.jacobian, "momentum", False)),
        recorded.dtype,
        num_samples,
        autocast=context.autocast,  # the replay evaluates the training loss under the same autocast
        checkpoint_every_n_steps=every,
        world_size=context.world_size,
        record_batches=config.record_batches,
        windows={"every_n_steps": config.window_every_n_steps, "every_n_epochs": config.window_every_n_epochs},
        # moved by the training forward: part of every checkpoint, and the replay's module must move them too
        **({"running_buffers": list(recorded.running)} if recorded.running else {}),
    )
    assert context.trajectory_dir is not None
    return TrajectoryRecorder(
        context.trajectory_dir,
        meta,
        every,
        config.record_batches,
        context.gather_ids,
        context.writes_files,
        params=recorded if params.untracked else None,
        running=recorded.running,
    )


def make_audit(
    config: TrackerConfig,
    loss: FunctionalLoss,
    params: TrackedParameters,
    optimizer: torch.optim.Optimizer,
    tracked_ids: torch.Tensor,
    num_samples: int,
    start_step: int,
) -> FitAudit | None:
    """The faithfulness audit of ``audit=N`` / ``audit_ids=`` (None otherwise): exact states for a few tracked ids."""
    if not config.audits:
        return None
    ids = choose_audit_ids(tracked_ids, config.audit, config.audit_seed, config.audit_ids)
    spec = model_optimizer(optimizer, "auto")  # the exact run follows the real optimizer, whatever the main one models
    plan = plan_memory(
        ids.numel(), loss.layout.numel, spec.jacobian.blocks, params.dtype, config.hvp_memory_bytes, None
    )
    engine = ExactEngine(loss, spec.jacobian, ids.numel(), plan.chunk_rows, params.dtype, params.device)
    return FitAudit(engine, ids, tracked_ids, num_samples, start_step, config.estimator)


def plan_and_check(
    config: TrackerConfig,
    spec: OptimizerSpec,
    loss: FunctionalLoss,
    params: TrackedParameters,
    k: int,
    context: FitContext,
    move: MoveFn,
    announce: Any,
) -> tuple[MemoryPlan, HvpChoice | None]:
    """The fit's memory plan and HVP method, announced, and refused over ``max_memory_bytes``. The states' size is
    known exactly first, so a configuration over budget is refused before anything of size k is allocated."""
    blocks = spec.jacobian.blocks if config.keeps_states else ()
    saves = context.saves_checkpoints and config.states_in_checkpoint
    states = plan_memory(k, params.layout.numel, blocks, params.dtype, config.hvp_memory_bytes, 1)
    check_plan(config, states, states_only=True, saves_checkpoints=saves)
    plan, hvp = plan_fit_memory(config, blocks, loss, params, k, context, move)
    if context.agree is not None:  # measured per process: every process must chunk (and all-reduce) alike
        plan, hvp = context.agree((plan, hvp))
    announce(describe_plan(config, spec, plan, hvp))
    check_plan(config, plan, saves_checkpoints=saves)
    return plan, hvp


def build_fit(
    config: TrackerConfig,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    num_samples: int,
    start_step: int,
    context: FitContext,
    move: MoveFn,
    announce: Any = print,
) -> TrackedFit:
    """A ready :class:`TrackedFit` whose first step is ``start_step``; ``announce(text)`` receives the cost estimate."""
    refuse_unreplayable_draws(config, module, context)
    params = select_parameters(module, optimizer, config.params)
    # a forward that draws (dropout), or recurrent layers: per-sample terms from the batch's own forward, under the
    # step's draws
    loss = FunctionalLoss(
        module, resolve_loss_fn(config, module), params.layout, config.regularizer, coupled=needs_batch_forward(module)
    )
    # TracIn needs only the learning rates, so any descending optimizer will do
    spec = model_optimizer(optimizer, "sgd" if not config.keeps_states else config.optimizer_model)
    assert not isinstance(config.track, str)  # "auto" is resolved at train start (core/default_path.py)
    k, dtype = num_samples if config.track is None else config.track.numel(), params.dtype
    plan, hvp = plan_and_check(config, spec, loss, params, k, context, move, announce)
    tracked_ids = check_tracked_ids(config.track, num_samples)  # k ids at most: the budget allowed them
    queries = QueryEvaluator(loss, config.queries, move)
    inputs = EstimatorInputs(
        loss, spec.jacobian, k, plan.chunk_rows, dtype, params.device, queries,
        hvp_choice=hvp, tune_hvp=config.hvp_chunk_size is None,  # a chunk size the user set is kept
        agree=context.agree,
    )  # fmt: skip
    estimator = NoStates(dtype) if k == 0 else config.estimator_spec.build(inputs)
    parts = FitParts(
        params=params,
        estimator=estimator,
        queries=queries,
        self_check=StepSelfCheck(config.self_check_steps, spec, context.mixed_precision),
        optimizer_kind=spec.kind,
        post_state_keys=spec.jacobian.post_state_keys,
        recompute_gradient=_step_gradient(loss, context),
        recorder=make_recorder(config, module, params, optimizer, num_samples, context),
        audit=make_audit(config, loss, params, optimizer, tracked_ids, num_samples, start_step),
    )
    context.metadata.setdefault("estimator", config.estimator)
    context.metadata.setdefault("optimizer_model", spec.kind)
    return TrackedFit(config, parts, tracked_ids, num_samples, start_step, context)
