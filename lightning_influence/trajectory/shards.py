"""One process's share of a replay run on several processes ([concepts.md: Every sample at once]).

Every process replays every recorded step forward, whole (θ_t and the optimizer state are the run's, with nothing
exchanged: a step's gradient costs about what exchanging it would on a CPU), and the work on top of the forward
replay is shared:

- an adjoint sweep with at least as many rows as processes (query examples, boundaries) gives each process a
  contiguous block of rows over whole batches: the rows are independent (the adjoint is linear), and nothing is
  exchanged until the score tables are summed at the end (:mod:`~lightning_influence.trajectory.replay`);
- a sweep with fewer rows, and the in-run self-influence, split each step's batch between the processes, as
  data-parallel training does: the Hessian-vector products H_t u of the rows are sums over the step's samples, each
  process computes its samples' part and the parts are summed (all-reduce), so that every process holds the same
  adjoint; a sample's score terms −(w_m/|B_m|) ⟨u_t, ∇ℓ_j⟩ (and its self-influence terms) are its own, added by the
  process that holds it, and the score tables are summed once at the end.

How a step is split: when its number of micro-batches is a multiple of N, k = M/N of them each (a run trained on N
processes records its micro-batches rank-major, k per process), process r takes the micro-batches [r k, (r + 1) k),
whole, as it did in training. Otherwise each micro-batch's rows are split into N contiguous shares, and a share of s
of the |B_m| rows keeps the weight w_m s/|B_m|: its loss w_m s/|B_m| (mean over the share of ℓ_i + R) is the
share's part of the step loss w_m (mean_i ℓ_i + R), the regularizer included, and its score factor
w_m s/|B_m| / s = w_m/|B_m| is unchanged.
Splitting rows needs per-sample losses that do not depend on each other: a forward whose rows are coupled (BatchNorm
in train mode) or that draws (dropout's recorded draws are the whole micro-batch's) is refused, with the fix.

Nothing here knows Lightning: ``reduce`` is the sum over the processes of a tensor (torch.distributed's all-reduce in
the processes Lightning Fabric starts, or the Trainer strategy's after a DDP fit).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable

import torch

from lightning_influence.autodiff.draws import DrawnBatch
from lightning_influence.errors import ReplayInputError

MicroBatch = tuple[Any, torch.Tensor, float]
"""``(collated batch, sample ids LongTensor[B_m], weight w_m)``."""


@dataclass(frozen=True)
class ReplayShard:
    """Process ``rank`` of ``world_size`` in a replay; ``reduce(tensor)`` returns the sum of ``tensor`` over the
    processes (every process calls it, in the same order). ``rows_coupled``: the model's per-sample losses depend on
    the other rows of their batch (BatchNorm in train mode), so that micro-batches can only be shared whole."""

    rank: int
    world_size: int
    reduce: Callable[[torch.Tensor], torch.Tensor]
    rows_coupled: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} lies outside [0, world_size={self.world_size}).")

    def split(self, step: int, micro: Sequence[MicroBatch]) -> list[MicroBatch]:
        """This process's micro-batches of step ``step`` (module docstring); empty when it has no rows there."""
        n = self.world_size
        if len(micro) % n == 0:
            k = len(micro) // n
            return list(micro[self.rank * k : (self.rank + 1) * k])
        coupled = "BatchNorm in train mode" if self.rows_coupled else None
        if any(isinstance(batch, DrawnBatch) for batch, _, _ in micro):
            coupled = "recorded random draws (dropout)"
        if coupled is not None:
            raise ReplayInputError(
                f"Step {step} has {len(micro)} micro-batch(es), which {n} processes cannot share whole, and the model's"
                f" forward couples the rows of a batch ({coupled}): a process cannot replay a part of a micro-batch."
                f" Replay on a number of processes that divides every step's micro-batches, or on one (devices=1)."
            )
        return [share for m in micro if (share := self._rows(m)) is not None]

    def _rows(self, micro: MicroBatch) -> MicroBatch | None:
        """This process's contiguous share of one micro-batch's rows, with its weight (None if it holds none)."""
        batch, ids, weight = micro
        size = ids.numel()
        start, stop = self.rank * size // self.world_size, (self.rank + 1) * size // self.world_size
        if stop == start:
            return None
        return rows_of(batch, size, start, stop), ids[start:stop], weight * (stop - start) / size


def rows_of(batch: Any, size: int, start: int, stop: int) -> Any:
    """Rows ``[start, stop)`` of a collated batch of ``size`` rows: every tensor whose first dimension is ``size`` is
    sliced, in tuples, lists and mappings; anything else (a scalar, a shared tensor of another size) is kept."""
    if isinstance(batch, torch.Tensor):
        return batch[start:stop] if batch.dim() and batch.shape[0] == size else batch
    if isinstance(batch, Mapping):
        return type(batch)({k: rows_of(v, size, start, stop) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a named tuple
        return type(batch)(*(rows_of(v, size, start, stop) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(rows_of(v, size, start, stop) for v in batch)
    return batch
