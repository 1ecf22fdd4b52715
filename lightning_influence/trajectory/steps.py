"""The pieces of one replayed optimizer step ([concepts.md: Every sample at once]): the recorded run's description
turned into the objects that rebuild its steps, and the check that a replayed step reproduces the recorded one.

A replayed step t starts from θ_t and the optimizer state before it, fetches the step's micro-batches (recorded,
or the recorded sample ids read from the training set), takes the gradient of the step loss
Σ_m w_m (mean_{i∈B_m} ℓ_i + R) at θ_t, clips it as recorded, and runs the optimizer model's ``apply`` (the
factual update as torch computes it) to get θ_{t+1} and the post-step state. θ_t and the raw gradient are
compared with the recorded fingerprints (:data:`TOLERANCES`); a difference is a :class:`ReplayMismatchError`,
never a silent approximation. Nothing here knows Lightning.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils._pytree import tree_map

from lightning_influence.autodiff.functional import FunctionalLoss, PerSampleLossFn
from lightning_influence.autodiff.layout import FlatParameters
from lightning_influence.errors import ReplayInputError, ReplayMismatchError
from lightning_influence.optimizers import (
    GroupStep,
    OptimizerJacobian,
    OptimizerStep,
)
from lightning_influence.optimizers.clipping import GradientClip, NormClip, ValueClip
from lightning_influence.optimizers.registry import REPLAYABLE_KINDS, jacobian_for_kind
from lightning_influence.trajectory.fingerprint import fingerprint, fingerprint_spec, fingerprints_match
from lightning_influence.trajectory.format import StepEntry

#: ``{dtype: (parameters rtol, gradient rtol)}`` of the fingerprint check (rule: :func:`fingerprints_match`, a
#: difference relative to ‖v‖). float64: the replay's arithmetic equals torch's up to a few ulps per step, which
#: stay far below 1e-9 over a segment; a changed sample moves a step gradient by ≳ 1e-3 of its norm.
#: float32: torch's foreach / fused kernels round differently from the replay's single-tensor arithmetic, and
#: the round-off compounds over a segment (Adam divides by √v, which magnifies it where v is small); 1e-4 on θ
#: and 1e-3 on the gradient leave room for that and still catch a changed batch. Half precisions: 1e-2 / 1e-1.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-9, 1e-7),
    torch.float32: (1e-4, 1e-3),
    torch.float16: (1e-2, 1e-1),
    torch.bfloat16: (1e-2, 1e-1),
}

#: ``{autocast dtype: (parameters rtol, gradient rtol)}`` of a run recorded under autocast (bf16-mixed, 16-mixed),
#: used in place of :data:`TOLERANCES`. The replay evaluates the training loss under the recorded autocast, so it
#: runs the training forward's casts; where its ops differ from the training step's (a loss reduced otherwise,
#: micro-batches summed before the backward), a float32 difference of an ulp can flip an element's rounding to
#: bfloat16 (unit 2⁻⁸ ≈ 4e-3). Measured on the CPU (``tests/trajectory/test_mixed_precision_replay.py``,
#: ``pytest -s``): bf16-mixed replays reproduce the recorded fingerprints exactly (0), 16-mixed with a GradScaler
#: to ≤ 9e-8 on the test's model (≤ 7e-6 on a wider one with accumulation); a replay *without* the autocast,
#: where every element's rounding differs, misses by 5.7e-3 to 1.5e-2 (gradient) and 2e-3 (parameters), a wrong
#: sample in a batch by ≥ 4e-1 at its step. 2e-3 / 2e-4 (twice float32's) leave room for isolated rounding flips
#: and still catch both.
MIXED_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.bfloat16: (2e-4, 2e-3),
    torch.float16: (2e-4, 2e-3),
}

_CAUSES = (
    "Likely causes: random data augmentation or dropout in the loss (the replay evaluates loss_fn again on the "
    "same samples and must get the same values), a training dataset changed since training (contents, "
    "preprocessing or the order of its items), non-deterministic kernels, or a loss_fn / regularizer other than "
    "the one used in training. Fix: train with InfluenceTracker(record_trajectory=True, record_batches=True), "
    "which stores each step's batches so that the replay does not read the dataset again; make the loss "
    "deterministic; pass the training loss_fn and regularizer."
)

_GROUP_FIELDS = tuple(f.name for f in dataclasses.fields(GroupStep) if f.name != "region")


@dataclass
class ReplayedStep:
    """One rebuilt step t: the factual ``opt_step`` (θ_t, the clipped gradient, Adam's post-step moments),
    its micro-batches ``[(collated batch, sample ids LongTensor[B_m], w_m)]`` as fetched (not yet moved) and
    its clip bound to the raw gradient."""

    entry: StepEntry
    opt_step: OptimizerStep
    micro_batches: list[tuple[Any, torch.Tensor, float]]
    clip: GradientClip | None


def recorded_dtype(meta: dict[str, Any]) -> torch.dtype:
    """The parameters' dtype of ``meta["dtype"]`` (``"float64"``, ``"float32"``, ...)."""
    name = str(meta.get("dtype", "float32")).replace("torch.", "")
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"The trajectory's dtype {meta.get('dtype')!r} is not a floating torch dtype.")
    return dtype


class AutocastLoss(FunctionalLoss):
    """A :class:`FunctionalLoss` whose every forward (the loss and the regularizer) runs under ``torch.autocast``
    with the recorded ``(device type, dtype)``, its cache off, as Lightning's mixed-precision plugin runs
    ``training_step``; the derivatives are taken outside it, as Lightning's backward is."""

    def __init__(self, *args: Any, autocast: tuple[str, torch.dtype], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.autocast: tuple[str, torch.dtype] | None = autocast

    def call(self, theta: torch.Tensor, fn: Callable[..., Any], *args: Any, frozen: dict | None = None) -> Any:
        if self.autocast is None:
            return super().call(theta, fn, *args, frozen=frozen)
        device_type, dtype = self.autocast
        with torch.autocast(device_type, dtype=dtype, cache_enabled=False):
            return super().call(theta, fn, *args, frozen=frozen)


def autocast_from_meta(meta: dict[str, Any]) -> tuple[str, torch.dtype] | None:
    """``(device type, dtype)`` of ``meta["autocast"]``, the autocast the training forward ran under (None when the
    run had none, and for trajectories recorded before the key existed)."""
    spec = meta.get("autocast")
    if not spec:
        return None
    dtype = getattr(torch, str(spec.get("dtype", "")), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"The trajectory's autocast dtype {spec.get('dtype')!r} is not a floating torch dtype.")
    return str(spec["device_type"]), dtype


def check_autocast_device(autocast: tuple[str, torch.dtype] | None, device: torch.device) -> None:
    """:class:`ReplayInputError` unless the replay's device is of the type the run's autocast ran on: autocast on
    another device type casts other ops (or none), so its gradients would not reproduce the recorded ones."""
    if autocast is None or autocast[0] == device.type:
        return
    kind, dtype = autocast[0], str(autocast[1]).replace("torch.", "")
    raise ReplayInputError(
        f"The trajectory was recorded under {kind} autocast ({dtype}), and the replay's module is on {device}: the"
        f" replay evaluates the training loss under the recorded autocast, which a {device.type} device cannot"
        f" reproduce. Replay with the module on a {kind} device (module.to({kind!r})), or record the run with"
        " precision='32-true'."
    )


def layout_from_meta(meta: dict[str, Any]) -> FlatParameters:
    """The flat layout of ``meta["layout"]`` (names, shapes, group slices)."""
    layout = meta["layout"]
    shapes = tuple(torch.Size(s) for s in layout["shapes"])
    offsets, offset = [], 0
    for shape in shapes:
        offsets.append(offset)
        offset += shape.numel()
    slices = tuple(slice(int(a), int(b)) for a, b in layout["group_slices"])
    return FlatParameters(tuple(layout["names"]), shapes, tuple(offsets), slices)


def jacobian_from_meta(meta: dict[str, Any]) -> OptimizerJacobian:
    """The optimizer model of ``meta["optimizer"]``: ``{"kind": ..., "momentum": bool}`` (a kind of
    :data:`~lightning_influence.optimizers.registry.REPLAYABLE_KINDS`: ``"sgd"``, ``"adam"``, ``"adamw"``,
    ``"adam-amsgrad"``, ``"adamw-amsgrad"``, ``"rmsprop"``, ``"rmsprop-centered"``, ``"adagrad"``, ...; a
    missing ``momentum`` is False). Each step's per-group flags (RMSprop's ``centered``, ``amsgrad``...) are
    in its recorded groups; a trajectory recorded before they existed names only the first three kinds."""
    spec = meta["optimizer"]
    kind = spec.get("kind") if isinstance(spec, dict) else spec
    momentum = bool(spec.get("momentum", False)) if isinstance(spec, dict) else False
    if kind not in REPLAYABLE_KINDS:
        raise ValueError(
            f"The trajectory's optimizer {spec!r} cannot be replayed: only {', '.join(map(repr, REPLAYABLE_KINDS))}"
            " can."
        )
    return jacobian_for_kind(kind, momentum)


def check_module(module: nn.Module, layout: FlatParameters) -> None:
    """``ValueError`` naming the differences unless the module's trainable parameters are the recorded ones
    (same names, same shapes). Parameters with ``requires_grad=False`` are constants read from the module."""
    params = dict(module.named_parameters())
    recorded = dict(zip(layout.names, layout.shapes))
    problems = [f"{n} is missing from the module" for n in recorded if n not in params]
    problems += [
        f"{n} has shape {tuple(params[n].shape)}, recorded {tuple(s)}"
        for n, s in recorded.items()
        if n in params and params[n].shape != s
    ]
    problems += [
        f"{n} is trainable but was not recorded" for n, p in params.items() if p.requires_grad and n not in recorded
    ]
    if problems:
        raise ValueError(
            f"The module does not match the recorded trajectory's parameters: {'; '.join(problems[:10])}. Pass a "
            "module of the trained architecture, with the parameters the optimizer did not train frozen "
            "(requires_grad=False)."
        )


def check_running_buffers(meta: dict[str, Any], loss: FunctionalLoss) -> None:
    """:class:`ReplayInputError` unless the module moves the running buffers the recorded run moved
    (``meta["running_buffers"]``: its BatchNorm layers in train mode), with the fix."""
    recorded = list(meta.get("running_buffers") or [])
    moving = [] if loss.running_stats is None else loss.running_stats.buffer_names
    if recorded == moving:
        return
    if recorded and not moving:
        raise ReplayInputError(
            f"The recorded run trained its BatchNorm layers in train mode (moving {recorded[0]!r}, ...), and the module"
            " passed to the replay has them in eval mode: pass it in train mode (module.train()), as in training."
        )
    raise ReplayInputError(
        f"The module moves the running buffers {moving[:4]} in its training forward, the recorded run moved"
        f" {recorded[:4] or 'none'}: put the module's layers in the modes they trained in (module.train(), then"
        " .eval() on the layers that were frozen)."
    )


def working_module(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``module`` itself when its floating tensors have the recorded dtype, else a copy cast to it (the user's
    module is never modified)."""
    tensors = [*module.parameters(), *module.buffers()]
    if all(t.dtype == dtype for t in tensors if t.is_floating_point()):
        return module
    return copy.deepcopy(module).to(dtype)


def default_loss_fn(module: nn.Module) -> PerSampleLossFn:
    """The module's ``per_sample_loss`` method, as ``(module, batch) -> Tensor[B]``."""
    if not callable(getattr(module, "per_sample_loss", None)):
        raise ValueError(
            f"{type(module).__name__} has no `per_sample_loss(batch)` method. Pass the training loss as "
            "`loss_fn=lambda module, batch: ...` returning Tensor[B] of per-sample losses (reduction='none')."
        )
    # the user's method, checked above: nn.Module does not declare it, so it is looked up by name
    return getattr(type(module), "per_sample_loss")  # noqa: B009


def batch_caster(dtype: torch.dtype, device: torch.device) -> Callable[[Any], Any]:
    """The default ``move``: floating tensors of a batch cast to ``dtype``, every tensor put on ``device``."""

    def one(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        return t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)

    return lambda batch: tree_map(one, batch)


def group_steps(entry: StepEntry, layout: FlatParameters) -> list[GroupStep]:
    """The entry's per-group hyper-parameters as :class:`GroupStep` records over the layout's group slices."""
    if len(entry.groups) != len(layout.group_slices):
        raise ValueError(
            f"Step {entry.step} records {len(entry.groups)} param groups, the layout has {len(layout.group_slices)}."
        )
    return [
        GroupStep(region=region, **{k: group[k] for k in _GROUP_FIELDS if k in group})
        for group, region in zip(entry.groups, layout.group_slices)
    ]


def make_clip(record: dict[str, Any] | None, raw: torch.Tensor) -> GradientClip | None:
    """The step's clip (``{"kind": "norm" | "value", ...}`` or None) bound to the raw gradient ``Tensor[p]``."""
    if record is None:
        return None
    if record.get("kind") == "norm":
        return NormClip(raw, record["max_norm"], record.get("other_sq_norm", 0.0))
    if record.get("kind") == "value":
        return ValueClip(raw, record["clip_value"])
    raise ValueError(f"Unknown gradient clip record {record!r}.")


def step_gradient(
    loss: FunctionalLoss, theta: torch.Tensor, micro: Sequence[tuple[Any, torch.Tensor, float]], frozen: dict | None
) -> torch.Tensor:
    """``Tensor[p]``: ∇ Σ_m w_m (mean_i ℓ_i + R) at ``theta`` over the (moved) micro-batches ``micro``."""
    batches, weights = [b for b, _, _ in micro], [w for _, _, w in micro]

    def total(t: torch.Tensor):
        return loss.step_loss_and_losses(t, batches, weights, frozen)

    with torch.enable_grad():
        grad, losses = torch.func.grad(total, has_aux=True)(theta)
    for (_, ids, _), part in zip(micro, losses):
        loss.check_batch_size(ids.numel(), part.shape[0])
    return grad.detach()


class FingerprintCheck:
    """Compares replayed vectors with recorded fingerprints (``meta["fingerprint"]``: seed, size, stride) under the
    tolerances of the parameters' dtype; raises :class:`ReplayMismatchError` with the causes and the fix."""

    def __init__(self, meta: dict[str, Any], dtype: torch.dtype, tolerances: tuple[float, float] | None) -> None:
        self.seed, self.size, self.stride = fingerprint_spec(meta)
        self.dtype = dtype
        autocast = autocast_from_meta(meta)
        # a run under autocast: the tolerances of its compute dtype (the parameters' are too tight)
        self.precision = str(dtype if autocast is None else f"{dtype} under {autocast[1]} autocast")
        default = TOLERANCES.get(dtype, TOLERANCES[torch.float16])
        if autocast is not None:
            default = MIXED_TOLERANCES.get(autocast[1], MIXED_TOLERANCES[torch.float16])
        self.theta_rtol, self.grad_rtol = tolerances or default

    def of(self, vector: torch.Tensor) -> list[float]:
        return fingerprint(vector, self.seed, self.size, stride=self.stride)

    def check(self, recorded: Sequence[float] | None, vector: torch.Tensor, what: str, where: str) -> None:
        """``what``: ``"parameters"`` or ``"gradient"``; ``where`` names the step in the message."""
        if not recorded:
            return
        replayed = self.of(vector)
        rtol = self.theta_rtol if what == "parameters" else self.grad_rtol
        if fingerprints_match(recorded, replayed, rtol):
            return
        raise ReplayMismatchError(
            f"Replaying the recorded trajectory, {where} the {what} differ from the recorded ones by "
            f"{_relative_difference(recorded, replayed):.3g} relative to their norm (tolerance {rtol:g} for "
            f"{self.precision.replace('torch.', '')}). {_CAUSES}"
        )


def _relative_difference(a: Sequence[float], b: Sequence[float]) -> float:
    """max |a − b| / max(rms a, rms b), the measure :func:`fingerprints_match` bounds (inf if not comparable)."""
    if len(a) != len(b):
        return float("inf")
    x, y = torch.tensor(list(a), dtype=torch.float64), torch.tensor(list(b), dtype=torch.float64)
    scale = max(float(x.pow(2).mean().sqrt()), float(y.pow(2).mean().sqrt()))
    diff = float((x - y).abs().max())
    return diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))
