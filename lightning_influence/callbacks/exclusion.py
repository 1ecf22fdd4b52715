"""``ExcludeSamples``: a callback that takes chosen training samples out of training, without touching the loop.

Removing a sample means dropping its rows from every training batch from the next batch on: after the batch
reaches the device (Lightning's ``on_after_batch_transfer``, after the user's own hook) and before any other
callback or ``training_step`` sees it. The batch shrinks; its mean loss is over the rows kept, so the run is an
ordinary run on smaller batches, which the tracker models exactly. The steps, the epochs and the
learning-rate schedule are unchanged. A batch whose rows are all removed is skipped (``training_step``
returns None, so Lightning takes no optimizer step).

The hooks are wrapped on the instance for the duration of a fit and restored at its end. Validation,
test and predict batches are never filtered. Single-process only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_influence.errors import InfluenceConfigurationError
from lightning_influence.results.selection import drop_rows
from lightning_influence.sample_ids import SampleIdsFn, default_sample_ids

FilterBatchFn = Callable[[Any, torch.Tensor], Any]


def _batch_hook_owner(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
    """The object whose ``on_after_batch_transfer`` Lightning calls: the datamodule when it overrides the hook,
    else the module (Lightning's own rule, read from its data-hook selector when present)."""
    selector = getattr(getattr(trainer, "_data_connector", None), "_datahook_selector", None)
    if selector is None:
        return pl_module
    return selector.get_instance("on_after_batch_transfer")


def _as_ids(ids: Sequence[int] | torch.Tensor) -> list[int]:
    tensor = torch.as_tensor(ids)
    if tensor.numel() and (tensor.dtype.is_floating_point or tensor.dtype == torch.bool or int(tensor.min()) < 0):
        raise ValueError(f"Sample ids to exclude must be non-negative integers, got {tensor[:5].tolist()}...")
    return [int(i) for i in tensor.flatten()]


class ExcludeSamples(Callback):
    """Take training samples out of training: their rows are dropped from every training batch.

    Args:
        ids: training-set ids excluded from the start (more can be added with :meth:`exclude`).
        sample_ids: ``(batch) -> LongTensor[B]``, the ids of a batch's rows; default: the
            :class:`~lightning_influence.IndexedDataset` convention (use the tracker's, if it has its own).
        filter_batch: ``(batch, keep: BoolTensor[B]) -> batch`` keeping the rows where ``keep``; default: every
            tensor whose first dimension is B is indexed (see :func:`~lightning_influence.results.selection.drop_rows`).

    Example: retrain without the 50 most harmful samples, on the very same loader::

        drop = tracker.influence("val").most_harmful(50).sample_ids
        pl.Trainer(callbacks=[ExcludeSamples(drop)]).fit(model, train_loader)
    """

    def __init__(
        self,
        ids: Sequence[int] | torch.Tensor = (),
        sample_ids: SampleIdsFn | None = None,
        filter_batch: FilterBatchFn | None = None,
    ) -> None:
        self._read_ids = sample_ids or default_sample_ids
        self._filter = filter_batch or drop_rows
        self._order: dict[int, None] = {}  # the excluded ids, in order (an ordered set)
        self._removed = torch.zeros(0, dtype=torch.long)  # the same ids as a tensor, for the per-batch lookup
        self._restore: list[tuple[Any, str, Any]] = []
        self._emptied = False  # the batch just filtered has no rows left: its training_step is skipped
        self.skipped_batches = 0
        self.exclude(ids)

    @property
    def removed(self) -> torch.Tensor:
        """``LongTensor[n]``: the excluded training-set ids, in the order they were excluded."""
        return self._removed.clone()

    def exclude(self, ids: Sequence[int] | torch.Tensor) -> None:
        """Exclude ``ids`` too, from the next training batch on (ids already excluded are ignored)."""
        self._order.update(dict.fromkeys(_as_ids(ids)))
        self._removed = torch.tensor(list(self._order), dtype=torch.long)

    def _reset(self, ids: Sequence[int] = ()) -> None:
        self._order = {}
        self.exclude(ids)

    # ------------------------------------------------------------------ hooks
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.world_size > 1:
            raise InfluenceConfigurationError(
                f"{type(self).__name__} runs in a single process only: under {type(trainer.strategy).__name__}"
                f" with {trainer.world_size} processes, removed rows would leave the processes' batches (and"
                " skipped steps) unequal. Train on one device, or filter the dataset itself for a distributed run."
            )
        if not pl_module.automatic_optimization:
            raise InfluenceConfigurationError(
                f"{type(self).__name__} needs automatic optimization (it skips a batch whose rows are all removed"
                " by returning None from training_step); the module uses manual optimization."
            )
        self._uninstall()
        self._install(trainer, pl_module)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._uninstall()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._uninstall()

    # ------------------------------------------------------------------ the wrapped hooks
    def _install(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        owner = _batch_hook_owner(trainer, pl_module)
        transfer, step = owner.on_after_batch_transfer, pl_module.training_step

        def on_after_batch_transfer(batch: Any, dataloader_idx: int) -> Any:
            batch = transfer(batch, dataloader_idx)
            return self._filtered(batch) if trainer.training else batch

        def training_step(*args: Any, **kwargs: Any) -> Any:
            if self._emptied:
                self._emptied = False
                self._skipped()
                return None
            return step(*args, **kwargs)

        for obj, name, wrapper in ((owner, "on_after_batch_transfer", on_after_batch_transfer),
                                   (pl_module, "training_step", training_step)):  # fmt: skip
            self._restore.append((obj, name, obj.__dict__.get(name)))
            setattr(obj, name, wrapper)

    def _uninstall(self) -> None:
        for obj, name, previous in reversed(self._restore):
            if previous is None:
                obj.__dict__.pop(name, None)
            else:
                setattr(obj, name, previous)
        self._restore = []

    def _filtered(self, batch: Any) -> Any:
        self._emptied = False
        if not self._order:
            return batch
        ids = torch.as_tensor(self._read_ids(batch)).detach().to("cpu", torch.long).flatten()
        keep = ~torch.isin(ids, self._removed)
        if bool(keep.all()):
            return batch
        filtered = self._filter(batch, keep)
        kept = torch.as_tensor(self._read_ids(filtered)).detach().to("cpu", torch.long).flatten()
        if not torch.equal(kept, ids[keep]):
            raise InfluenceConfigurationError(
                f"{type(self).__name__} could not remove rows from this batch: after filtering, its ids are"
                f" {kept[:8].tolist()}…, expected {ids[keep][:8].tolist()}…. Pass filter_batch=(batch, keep) -> batch"
                " that keeps the rows where keep (BoolTensor[B]) is True."
            )
        self._emptied = not bool(keep.any())
        return filtered

    def _skipped(self) -> None:
        self.skipped_batches += 1
        if self.skipped_batches == 1:
            rank_zero_warn(
                f"{type(self).__name__}: every row of a training batch was removed, so that batch is skipped (no"
                " optimizer step). `skipped_batches` counts them; larger batches make this rare."
            )
