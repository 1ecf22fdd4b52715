"""Every probe of the Trainer, its strategy, precision plugin and loops, in one place.

What the tracker needs to know of Lightning (and the private attributes it reads to know it) is
here; the rest of the package receives plain values. When Lightning changes, this is the file to
update.
"""

from __future__ import annotations

import math
import os
from typing import Any

import lightning.pytorch as pl
import lightning.pytorch.callbacks as lcb
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from torch import nn

from lightning_influence.errors import InfluenceConfigurationError
from lightning_influence.records import Agree, Reduce
from lightning_influence.sample_ids import IndexedDataset, default_sample_ids

SUPPORTED_PRECISION = ("32-true", "64-true", "32", "64", "bf16-mixed", "16-mixed")
MIXED_PRECISION = ("bf16-mixed", "16-mixed")


def _refuse(what: str, fix: str) -> None:
    raise InfluenceConfigurationError(f"InfluenceTracker cannot model {what} exactly. {fix}")


def check_strategy(trainer: pl.Trainer) -> None:
    """Single device or DDP launched once per process; nothing sharded."""
    strategy = trainer.strategy
    # DeepSpeedStrategy subclasses DDPStrategy, hence the exact type test
    if type(strategy) not in (SingleDeviceStrategy, DDPStrategy):
        _refuse(
            f"the {type(strategy).__name__} strategy (sharded parameters or optimizer state)",
            "Use a single device or strategy='ddp'.",
        )
    start_method = getattr(strategy, "_start_method", "popen")
    if isinstance(strategy, DDPStrategy) and start_method != "popen":
        _refuse(
            f"strategy='ddp_{start_method}' (the tracker would live in worker processes and its results would"
            " not come back)",
            "Use strategy='ddp', which runs the script once per process.",
        )


def trainer_callbacks(trainer: pl.Trainer) -> list[lcb.Callback]:
    """``trainer.callbacks``, the Trainer's callbacks."""
    # Lightning assigns Trainer.callbacks from its CallbackConnector without declaring it on Trainer
    return trainer.callbacks  # type: ignore[attr-defined]


def check_callbacks(trainer: pl.Trainer) -> None:
    """Callbacks that change the parameters outside the optimizer, or which parameters it trains."""
    averaging = tuple(getattr(lcb, n) for n in ("StochasticWeightAveraging", "WeightAveraging") if hasattr(lcb, n))
    for callback in trainer_callbacks(trainer):
        if isinstance(callback, averaging):
            _refuse(
                f"{type(callback).__name__}: the model ends with (or is evaluated at) averaged weights that no"
                " optimizer step produced, while the states describe the optimizer's own trajectory",
                "Remove it while tracking, and average after the tracked run; the scores then describe the weights"
                " the optimizer produced.",
            )
        if isinstance(callback, lcb.BaseFinetuning):
            _refuse(
                f"{type(callback).__name__}: it unfreezes parameters and adds optimizer param groups during fit,"
                " so the tracked layout and the optimizer's update change mid-run",
                "Track one fit per phase (freeze or unfreeze between fits, each with its own tracker), or fine-tune"
                " without the callback.",
            )


def check_trainer(trainer: pl.Trainer, pl_module: pl.LightningModule, restored: bool) -> None:
    """Refuse, with the fix, what the tracker cannot model. ``restored``: the tracker's state was loaded."""
    check_strategy(trainer)
    check_callbacks(trainer)
    if not pl_module.automatic_optimization:
        _refuse(
            "manual optimization (it cannot see which losses and steps the optimizer used)",
            "Use automatic optimization: one optimizer, return the loss from training_step.",
        )
    if len(trainer.optimizers) != 1:
        _refuse(f"{len(trainer.optimizers)} optimizers", "Configure exactly one optimizer.")
    if (
        trainer.gradient_clip_val
        and type(pl_module).configure_gradient_clipping is not pl.LightningModule.configure_gradient_clipping
    ):
        _refuse(
            f"{type(pl_module).__name__}.configure_gradient_clipping (a custom clipping rule)",
            "Remove the override and use Trainer(gradient_clip_val=..., gradient_clip_algorithm='norm'|'value').",
        )
    if str(trainer.precision) not in SUPPORTED_PRECISION:
        _refuse(f"precision={trainer.precision!r}", "Use precision='32-true', '64-true', 'bf16-mixed' or '16-mixed'.")
    check_parameter_dtypes(trainer, pl_module)
    if loss_scale(trainer) is not None and getattr(trainer.optimizers[0], "_step_supports_amp_scaling", False):
        _refuse(
            f"{type(trainer.optimizers[0]).__name__}(fused=True) under a GradScaler (it unscales inside its step,"
            " after the tracker has read the still-scaled gradients)",
            "Drop fused=True, or use precision='bf16-mixed' or '32-true'.",
        )
    if resumed_from(trainer) is not None and not restored:
        _refuse(
            f"a run resumed from {resumed_from(trainer)!r}, a checkpoint without this tracker's state (it was"
            " saved without the tracker, or with a tracker configured differently)",
            "Resume from a checkpoint saved with the same InfluenceTracker attached, or train from the start.",
        )


HALF_DTYPES = (torch.float16, torch.bfloat16)


def check_parameter_dtypes(trainer: pl.Trainer, pl_module: nn.Module) -> None:
    """Trainable parameters held in half precision (``model.half()``, ``.to(torch.bfloat16)``) under a precision
    that keeps them so (``32-true`` and the mixed ones leave the module's dtype as it is)."""
    half = [(n, p.dtype) for n, p in pl_module.named_parameters() if p.requires_grad and p.dtype in HALF_DTYPES]
    if half:
        names = ", ".join(repr(n) for n, _ in half[:3]) + (f" and {len(half) - 3} more" if len(half) > 3 else "")
        _refuse(
            f"half-precision parameters ({names}: {half[0][1]}) under precision={str(trainer.precision)!r}: every"
            " update and every state would be rounded to half precision, which the step model and its self-check"
            " do not follow",
            "Keep the parameters in float32 or float64 (drop model.half() / .to(torch.bfloat16)); for half-precision"
            " compute use precision='bf16-mixed' or '16-mixed', which keep float32 parameters.",
        )


def resumed_from(trainer: pl.Trainer) -> str | None:
    """The checkpoint this fit resumed from. The tuners (LearningRateFinder, BatchSizeFinder), which Lightning runs
    before every other callback's on_fit_start, restore a temporary checkpoint of their own: not a resume."""
    path = trainer.ckpt_path
    if path is not None and os.path.basename(str(path)).startswith((".lr_find_", ".scale_batch_size_")):
        return None
    return None if path is None else str(path)


def refuse_batch_coupled_layers(pl_module: nn.Module) -> None:
    """A submodule registered under two names cannot be re-parametrised by ``torch.func.functional_call`` without
    corrupting it. Dropout is replayed (each micro-batch's random draws are captured and every evaluation of its loss
    reuses them); BatchNorm in train mode is followed (its running statistics are part of the state)."""
    names: dict[int, str] = {}
    for name, mod in pl_module.named_modules(remove_duplicate=False):
        if id(mod) in names and any(True for _ in mod.parameters()):
            raise InfluenceConfigurationError(
                f"Module {names[id(mod)]!r} is also registered as {name!r}: the tracker cannot evaluate the model"
                " with its own parameter values when one submodule sits under two names. Register it once and call"
                " it twice in forward (e.g. keep self.proj and drop self.proj2 = self.proj); sharing one Parameter"
                " between two modules (tied weights) is fine."
            )
        names.setdefault(id(mod), name)


def training_set_size(trainer: pl.Trainer, configured: int | None) -> int:
    """``configured``, else ``len(train_dataloader.dataset)``; a ``configured`` size larger than the dataset's length
    is refused (every id would be an index past its end, and the tracker would size its tables for nothing)."""
    dataset = getattr(trainer.train_dataloader, "dataset", None)
    length = len(dataset) if dataset is not None and hasattr(dataset, "__len__") else None
    if configured is not None:
        if length is not None and configured > length:
            raise InfluenceConfigurationError(
                f"num_samples={configured} is larger than the training set, whose length is {length}"
                f" (len(train_dataloader.dataset)). Sample ids index the training set: drop num_samples= (the"
                f" tracker reads the length itself), or pass num_samples={length}."
            )
        return configured
    if length is None:
        raise InfluenceConfigurationError(
            "Cannot tell the training set's size from train_dataloader.dataset. Pass num_samples= to InfluenceTracker."
        )
    return length


def expects_indexed_batches(trainer: pl.Trainer, sample_ids: Any) -> bool:
    """With the default id reader, a plain (x, y) dataset would have its labels read as ids: insist on
    IndexedDataset unless the batches turn out to be dicts carrying "sample_id". Refuses, before any batch, a
    sampler that repeats indices within a batch (:func:`check_sampler`)."""
    dataset = getattr(trainer.train_dataloader, "dataset", None)
    check_sampler(trainer.train_dataloader, sample_ids)
    return sample_ids is default_sample_ids and not isinstance(dataset, IndexedDataset)


def _draws_with_replacement(sampler: Any) -> Any:
    """The sampler (or the sampler under Lightning's DDP wrapper) that draws with replacement, or None."""
    for candidate in (sampler, getattr(getattr(sampler, "dataset", None), "_sampler", None)):
        if candidate is not None and getattr(candidate, "replacement", False) is True:
            return candidate
    return None


def check_sampler(loader: Any, sample_ids: Any) -> None:
    """Refuse a training sampler that draws with replacement (``WeightedRandomSampler``, ``RandomSampler(
    replacement=True)``) into batches of several rows: a batch could hold one sample twice, which the tracker
    refuses when it happens, possibly late in the run. With ``sample_ids=`` the ids need not be the sampler's
    indices, and each batch's ids are checked as they come."""
    if sample_ids is not default_sample_ids or loader is None:
        return
    batch_sampler = getattr(loader, "batch_sampler", None)
    sampler = getattr(batch_sampler, "sampler", None) or getattr(loader, "sampler", None)
    batch_size = getattr(batch_sampler, "batch_size", None) or getattr(loader, "batch_size", None)
    drawing = _draws_with_replacement(sampler)
    if drawing is None or batch_size == 1:
        return
    raise InfluenceConfigurationError(
        f"The training DataLoader's sampler, {type(drawing).__name__} with replacement=True, can draw one training"
        f" sample twice into a batch of {batch_size}; the tracker would refuse that batch only when it happens,"
        " possibly late in the run. Each row of a batch must be a different training sample: sample without"
        " replacement within a batch (e.g. WeightedRandomSampler(weights, num_samples, replacement=False)), or give"
        " each draw its own id and pass sample_ids=lambda batch: ... to InfluenceTracker."
    )


def micro_batch_weight(trainer: pl.Trainer) -> float:
    """w_m: DDP averages the processes' gradients, and Lightning divides each accumulated micro-batch loss by N."""
    return 1.0 / (trainer.accumulate_grad_batches * trainer.world_size)


def reducer(trainer: pl.Trainer) -> Reduce | None:
    """Sums a tensor over the data-parallel processes (None for one process)."""
    if trainer.world_size <= 1:
        return None
    strategy = trainer.strategy
    return lambda tensor: strategy.reduce(tensor.contiguous(), reduce_op="sum")


def agreement(trainer: pl.Trainer) -> Agree | None:
    """Gives every data-parallel process rank zero's value of a picklable object (None for one process): a choice
    made by timing (the HVP's method and width) differs between processes, and the collectives that follow it must
    not."""
    if trainer.world_size <= 1:
        return None
    strategy = trainer.strategy
    return lambda value: strategy.broadcast(value, src=0)


def is_mixed_precision(trainer: pl.Trainer) -> bool:
    return str(trainer.precision) in MIXED_PRECISION


def autocast_setting(trainer: pl.Trainer) -> tuple[str, torch.dtype] | None:
    """``(device type, dtype)`` of the autocast that the precision plugin runs ``training_step`` under (bf16-mixed,
    16-mixed), read from the plugin's own context manager; None without autocast, or for a plugin that has none."""
    if not is_mixed_precision(trainer):
        return None
    make = getattr(trainer.precision_plugin, "autocast_context_manager", None)
    autocast = make() if callable(make) else None
    if not isinstance(autocast, torch.autocast):
        return None
    return str(autocast.device), autocast.fast_dtype


def gradient_clip(trainer: pl.Trainer) -> tuple[str, float] | None:
    """The Trainer's gradient clipping as ``("norm" | "value", threshold)``, or None."""
    if not trainer.gradient_clip_val:
        return None
    value = str(trainer.gradient_clip_algorithm) in ("value", "GradClipAlgorithmType.VALUE")
    return ("value" if value else "norm", float(trainer.gradient_clip_val))


def loss_scale(trainer: pl.Trainer) -> float | None:
    """The GradScaler's current scale (None without a scaler)."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return None if scaler is None else float(scaler.get_scale())


def batch_mover(trainer: pl.Trainer, parameter: torch.Tensor):
    """A query batch in the module's precision, on the device its parameters are on at call time (Lightning may
    have moved the module back to the CPU at teardown)."""
    convert = trainer.precision_plugin.convert_input

    def move(batch: Any) -> Any:
        return move_data_to_device(convert(batch), parameter.device)

    return move


def namespace(trainer: pl.Trainer, tracker: Any) -> str:
    """The tracker's ``name``; else ``influence``, or ``influence_<i>`` when several trackers with queries share
    the Trainer."""
    if tracker.config.name is not None:
        return tracker.config.name
    trackers = [c for c in trainer_callbacks(trainer) if isinstance(c, type(tracker)) and c.config.queries]
    return "influence" if len(trackers) <= 1 or tracker not in trackers else f"influence_{trackers.index(tracker)}"


def artifact_dir(trainer: pl.Trainer, dirpath: str | os.PathLike | None, name: str) -> str:
    """``dirpath``, else ``<trainer.log_dir>/<name>`` (a collective call under DDP: call it on every rank)."""
    if dirpath is not None:
        return os.fspath(dirpath)
    return os.path.join(trainer.log_dir or trainer.default_root_dir, name)


def expected_steps(trainer: pl.Trainer) -> int | None:
    """The fit's total number of optimizer steps, when Lightning can tell (for ≈ √T trajectory checkpoints)."""
    try:
        steps = trainer.estimated_stepping_batches
    except Exception:  # noqa: BLE001 - an iterable without length: unknown
        return None
    return int(steps) if steps != float("inf") else None


def cost_message(seconds_per_step: float, total_steps: int | None, done: int, tracked: int = 1) -> str:
    """The measured cost, its projection over the fit, and the cheaper settings (none to offer when ``tracked`` is 0:
    the cost is the recording's)."""
    remaining = None if total_steps is None else seconds_per_step * max(total_steps - done, 0)
    total = "" if remaining is None else f"; ≈ {remaining:.0f} s more for this fit"
    measured = f"InfluenceTracker: measured {seconds_per_step * 1e3:.1f} ms of tracker work per optimizer step{total}."
    if tracked == 0:
        return measured
    return (
        f"{measured} Cheaper: fewer tracked samples (track=[...]), fewer tracked parameters (params=['head']), or"
        " track=() with record_trajectory=True and influence(..., all_samples=True) after fit."
    )


def id_gatherer(trainer: pl.Trainer):
    """Collects every process's ids of one micro-batch, in rank order (None for one process)."""
    if trainer.world_size <= 1:
        return None
    strategy = trainer.strategy

    def gather(ids: torch.Tensor) -> list[torch.Tensor]:
        device = strategy.root_device
        sizes = strategy.all_gather(torch.tensor([ids.numel()], device=device)).flatten().tolist()
        padded = torch.full((max(sizes),), -1, dtype=torch.long, device=device)
        padded[: ids.numel()] = ids.to(device)
        everyone = strategy.all_gather(padded).reshape(len(sizes), -1)
        return [everyone[rank, :size].cpu() for rank, size in enumerate(sizes)]

    return gather


def check_same_training_set(trainer: pl.Trainer, dataset: Any, default_ids: bool) -> None:
    """With the default ids (dataset indices), the training set must stay the one the fit started with."""
    current = getattr(trainer.train_dataloader, "dataset", None)
    if default_ids and current is not dataset:
        raise InfluenceConfigurationError(
            f"The training set changed at epoch {trainer.current_epoch} (reload_dataloaders_every_n_epochs, or a"
            " datamodule that builds a new dataset): the tracker's sample ids are indices into the dataset the fit"
            " started with, so they would name other samples now. Keep one dataset object and vary only the"
            " sampler, or pass sample_ids=lambda batch: ... returning ids that are stable across datasets."
        )


def training_data(trainer: pl.Trainer) -> tuple[Any, Any]:
    """``(dataset, collate_fn)`` of the training DataLoader (for the all-sample replay)."""
    loader = trainer.train_dataloader
    return getattr(loader, "dataset", None), getattr(loader, "collate_fn", None)


def train_batch_size(pl_module: nn.Module) -> int | None:
    """The training DataLoader's batch size (under a batch sampler: its mean batch, rounded up), for the memory
    probe at train start; None when the module has no Trainer or its loader does not tell."""
    try:
        trainer: Any = pl_module.trainer  # a LightningModule's Trainer, if any (read as a plain module's attribute)
        loader = trainer.train_dataloader
    except (AttributeError, RuntimeError):  # a plain module, or one not attached to a Trainer
        return None
    if getattr(loader, "batch_size", None):
        return int(loader.batch_size)
    try:
        return max(1, math.ceil(len(loader.dataset) / len(loader)))
    except (AttributeError, TypeError, ZeroDivisionError):  # no dataset, no length
        return None
