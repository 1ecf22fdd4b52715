"""The per-sample terms of a batch's rows: each tracked row's gradient ∇ℓ_r(θ) and HVP ∇²ℓ_r(θ) v_r (``Tensor[m, p]``).

Two ways, the same numbers on a model whose rows are independent functions of θ (``tests/autodiff/
test_coupled_terms.py``):

- :func:`per_row_terms`: each row gets its own copy of θ and its own forward (vmapped over the rows);
- :func:`batch_forward_terms`: one forward of the whole batch, where row r's loss is the one the batch computed (its
  random draws): for models that draw (dropout) or hold recurrent layers ([concepts.md: Random draws]).

``losses_of(θ, batch) -> Tensor[B]`` is the batch's per-sample losses; ``sample_loss_of(θ, sample, in_dims)`` one
sample's loss under ``vmap``. Nothing here knows Lightning.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.func import vmap
from torch.utils._pytree import tree_map

LossesOf = Callable[[torch.Tensor, Any], torch.Tensor]
SampleLossOf = Callable[[torch.Tensor, Any, Any], torch.Tensor]


def _is_batched(t: Any, batch_size: int) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == batch_size


def rows_of(batch: Any, index: torch.Tensor, batch_size: int) -> tuple[Any, Any]:
    """Rows ``index`` of every tensor of ``batch`` whose first dimension is the batch dimension, and the
    matching ``vmap`` ``in_dims`` (0 for those tensors, None for everything else, kept whole)."""
    sub = tree_map(lambda t: t[index] if _is_batched(t, batch_size) else t, batch)
    in_dims = tree_map(lambda t: 0 if _is_batched(t, batch_size) else None, batch)
    return sub, in_dims


def per_row_terms(
    losses_of: LossesOf,
    sample_loss_of: SampleLossOf,
    theta: torch.Tensor,
    batch: Any,
    rows: torch.Tensor,
    batch_size: int,
    vectors: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(∇ℓ_r(θ): Tensor[m, p], ∇²ℓ_r(θ) v_r: Tensor[m, p] or None)`` for the batch rows ``rows`` (``vectors:
    Tensor[m, p]``; None: the gradients alone).

    Each row gets its own copy of θ (``Tensor[m, p]``), and row r's loss depends on copy r alone, so one
    plain backward of the summed losses gives every row's gradient, and one more every row's HVP. Only the
    forward is vmapped (over rows and copies): about 30% cheaper than ``vmap ∘ vjp ∘ grad``, and for one
    row no transform at all."""
    sub, in_dims = rows_of(batch, rows, batch_size)
    m = rows.numel()
    copies = theta.detach().expand(m, -1).clone().requires_grad_(True)
    with torch.enable_grad():
        if m == 1:
            losses = losses_of(copies[0], sub)
        else:
            losses = vmap(lambda t, s: sample_loss_of(t, s, in_dims), in_dims=(0, in_dims))(copies, sub)
        (g,) = torch.autograd.grad(losses.sum(), copies, create_graph=vectors is not None)
        if vectors is None:
            return g.detach(), None
        h = None  # stays None for a loss linear in θ (no curvature)
        if g.requires_grad:
            (h,) = torch.autograd.grad(g, copies, vectors.to(g), allow_unused=True)
    return g.detach(), torch.zeros_like(vectors) if h is None else h


def batch_forward_terms(
    losses_of: LossesOf, theta: torch.Tensor, batch: Any, rows: torch.Tensor, vectors: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(∇ℓ_r(θ): Tensor[m, p], ∇²ℓ_r(θ) v_r: Tensor[m, p] or None)`` for the batch rows ``rows``, where ℓ_r is
    row r's loss *as the whole batch computed it* (its random draws): the derivative of the batch loss with
    respect to row r's weight, times |B| ([concepts.md: Random draws]). One forward of the batch; the rows'
    gradients are one backward vectorised over the rows, their HVPs a double backward per row."""
    leaf = theta.detach().requires_grad_(True)
    with torch.enable_grad():
        losses = losses_of(leaf, batch)
        if vectors is None:  # gradients alone: one backward vectorised over the rows
            m = rows.numel()
            pick = torch.zeros(m, losses.numel(), dtype=losses.dtype, device=losses.device)
            pick[torch.arange(m, device=losses.device), rows.to(losses.device)] = 1
            return rows_backward(losses, leaf, pick, create_graph=False).detach(), None
        # gradient and HVP row by row: each double backward then runs through its own row's graph only
        # (vectorised, or all rows' gradients first, every double backward runs through all m graphs)
        g, h = torch.zeros_like(vectors), torch.zeros_like(vectors)
        for i, r in enumerate(rows.tolist()):
            (g_r,) = torch.autograd.grad(losses[r], leaf, retain_graph=True, create_graph=True, allow_unused=True)
            if g_r is None:
                continue
            g[i] = g_r.detach()
            if g_r.requires_grad:  # a loss linear in θ has no curvature
                (h_r,) = torch.autograd.grad(g_r, leaf, vectors[i].to(g_r), retain_graph=True, allow_unused=True)
                if h_r is not None:
                    h[i] = h_r
    return g, h


def rows_backward(outputs: torch.Tensor, leaf: torch.Tensor, pick: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """``Tensor[m, p]``: row r is the gradient of ``⟨pick[r], outputs⟩`` with respect to ``leaf``; one backward
    vectorised over the rows, or a loop of them where an operation has no batching rule."""
    try:
        (g,) = torch.autograd.grad(
            outputs, leaf, pick, retain_graph=True, create_graph=create_graph, is_grads_batched=True, allow_unused=True
        )
        rows = [g] if g is not None else []
    except RuntimeError:  # an operation without a batching rule: one backward per row
        rows = []
        for weights in pick:
            (r,) = torch.autograd.grad(outputs, leaf, weights, retain_graph=True, create_graph=create_graph,
                                       allow_unused=True)  # fmt: skip
            rows.append(torch.zeros_like(leaf) if r is None else r.unsqueeze(0))
    if not rows:  # ``outputs`` does not depend on ``leaf``
        return torch.zeros(pick.shape[0], leaf.numel(), dtype=leaf.dtype, device=leaf.device)
    return rows[0] if len(rows) == 1 and rows[0].dim() == 2 else torch.cat([r.reshape(1, -1) for r in rows])


def map_rows(fn: Callable[..., Any], *rows: Any, randomness: str = "error") -> Any:
    """``torch.func.vmap(fn, randomness=randomness)(*rows)``; where an operation has no batching rule (``nn.LSTM``,
    ``nn.GRU``), the same numbers from a loop over the rows, stacked (every argument is batched along dim 0: a
    tensor, or a list of tensors)."""
    try:
        return vmap(fn, randomness=randomness)(*rows)
    except RuntimeError as err:
        if "Batching rule not implemented" not in str(err):
            raise
    first = rows[0]
    count = (first[0] if isinstance(first, (list, tuple)) else first).shape[0]

    def row(i: int) -> list[Any]:
        return [[t[i] for t in r] if isinstance(r, (list, tuple)) else r[i] for r in rows]

    return torch.stack([fn(*row(i)) for i in range(count)])
