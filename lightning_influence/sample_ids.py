"""Sample identity: which dataset index each row of a batch is.

The tracker keeps one accumulative state per tracked training sample, so it must know, for every
row of every training batch, the index of that sample in the training set. ``IndexedDataset``
attaches the index to each item; ``default_sample_ids`` reads it back from a collated batch.
Users who carry ids themselves pass their own ``sample_ids(batch) -> LongTensor[B]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Sized
from typing import Any, Callable, cast

import numpy as np
import torch
from torch.utils.data import Dataset

from lightning_influence.errors import SampleIdError
from lightning_influence.records import MicroBatch, MicroBatchRecord

SAMPLE_ID_KEY = "sample_id"


class IndexedDataset(Dataset):
    """Wrap a map-style dataset so that every item carries its dataset index.

    - a tuple/list item ``(x, y)`` becomes ``(x, y, index)``: unpack with ``x, y, ids = batch``;
    - a dict item gets the key ``"sample_id"``;
    - any other item ``x`` becomes ``(x, index)``.

    After the default collate, the index is a ``LongTensor[B]`` at the same place in the batch,
    where :func:`default_sample_ids` finds it.
    """

    _adds_index = True  # the marker by which code below this room (sample previews) looks through the wrapper

    def __init__(self, dataset: Dataset) -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(
                f"IndexedDataset needs a map-style dataset with __getitem__ and __len__, got {type(dataset).__name__}."
                " For an iterable dataset, yield the ids yourself and pass `sample_ids=` to InfluenceTracker."
            )
        self.dataset = dataset

    def __len__(self) -> int:
        return len(cast(Sized, self.dataset))  # checked in __init__: Dataset itself declares no __len__

    def __getitem__(self, index: int) -> Any:
        item = self.dataset[index]
        if isinstance(item, Mapping):
            if SAMPLE_ID_KEY in item:
                raise KeyError(f"The wrapped dataset's items already have a {SAMPLE_ID_KEY!r} key.")
            return {**item, SAMPLE_ID_KEY: index}
        if isinstance(item, tuple):
            return (*item, index)
        if isinstance(item, list):
            return [*item, index]
        return (item, index)


def default_sample_ids(batch: Any) -> torch.Tensor:
    """Read the ids that :class:`IndexedDataset` put in a collated batch: ``batch["sample_id"]`` for a
    dict batch, else the last element of a tuple/list batch."""
    if isinstance(batch, Mapping):
        if SAMPLE_ID_KEY not in batch:
            raise SampleIdError(
                f"The training batch is a dict without a {SAMPLE_ID_KEY!r} key, so the tracker cannot tell which"
                " samples it holds. Wrap the training set in `IndexedDataset(dataset)`, or pass"
                " `sample_ids=lambda batch: ...` to InfluenceTracker."
            )
        return batch[SAMPLE_ID_KEY]
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)) and len(batch) >= 2:
        return batch[-1]
    raise SampleIdError(
        f"Cannot find sample ids in a training batch of type {type(batch).__name__}. Wrap the training set in"
        " `IndexedDataset(dataset)` (ids become the last element of each batch), or pass"
        " `sample_ids=lambda batch: ...` returning a LongTensor[B] to InfluenceTracker."
    )


def validate_sample_ids(ids: Any, batch_size: int | None, num_samples: int) -> torch.Tensor:
    """Check ids from one batch and return them as a CPU ``LongTensor[B]``.

    Raises :class:`SampleIdError` for a non-integer or non-1-D tensor, a length different from the
    batch's, an id outside ``[0, num_samples)``, or an id repeated within the batch (each row must be
    a distinct sample, or the counterfactual "weight 0 for sample j" is ill-defined).
    """
    if not isinstance(ids, torch.Tensor):
        try:
            ids = torch.as_tensor(ids)
        except Exception as err:  # noqa: BLE001 - we re-raise with the fix
            raise SampleIdError(f"Sample ids must be a LongTensor[B], got {type(ids).__name__}.") from err
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool or ids.dim() != 1:
        raise SampleIdError(
            f"Sample ids must be a 1-D integer tensor (LongTensor[B]), got dtype={ids.dtype}, shape={tuple(ids.shape)}."
            " Is the last element of the batch really the id that IndexedDataset added?"
        )
    ids = ids.detach().to("cpu", torch.long)
    if batch_size is not None and ids.numel() != batch_size:
        raise SampleIdError(f"Got {ids.numel()} sample ids for a batch of {batch_size} per-sample losses.")
    out_of_range, repeated = _range_and_repeats(ids, num_samples)
    if out_of_range:
        bad = ids[(ids < 0) | (ids >= num_samples)].tolist()
        raise SampleIdError(
            f"Sample ids {bad[:10]} are outside [0, {num_samples}), the training set's index range."
            " Ids must be indices into the training dataset (IndexedDataset provides them)."
        )
    if repeated:
        uniq, counts = torch.unique(ids, return_counts=True)
        raise SampleIdError(
            f"Sample ids {uniq[counts > 1].tolist()[:10]} appear more than once in one batch. Each row of a batch"
            " must be a different training sample; sample without replacement within a batch."
        )
    return ids


# Up to this many rows a batch's ids are checked and looked up in plain Python. This runs on every batch, inside
# the training step, where the model's own work has evicted numpy's and torch's small-op code from the CPU caches:
# with numpy and tensor ops, 32 ids cost 70–90 µs per step there, in Python about 25 (benchmarks/step_breakdown.py).
PYTHON_ROWS = 512


def _range_and_repeats(ids: torch.Tensor, num_samples: int) -> tuple[bool, bool]:
    """``(some id is outside [0, num_samples), some id appears twice)`` for ``LongTensor[B]`` on the CPU."""
    if not ids.numel():
        return False, False
    if ids.numel() <= PYTHON_ROWS:
        values = ids.tolist()
        return min(values) < 0 or max(values) >= num_samples, len(set(values)) != len(values)
    ordered = np.sort(ids.numpy())
    return bool(ordered[0] < 0 or ordered[-1] >= num_samples), bool((ordered[1:] == ordered[:-1]).any())


class RowIndex:
    """Which rows of a batch hold tracked samples, and which state row each one is.

    Args:
        tracked_ids: ``LongTensor[k]``; state row r is training sample ``tracked_ids[r]``.
        num_samples: the training set's size (ids are in ``[0, num_samples)``).

    Its memory is O(k), whatever ``num_samples``: large batches look their ids up in the sorted tracked ids.
    """

    def __init__(self, tracked_ids: torch.Tensor, num_samples: int) -> None:
        ids = tracked_ids.tolist()
        self._row = dict(zip(ids, range(len(ids))))
        as_array = np.asarray(ids, dtype=np.int64)
        self._order = np.argsort(as_array, kind="stable")  # state rows in the order of their sorted ids
        self._sorted = as_array[self._order]
        self._none = (torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))  # read-only, shared

    def rows(self, sample_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(state_rows, batch_rows)``, each ``LongTensor[m]``: tracked sample ``state_rows[i]`` sits at row
        ``batch_rows[i]`` of the batch whose (checked, CPU) ids are ``sample_ids: LongTensor[B]``."""
        if sample_ids.numel() <= PYTHON_ROWS:
            found = [(r, b) for b, i in enumerate(sample_ids.tolist()) if (r := self._row.get(i)) is not None]
            if not found:  # the common case at small k
                return self._none
            state_rows, batch_rows = zip(*found)
            return torch.tensor(state_rows, dtype=torch.long), torch.tensor(batch_rows, dtype=torch.long)
        if not self._sorted.size:
            return self._none
        ids = sample_ids.numpy()
        at = np.minimum(np.searchsorted(self._sorted, ids), self._sorted.size - 1)
        present = np.flatnonzero(self._sorted[at] == ids)
        return torch.from_numpy(self._order[at[present]]), torch.from_numpy(present)

    def part(self, micro: MicroBatchRecord) -> MicroBatch:
        """The tracked rows of one micro-batch, as the estimators consume them."""
        state_rows, batch_rows = self.rows(micro.sample_ids)
        return MicroBatch(micro.batch, micro.batch_size, state_rows, batch_rows, micro.weight)


SampleIdsFn = Callable[[Any], torch.Tensor]
