"""How the per-step Hessian-vector product is applied to the k state rows: measured, not guessed.

The step's HVP (:class:`StepHvp`) can be built and applied two ways: a
``torch.func`` graph applied to c rows at once (``"vmap"``), or a plain autograd graph (about half the cost to
build) applied row by row (``"loop"``). Which step costs less depends on the model and on k: for small models
and many rows vmap removes per-call overhead and wins by 10-40× per row; for one or a few rows the cheaper
graph wins; for large models (a 0.3M-parameter CNN, a 1M-parameter MLP on CPU) vmap's batched kernels can cost
up to 2× more per row than separate backwards. :func:`choose_hvp` times both once, on the first step, and the
engine keeps the cheaper. Nothing here knows Lightning.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
from torch.func import vmap

HvpMethod = Literal["vmap", "loop"]
Hvp = Callable[[torch.Tensor], torch.Tensor]  # V: Tensor[c, p] -> V ∇²L: Tensor[c, p]
Build = Callable[[HvpMethod], Hvp]  # method -> the step's HVP, its graph built for that method
TIE = 0.1  # relative difference in cost per row below which the wider vmap call is taken


class StepHvp:
    """``V ∇²L(θ)`` for ``V: Tensor[c, p]``, by backward passes through one step's gradient graph (built once).

    Built for one ``method`` (:meth:`FunctionalLoss.linearize`), equal up to rounding:

    - ``"vmap"``: the graph of ``torch.func`` (``vjp`` of ``grad``), applied to c rows in one vmapped backward:
      cheap per row for small models, where per-call overhead dominates;
    - ``"loop"``: a plain autograd graph (``create_graph=True``, about half the cost of building the first),
      applied row by row: for a few rows, and for large models, where vmap's batched kernels can cost more per
      row than separate backwards.

    :func:`choose_hvp` picks the method per model by measuring both.
    """

    METHODS = ("vmap", "loop")

    def __init__(
        self,
        method: HvpMethod,
        vjp_fn: Callable | None = None,
        graph: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        self.method, self._vjp, self._graph = method, vjp_fn, graph

    def __call__(self, vectors: torch.Tensor) -> torch.Tensor:
        if self._vjp is not None:
            return vmap(self._vjp)(vectors)[0]
        assert self._graph is not None  # built for "loop": the gradient and its leaf
        gradient, theta = self._graph
        if not gradient.requires_grad:  # a loss linear in θ: no curvature
            return torch.zeros_like(vectors)
        rows = [torch.autograd.grad(gradient, theta, v, retain_graph=True, allow_unused=True)[0] for v in vectors]
        return torch.stack([torch.zeros_like(v) if r is None else r for r, v in zip(rows, vectors)])


@dataclass(frozen=True)
class HvpChoice:
    """``method`` (``"vmap"`` | ``"loop"``) and ``rows`` per call; ``seconds``: what was measured
    (``{"loop build": s, "loop/row": s, "vmap build": s, "vmap×4/row": s, ...}``; empty when not measured)."""

    method: HvpMethod
    rows: int
    seconds: dict[str, float] = field(default_factory=dict)

    def step_seconds(self, num_rows: int) -> float | None:
        """The measured time of one step's HVPs over ``num_rows`` rows with this choice (its graph built once, then the
        rows at its measured cost per row); None when nothing was measured."""
        if self.method == "loop" and "loop/row" in self.seconds:
            return self.seconds.get("loop build", 0.0) + num_rows * self.seconds["loop/row"]
        per_row = self.seconds.get(f"vmap×{self.rows}/row")
        if self.method == "vmap" and per_row is not None:
            calls = math.ceil(num_rows / max(1, self.rows))
            return self.seconds.get("vmap build", 0.0) + calls * self.rows * per_row
        return None

    def __str__(self) -> str:
        measured = ", ".join(f"{name} {s * 1e3:.2f} ms" for name, s in self.seconds.items())
        return f"{self.method} over {self.rows} row(s)" + (f" ({measured})" if measured else "")


def _best_of(fn: Callable[[], object], clock: Callable[[], float], repeats: int = 2) -> float:
    fn()  # the first call at a new size pays one-off costs (kernel plans, allocator): not timed
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        fn()
        best = min(best, clock() - start)
    return best


def _vmap_rows(hvp: Hvp, states: torch.Tensor, max_rows: int, budget: float, clock, seconds: dict) -> int:
    """Grow vmap's rows ×4 (2, 8, 32, ...) while it gets cheaper per row and a call stays within ``budget``.

    A wider call within ``TIE`` of the best cost per row wins: fewer calls mean less per-chunk work in the engine,
    and differences that small are within the timing noise of a loaded machine."""
    k = states.shape[0]  # the rows available to measure on
    rows, best_rows, previous = min(2, max_rows, k), 0, float("inf")
    while True:

        def call(r: int = rows) -> torch.Tensor:
            return hvp(states[:r])

        per_row = _best_of(call, clock) / rows
        seconds[f"vmap×{rows}/row"] = per_row
        if best_rows == 0 or per_row <= (1 + TIE) * seconds[f"vmap×{best_rows}/row"]:
            best_rows = rows
        grown = min(rows * 4, max_rows, k)
        if grown == rows or per_row > (1 + TIE) * previous or per_row * grown > budget:
            return best_rows  # the widest allowed, wider stopped paying, or the next call would take too long
        rows, previous = grown, per_row


def choose_hvp(
    build: Build,
    states: torch.Tensor,
    max_rows: int,
    budget_seconds: float = 1.0,
    clock: Callable[[], float] = time.perf_counter,
    num_rows: int | None = None,
) -> HvpChoice:
    """Time both methods on rows of ``states`` (``Tensor[r, p]``) and return the one whose whole step over
    ``num_rows`` rows (default r) costs least: building its graph once, plus the rows at its measured cost per
    row (vmap at its best row count ≤ ``max_rows``). The measurement costs a few HVP calls of the sizes tried.
    A model that vmap cannot batch (a kernel without a batching rule: ``nn.LSTM``, ``nn.GRU``) gets the loop."""
    k, seconds = num_rows or states.shape[0], {}
    loop = build("loop")
    seconds["loop build"] = _best_of(lambda: build("loop"), clock)
    seconds["loop/row"] = _best_of(lambda: loop(states[:1]), clock)
    try:
        vmapped = build("vmap")
        seconds["vmap build"] = _best_of(lambda: build("vmap"), clock)
        rows = _vmap_rows(vmapped, states, max_rows, budget_seconds, clock, seconds)
    except RuntimeError as err:
        if "Batching rule not implemented" not in str(err) and "vmap" not in str(err):
            raise
        return HvpChoice("loop", max(1, min(max_rows, k)), seconds)
    per_step_loop = seconds["loop build"] + k * seconds["loop/row"]
    per_step_vmap = seconds["vmap build"] + math.ceil(k / rows) * rows * seconds[f"vmap×{rows}/row"]
    if per_step_loop <= per_step_vmap:
        return HvpChoice("loop", max(1, min(max_rows, k)), seconds)
    return HvpChoice("vmap", rows, seconds)
