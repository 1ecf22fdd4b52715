"""The memory plan of a fit, measured on a training batch, and the HVP method chosen on the same batch.

At train start the tracker draws the first batch-sized set of training samples (the random generators are left
as they were) and measures what the step's HVP allocates beside and per state row, and what one tracked
sample's per-sample gradient (and HVP) allocates (:class:`LiveBytes` counts the tensors created, activations
included). On the same batch it times the HVP's methods (:func:`~lightning_influence.autodiff.hvp_plan.choose_hvp`) and
plans the workspace of the one chosen, so the printed estimate is the peak of the step that will run. Where no
batch can be drawn, the parameter formula of :func:`~lightning_influence.estimators.engine.plan_memory` and a choice
made on the first step. Nothing here knows Lightning.
"""

from __future__ import annotations

import dataclasses
import random
import weakref
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.data import default_collate

from lightning_influence.autodiff.draws import DrawnBatch, RandomDraws
from lightning_influence.autodiff.functional import FunctionalLoss
from lightning_influence.autodiff.hvp_plan import HvpChoice, HvpMethod, StepHvp, choose_hvp
from lightning_influence.autodiff.parameters import TrackedParameters
from lightning_influence.autodiff.queries import MoveFn
from lightning_influence.core.config import TrackerConfig
from lightning_influence.core.state import FitContext
from lightning_influence.estimators.engine import MemoryPlan, plan_memory
from lightning_influence.estimators.registry import EstimatorSpec


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of the tensors that operations create under it while they are alive, and their peak
    (one count per storage; tensors that existed before are not counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._alive: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                self._count(t.untyped_storage())
        return out

    def _count(self, storage: torch.UntypedStorage) -> None:
        key, size = storage.data_ptr(), storage.nbytes()
        if size and key not in self._alive:
            self._alive.add(key)
            self.live += size
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key, size)

    def _free(self, key: int, size: int) -> None:
        self._alive.discard(key)
        self.live -= size

    def restart(self) -> int:
        """A new peak from what is alive now (returned)."""
        self.peak = self.live
        return self.live


def probe_batch(context: FitContext, batch_size: int | None, move: MoveFn) -> Any:
    """The first ``batch_size`` samples of the training set as one batch, as a step sees it. The generators of
    torch, numpy and Python are left as they were: a dataset's random transform must not change the training."""
    dataset = context.train_dataset
    if not batch_size or not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
        return None
    kept = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            items = [dataset[i] for i in range(min(batch_size, len(dataset)))]
            return move((context.collate_fn or default_collate)(items))
    finally:
        random.setstate(kept[0])
        np.random.set_state(kept[1])


def _hvp_cost(loss: FunctionalLoss, theta, frozen, batches, weights, vectors, live: LiveBytes) -> tuple[float, float]:
    """``(bytes beside the rows, bytes per row)`` of the step's vectorised HVP (its graph included), from 2 and 4
    rows."""
    _, hvp, _ = loss.linearize(theta, batches, frozen, weights)
    graph, peaks = live.restart(), []
    for rows in (2, 4):
        out = hvp(vectors[:rows])
        peaks.append(live.peak - graph)
        del out
        live.restart()
    per_row = max(peaks[1] - peaks[0], 0) / 2
    return graph + max(peaks[0] - 2 * per_row, 0), per_row


def _name(fn: Any) -> str:
    code = getattr(fn, "__code__", None)
    where = f":{code.co_filename}:{code.co_firstlineno}" if code is not None else ""
    return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}{where}"


_MEASURED: dict[tuple, tuple[float, float, float, int]] = {}  # this process's probes, by model, loss and batch


def _measure(
    loss: FunctionalLoss, params: TrackedParameters, batches: Sequence[Any], weights, estimator: EstimatorSpec
):
    """``(hvp_fixed, hvp_row, source_row, batch rows)``: what the step's HVP allocates beside and per row, and what
    one tracked sample's per-sample gradient (and HVP) does, measured once per model, loss and batch layout."""
    leaves = tuple((tuple(t.shape), t.dtype, str(t.device)) for t in tree_leaves(batches) if torch.is_tensor(t))
    key: tuple[Any, ...]  # grows below
    key = (_name(type(loss.module)), repr(loss.module), _name(loss.loss_fn), _name(loss.regularizer), estimator.name)
    key += (leaves, tuple(weights), params.layout.names, params.layout.shapes, params.dtype)
    if key not in _MEASURED:
        theta, frozen = params.theta(), params.frozen() or None
        vectors = torch.full((4, theta.numel()), 1e-3, dtype=theta.dtype, device=theta.device)
        size = len(loss.per_sample_losses(theta, batches[0], frozen))
        with torch.enable_grad(), LiveBytes() as live:
            hvp_fixed, hvp_row = _hvp_cost(loss, theta, frozen, batches, weights, vectors, live)
            rows, start = min(2, size), live.restart()
            index = torch.arange(rows, device=theta.device)
            if not estimator.source_hvps:
                loss.sample_gradients(theta, batches[0], index, size, frozen)
            else:
                loss.sample_gradients_and_hvps(theta, batches[0], index, size, vectors[:rows], frozen)
            source_row = (live.peak - start) / rows
        if len(_MEASURED) >= 64:
            _MEASURED.clear()
        _MEASURED[key] = (hvp_fixed, hvp_row, source_row, size)
    return _MEASURED[key]


def plan_fit_memory(
    config: TrackerConfig,
    blocks: Sequence[str],
    loss: FunctionalLoss,
    params: TrackedParameters,
    k: int,
    context: FitContext,
    move: MoveFn,
) -> tuple[MemoryPlan, HvpChoice | None]:
    """The memory plan of the fit, its workspace measured on a training batch (activations included; every row of
    a micro-batch taken as tracked), and the HVP method chosen on that batch (None: not chosen here). Where no
    batch can be drawn or the measurement fails, the parameter formula."""
    p, dtype = params.layout.numel, params.dtype
    try:
        batch = probe_batch(context, context.train_batch_size, move) if blocks and k else None
        if batch is None:
            raise LookupError("no batch to measure on")
        if loss.coupled:  # the forward draws: measure under fixed draws, from a stream left as it was
            batch = DrawnBatch(batch, RandomDraws.capture())
        accumulate = max(1, round(1 / (context.micro_batch_weight * context.world_size)))
        batches, weights = [batch] * accumulate, [context.micro_batch_weight] * accumulate
        hvp_fixed, hvp_row, source_row, size = _measure(loss, params, batches, weights, config.estimator_spec)
    except Exception:  # noqa: BLE001 - a probe must never stop a fit
        return plan_memory(k, p, blocks, dtype, config.hvp_memory_bytes, config.hvp_chunk_size), None
    vector, rows = p * torch.finfo(dtype).bits // 8, min(size, k)
    fixed, source = int(hvp_fixed + accumulate * rows * vector), int(rows * (source_row + 2 * vector))
    measured = (int(hvp_row + vector), fixed, source)  # a chunk row (and the map's scratch); the step's source rows
    plan = plan_memory(k, p, blocks, dtype, config.hvp_memory_bytes, config.hvp_chunk_size, measured)
    choice = _choose(config, loss, params, batches, weights, k, plan) if config.estimator_spec.batched_hvp else None
    if choice is None:
        return plan, None
    widest = max([int(key[5:-4]) for key in choice.seconds if key.startswith("vmap×")] or [0])
    if choice.method == "loop":  # one row's backward at a time; the chunk holds its results
        plan = plan_memory(k, p, blocks, dtype, config.hvp_memory_bytes, plan.chunk_rows,
                           (2 * vector, int(fixed + hvp_row), source))  # fmt: skip
    else:
        plan = plan_memory(k, p, blocks, dtype, config.hvp_memory_bytes, choice.rows, measured)
    probe = int(hvp_fixed + widest * (hvp_row + vector))  # the widest call timed, and its rows
    return dataclasses.replace(plan, probe_bytes=probe), choice


def _choose(config: TrackerConfig, loss, params, batches, weights, k: int, plan: MemoryPlan) -> HvpChoice | None:
    """The HVP method of :func:`~lightning_influence.autodiff.hvp_plan.choose_hvp`, timed on the probe batch within the
    plan's chunk; None when the user fixed the chunk (``hvp_chunk_size``: vmap over it, as given)."""
    if config.hvp_chunk_size is not None:
        return None
    if loss.coupled:  # a forward that draws is differentiated by plain autograd (FunctionalLoss.linearize)
        return HvpChoice("loop", max(1, min(k, plan.chunk_rows)))
    theta, frozen = params.theta(), params.frozen() or None
    rows = torch.full((min(k, plan.chunk_rows), theta.numel()), 1e-3, dtype=theta.dtype, device=theta.device)

    def build(method: HvpMethod) -> StepHvp:
        return loss.linearize(theta, batches, frozen, weights, method)[1]

    with torch.enable_grad():
        return choose_hvp(build, rows, plan.chunk_rows, num_rows=k)
