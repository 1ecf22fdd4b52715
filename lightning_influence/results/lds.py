"""The linear datamodeling score (LDS): how well additive influence scores predict retraining on random subsets.

Over M random subsets S_m of the scored training samples (each keeps ⌊α·k⌋ of the k scored samples, α = ``fraction``),
the scores predict the change of the query when the complement R_m is removed, with the package's sign convention
(negative = harmful)::

    f(θ_{−R_m}) − f(θ) ≈ Σ_{j ∈ R_m} score_j                 (predicted_changes)

The actual value is the query loss of a model retrained on S_m (the caller trains it). The LDS of one query example
is the Spearman correlation, over the M subsets, between predicted and actual; the report's ``mean`` averages it
over the query examples. f(θ) is a constant over the subsets, so the rank correlation does not need it.

Pure maths: nothing here knows Lightning.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from torchmetrics.functional import spearman_corrcoef

__all__ = ["LDSReport", "LDSVariant", "lds_from", "predicted_changes", "subset_masks"]

LDSVariant = Literal["same-seed", "fresh-seed"]
"""``"same-seed"``: every subset model starts from the same initial weights and sees the same batches, the removed
samples at weight 0 (the counterfactual the tracker models). ``"fresh-seed"``: a new seed per subset model."""

VARIANTS = ("same-seed", "fresh-seed")


@dataclass(frozen=True, eq=False)
class LDSReport:
    """The linear datamodeling score of a set of influence scores.

    Attributes:
        mean: the LDS, the Spearman correlation over the subsets between predicted and actual query values,
            averaged over the query examples (those whose correlation is defined); ``nan`` when none is.
        stderr: the standard error of ``mean`` from a bootstrap over the subsets (the M subsets resampled with
            replacement, ``mean`` recomputed, the standard deviation of those means): the subsets are the
            sampling noise that every query example shares, so it applies with a single query example as well.
            ``nan`` when fewer than 2 bootstrap means are defined.
        per_example: float64 ``Tensor[n]``, the LDS of each query example (``nan`` where a column of predicted
            or actual values is constant or not finite).
        num_subsets: M, how many subset models were trained.
        fraction: α, the fraction of the scored samples each subset keeps.
        variant: ``"same-seed"`` or ``"fresh-seed"`` (:data:`LDSVariant`).
        predicted: float64 ``Tensor[M, n]``, Σ of the removed samples' scores per subset and example (or None).
        actual: float64 ``Tensor[M, n]``, the query loss of each subset model per example (or None).

    Reports compare by identity (their tensors have no single truth value).
    """

    mean: float
    stderr: float
    per_example: torch.Tensor
    num_subsets: int
    fraction: float
    variant: str = "same-seed"
    predicted: torch.Tensor | None = None
    actual: torch.Tensor | None = None

    def __str__(self) -> str:
        n = self.per_example.numel()
        examples = "1 query example" if n == 1 else f"{n} query examples"
        spread = ""
        finite = self.per_example[torch.isfinite(self.per_example)]
        if n > 1 and finite.numel():
            spread = f", per example {float(finite.min()):+.3f} .. {float(finite.max()):+.3f}"
        return (
            f"LDS {self.mean:+.3f} ± {self.stderr:.3f} (bootstrap s.e. over subsets; {self.variant},"
            f" {self.num_subsets} subsets keeping {self.fraction:g} of the samples, {examples}{spread})"
        )


def subset_masks(num_samples: int, num_subsets: int, fraction: float = 0.5, seed: int = 0) -> torch.Tensor:
    """``BoolTensor[M, N]``: row m marks the samples subset m keeps, ``⌊fraction · N⌋`` of them drawn uniformly
    without replacement, reproducible from ``seed`` (rows drawn independently)."""
    if num_subsets < 1:
        raise ValueError(f"num_subsets must be at least 1, got {num_subsets}.")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must lie strictly between 0 and 1, got {fraction}.")
    keep = int(math.floor(fraction * num_samples))
    if keep < 1 or keep >= num_samples:
        raise ValueError(
            f"fraction={fraction} of {num_samples} samples keeps {keep}: a subset must keep at least one sample and"
            " remove at least one."
        )
    gen = torch.Generator().manual_seed(seed)
    masks = torch.zeros(num_subsets, num_samples, dtype=torch.bool)
    for m in range(num_subsets):
        masks[m, torch.randperm(num_samples, generator=gen)[:keep]] = True
    return masks


def predicted_changes(scores: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The additive prediction of each subset model's change, ``Σ_{j removed} score_j`` (``Tensor[M, n]``, float64).

    Args:
        scores: ``Tensor[N]`` (one query) or ``Tensor[N, n]`` (one column per query example), the scores
            f(θ_-j) − f(θ) of the N samples the masks index (negative = harmful).
        masks: ``BoolTensor[M, N]``, True where subset m keeps the sample (as :func:`subset_masks`).

    Removing harmful samples (negative scores) predicts a lower query loss: a negative change.
    """
    table = scores.detach().to(torch.float64)
    if table.dim() == 1:
        table = table[:, None]
    if table.dim() != 2 or masks.dim() != 2 or masks.shape[1] != table.shape[0]:
        raise ValueError(
            f"scores of shape {tuple(scores.shape)} do not match masks of shape {tuple(masks.shape)}:"
            " expected scores [N] or [N, n] and masks [M, N]."
        )
    removed = (~masks.bool()).to(torch.float64).to(table.device)
    return removed @ table


def _spearman_columns(predicted: torch.Tensor, actual: torch.Tensor) -> torch.Tensor:
    """Spearman per column (torchmetrics), float64 ``Tensor[n]``; ``nan`` for a constant or non-finite column."""
    valid = (
        torch.isfinite(predicted).all(dim=0)
        & torch.isfinite(actual).all(dim=0)
        & (predicted.amax(dim=0) > predicted.amin(dim=0))
        & (actual.amax(dim=0) > actual.amin(dim=0))
    )
    out = torch.full((predicted.shape[1],), math.nan, dtype=torch.float64)
    if valid.any():
        cols = valid.nonzero().flatten()
        with warnings.catch_warnings():  # torchmetrics warns about low-variance inputs; handled above
            warnings.simplefilter("ignore")
            rho = spearman_corrcoef(predicted[:, cols], actual[:, cols])
        out[cols] = rho.reshape(-1).to(torch.float64).cpu()
    return out


def lds_from(
    predicted: torch.Tensor,
    actual: torch.Tensor,
    fraction: float = 0.5,
    variant: str = "same-seed",
    num_bootstrap: int = 200,
    seed: int = 0,
) -> LDSReport:
    """The LDS of predicted against actual query values (both ``Tensor[M, n]`` or ``Tensor[M]``).

    ``per_example[i]`` is the Spearman correlation (torchmetrics) of column i over the M subsets; ``mean`` its
    average over the defined columns; ``stderr`` the standard deviation of ``mean`` over ``num_bootstrap`` resamples
    of the M subsets (with replacement, reproducible from ``seed``). ``fraction`` and ``variant`` are recorded.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}.")
    predicted, actual = predicted.detach().to(torch.float64).cpu(), actual.detach().to(torch.float64).cpu()
    if predicted.dim() == 1:
        predicted = predicted[:, None]
    if actual.dim() == 1:
        actual = actual[:, None]
    if predicted.shape != actual.shape or predicted.dim() != 2:
        raise ValueError(
            f"predicted {tuple(predicted.shape)} and actual {tuple(actual.shape)} must both be [M, n] (or [M])."
        )
    num_subsets = predicted.shape[0]
    if num_subsets < 3:
        raise ValueError(f"A rank correlation over subsets needs at least 3 subsets, got {num_subsets}.")
    per_example = _spearman_columns(predicted, actual)
    gen = torch.Generator().manual_seed(seed)
    means = []
    for _ in range(num_bootstrap):
        rows = torch.randint(0, num_subsets, (num_subsets,), generator=gen)
        means.append(float(torch.nanmean(_spearman_columns(predicted[rows], actual[rows]))))
    boot = torch.tensor(means, dtype=torch.float64)
    boot = boot[torch.isfinite(boot)]
    stderr = float(boot.std()) if boot.numel() >= 2 else math.nan
    return LDSReport(
        mean=float(torch.nanmean(per_example)),
        stderr=stderr,
        per_example=per_example,
        num_subsets=num_subsets,
        fraction=float(fraction),
        variant=variant,
        predicted=predicted,
        actual=actual,
    )
