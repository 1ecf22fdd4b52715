"""Many query examples at the price of the directions their gradients span ([concepts.md: Many queries]).

The adjoint sweep is linear in the vectors it is seeded with: the scores of query example i are ⟨g_i, δθ_j⟩ summed
through the run, so if the examples' gradients G (``Tensor[n, p + q]``: θ's p entries, then the running buffers' q)
are G = C V with V's r rows orthonormal, sweeping the r rows of V and mapping the r score rows back with C gives all
n rows. With r = rank(G) that is exact; a truncated SVD keeping the share ``energy`` of ‖G‖²_F sweeps fewer rows and
approximates, which the result says, with its error measured on exact rows swept alongside. Nothing here knows
Lightning.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QuerySketch:
    """G ≈ ``coefficients`` @ ``directions``: ``coefficients: Tensor[n, r]`` (U_r S_r), ``directions: Tensor[r, d]``
    (orthonormal rows V_r), keeping the share ``kept`` of ‖G‖²_F (1.0 when r is G's rank)."""

    coefficients: torch.Tensor
    directions: torch.Tensor
    kept: float

    @property
    def rank(self) -> int:
        return int(self.directions.shape[0])

    @classmethod
    def of(cls, gradients: torch.Tensor, energy: float = 1.0) -> QuerySketch:
        """The smallest rank whose singular values keep ``energy`` (in (0, 1]) of ‖G‖²_F; ``energy=1``: the rank of G
        (singular values above float rounding)."""
        if not 0 < energy <= 1:
            raise ValueError(f"energy must lie in (0, 1], got {energy!r}.")
        g = gradients.to(torch.float64)
        u, s, vh = torch.linalg.svd(g, full_matrices=False)
        share = (s**2).cumsum(0) / (s**2).sum().clamp_min(torch.finfo(torch.float64).tiny)
        rank = int((s > s.max() * max(g.shape) * torch.finfo(torch.float64).eps).sum()) if s.numel() else 0
        if energy < 1:
            rank = min(rank, int((share < energy).sum()) + 1)
        rank = max(rank, 1)
        kept = float(share[rank - 1]) if s.numel() else 1.0
        dtype = gradients.dtype
        return cls((u[:, :rank] * s[:rank]).to(dtype), vh[:rank].to(dtype), kept)

    def expand(self, table: torch.Tensor) -> torch.Tensor:
        """The n examples' score rows ``Tensor[n, N]`` from the directions' ``table: Tensor[r, N]``."""
        return self.coefficients.to(table) @ table


def check_rows(num_examples: int, count: int, seed: int = 0) -> torch.Tensor:
    """``LongTensor[min(count, n)]``: the examples swept exactly beside a sketch, to measure its error."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(num_examples, generator=generator)[: min(count, num_examples)].sort().values


def sketch_error(approximate: torch.Tensor, exact: torch.Tensor) -> float:
    """max |approximate − exact| / max |exact| over the checked rows (0 when both are 0)."""
    scale = float(exact.abs().max()) if exact.numel() else 0.0
    diff = float((approximate - exact).abs().max()) if exact.numel() else 0.0
    return diff / scale if scale > 0 else diff
