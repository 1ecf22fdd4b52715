"""Influence-dynamics patterns ([concepts.md: Time windows]): how a sample's influence on one query evolves over time.

Input: the DIT window scores of one query, ``window_scores: Tensor[W, k]`` (``W`` windows in time
order, ``k`` tracked samples; see :meth:`lightning_influence.results.windows.WindowRecorder.window_matrix`).
The sign is that of [concepts.md: The counterfactual run]: **negative = harmful** (the sample's training during that
window raised the query loss), **positive = helpful**.

The rule, applied to every sample at once (vectorised over ``k``):

1. **Standardise each window across samples.** For window ``t``,
   ``z[t, j] = (s[t, j] − mean_j s[t]) / std_j s[t]`` with the population standard deviation
   (divisor ``k``). A window whose scores are all equal (all zero, a single tracked sample, or a
   spread below float64 round-off, ``std ≤ 1e3·eps·max|s[t]|``) gives ``z[t] = 0``. Since ``z`` is
   computed per window, scaling a window by a positive constant or shifting it by a constant changes
   nothing.
2. **Sign flips.** The sign of ``z[t, j]`` is +1, −1, or 0 when ``|z[t, j]| ≤ sign_tolerance``
   (default 0.5: a sample within half a standard deviation of the window's mean has no side). A zero
   neither flips nor breaks a run: a flip is
   counted at window ``t`` when ``z[t, j]`` has a sign and it is opposite to the last sign the
   sample had before ``t`` (so ``+, 0, −`` is one flip). ``flip_rate = flips / (W − 1)``, the
   fraction of the ``W − 1`` transitions that flip (0 when ``W = 1``). The sample is
   **"fluctuating"** if ``flip_rate ≥ fluctuation_threshold`` (default 0.5: at least half).
3. **Trend of |z|** (only when not fluctuating). An ordinary least-squares line
   ``|z[t, j]| ≈ a + b·t`` against the window index ``t = 0 .. W−1`` (the index, not the step: windows
   of unequal length weigh the same), with slope ``b`` (``slope``) and its t-statistic
   ``b / se(b)``, ``se(b)² = (Σ residual² / (W − 2)) / Σ (t − t̄)²`` (``trend``). A zero residual
   (|z| exactly on a line) gives ``trend = ±inf`` if ``b ≠ 0`` and 0 if ``b = 0``. The trend is
   significant when ``|trend| ≥ trend_threshold`` (default 2.0) **and** ``|b| ≥ min_slope``
   (default 0.01 z-units per window, so that a negligible drift, or round-off on a line, is not a
   trend): **"early"** if ``b < 0`` (the sample mattered early and fades), **"late"** if ``b > 0``
   (it matters more and more towards convergence).
4. Otherwise **"stable"**.

With ``W < 3`` the slope has no residual degrees of freedom and cannot be tested: ``trend`` is 0 and
nothing is early or late (``slope`` is still reported: ``|z[1]| − |z[0]|`` for ``W = 2``, 0 for
``W = 1``). With ``W = 1`` there is no transition either, so every sample is "stable".

``trend_threshold`` is a plain cut-off on the t-statistic, not a p-value: with few windows (few
degrees of freedom) 2.0 is lenient, with many it is about a two-sided 5 % test. Pure torch; nothing
here knows Lightning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

PATTERNS = ("stable", "early", "late", "fluctuating")

# A window is "all equal" when its spread is below this many float64 ulps of its largest magnitude.
_CONSTANT_WINDOW_RTOL = 1e3 * torch.finfo(torch.float64).eps


@dataclass(frozen=True)
class InfluencePatterns:
    """The influence-dynamics pattern of each tracked sample on one query.

    Attributes:
        sample_ids: ``LongTensor[k]``, tracked training-set ids (same order as the other fields).
        labels: ``list[str]`` of length ``k``, each one of :data:`PATTERNS`.
        flip_rate: ``Tensor[k]`` (float64), fraction of the ``W − 1`` window transitions in which the
            sign of the sample's z-score flips (0 when ``W = 1``).
        trend: ``Tensor[k]`` (float64), t-statistic of the least-squares slope of ``|z|`` against the
            window index (±inf for an exact line, 0 when ``W < 3``). Negative = fading.
        slope: ``Tensor[k]`` (float64), that slope, in z-units per window.
        num_windows: ``W``, the number of windows the patterns were read from.
    """

    sample_ids: torch.Tensor
    labels: list[str]
    flip_rate: torch.Tensor
    trend: torch.Tensor
    slope: torch.Tensor
    num_windows: int = 0

    def __len__(self) -> int:
        return self.sample_ids.numel()

    def _mask(self, pattern: str) -> torch.Tensor:
        if pattern not in PATTERNS:
            raise ValueError(f"Unknown pattern {pattern!r}; expected one of {PATTERNS}.")
        return torch.tensor([label == pattern for label in self.labels], dtype=torch.bool)

    def ids(self, pattern: str) -> torch.Tensor:
        """``LongTensor``: the ids of the samples labelled ``pattern``, in tracking order."""
        return self.sample_ids[self._mask(pattern)]

    def counts(self) -> dict[str, int]:
        """How many samples carry each pattern; every name of :data:`PATTERNS` is a key."""
        counts = dict.fromkeys(PATTERNS, 0)
        for label in self.labels:
            counts[label] += 1
        return counts

    def as_dict(self) -> dict[int, str]:
        """``{sample_id: pattern}``."""
        return dict(zip(self.sample_ids.tolist(), self.labels))

    def __repr__(self) -> str:
        counts = ", ".join(f"{name}={n}" for name, n in self.counts().items())
        return f"InfluencePatterns(k={len(self)}, windows={self.num_windows}: {counts})"


def _check_number(name: str, value: float, *, low: float, low_inclusive: bool, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {value!r}.")
    value = float(value)
    above = value >= low if low_inclusive else value > low
    if math.isnan(value) or not above or value > high:
        bound = "≥" if low_inclusive else ">"
        upper = f" and ≤ {high}" if math.isfinite(high) else ""
        raise ValueError(f"{name} must be {bound} {low}{upper}, got {value!r}.")
    return value


def _check_inputs(window_scores: torch.Tensor, sample_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(window_scores, torch.Tensor):
        raise TypeError(f"window_scores must be a torch.Tensor[W, k], got {type(window_scores).__name__}.")
    if window_scores.dim() != 2:
        raise ValueError(
            f"window_scores must be 2-D, Tensor[W, k] (one row per window), got shape {tuple(window_scores.shape)}."
        )
    if window_scores.dtype == torch.bool or window_scores.is_complex():
        raise TypeError(f"window_scores must be real-valued, got dtype {window_scores.dtype}.")
    num_windows, k = window_scores.shape
    if num_windows == 0:
        raise ValueError("window_scores has no windows (W = 0): no window of this query has closed yet.")
    scores = window_scores.detach().to(device="cpu", dtype=torch.float64)
    finite = torch.isfinite(scores)
    if not bool(finite.all()):
        bad = (~finite).nonzero()
        raise ValueError(
            f"window_scores holds {bad.shape[0]} non-finite value(s) (NaN or inf), the first in window "
            f"{int(bad[0, 0])}, sample column {int(bad[0, 1])}."
        )

    if sample_ids is None:
        ids = torch.arange(k, dtype=torch.long)
    else:
        if not isinstance(sample_ids, torch.Tensor):
            raise TypeError(f"sample_ids must be a LongTensor[k] or None, got {type(sample_ids).__name__}.")
        if sample_ids.dtype == torch.bool or sample_ids.is_floating_point() or sample_ids.is_complex():
            raise TypeError(f"sample_ids must hold integers, got dtype {sample_ids.dtype}.")
        if sample_ids.dim() != 1 or sample_ids.numel() != k:
            raise ValueError(
                f"sample_ids must be 1-D with one id per column of window_scores (k = {k}), "
                f"got shape {tuple(sample_ids.shape)}."
            )
        ids = sample_ids.detach().to(device="cpu", dtype=torch.long).clone()
        if torch.unique(ids).numel() != k:
            raise ValueError("sample_ids contains duplicates.")
    return scores, ids


def window_zscores(scores: torch.Tensor) -> torch.Tensor:
    """``Tensor[W, k]``: each row of ``scores: Tensor[W, k]`` standardised across its ``k`` samples
    (population std); a row whose values are all equal (to float64 round-off) gives zeros."""
    mean = scores.mean(dim=1, keepdim=True)
    std = scores.std(dim=1, correction=0, keepdim=True)
    scale = scores.abs().amax(dim=1, keepdim=True)
    all_equal = scores.amax(dim=1, keepdim=True) == scores.amin(dim=1, keepdim=True)
    constant = all_equal | (std <= _CONSTANT_WINDOW_RTOL * scale)
    return torch.where(constant, torch.zeros_like(scores), (scores - mean) / torch.where(constant, 1.0, std))


def sign_flip_rate(z: torch.Tensor, sign_tolerance: float = 0.0) -> torch.Tensor:
    """``Tensor[k]``: the fraction of the ``W − 1`` transitions of ``z: Tensor[W, k]`` in which the sign
    flips. ``|z| ≤ sign_tolerance`` has no sign; a flip is a signed entry opposite to the last signed
    entry before it (zeros are skipped, not counted as flips). 0 when ``W = 1``."""
    num_windows, k = z.shape
    if num_windows < 2:
        return torch.zeros(k, dtype=z.dtype)
    sign = torch.where(z.abs() > sign_tolerance, torch.sign(z), torch.zeros_like(z))
    # Index of the last signed window at or before t (−1 if none yet), then its sign (0 if none).
    rows = torch.arange(num_windows).unsqueeze(1).expand(num_windows, k)
    last = torch.where(sign != 0, rows, torch.full_like(rows, -1)).cummax(dim=0).values
    carried = torch.where(last >= 0, sign.gather(0, last.clamp(min=0)), torch.zeros_like(sign))
    flips = (sign[1:] * carried[:-1]) < 0
    return flips.sum(dim=0).to(z.dtype) / (num_windows - 1)


def abs_z_trend(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(slope, t)``, each ``Tensor[k]``: the OLS slope of ``|z|`` (``z: Tensor[W, k]``) against the
    window index and its t-statistic (±inf on an exact line with a non-zero slope; ``t`` is 0 when
    ``W < 3``, ``slope`` is 0 when ``W = 1``)."""
    num_windows, k = z.shape
    if num_windows < 2:
        return torch.zeros(k, dtype=z.dtype), torch.zeros(k, dtype=z.dtype)
    y = z.abs()
    x = torch.arange(num_windows, dtype=z.dtype) - (num_windows - 1) / 2  # centred index
    sxx = (x * x).sum()
    yc = y - y.mean(dim=0, keepdim=True)
    slope = (x @ yc) / sxx
    if num_windows < 3:
        return slope, torch.zeros(k, dtype=z.dtype)
    residual = yc - x.unsqueeze(1) * slope.unsqueeze(0)
    se = torch.sqrt((residual * residual).sum(dim=0) / (num_windows - 2) / sxx)
    exact = torch.where(slope != 0, torch.sign(slope) * math.inf, torch.zeros_like(slope))
    t = torch.where(se > 0, slope / torch.where(se > 0, se, 1.0), exact)
    return slope, t


def classify_patterns(
    window_scores: torch.Tensor,
    sample_ids: torch.Tensor | None = None,
    *,
    fluctuation_threshold: float = 0.5,
    trend_threshold: float = 2.0,
    min_slope: float = 0.01,
    sign_tolerance: float = 0.5,
) -> InfluencePatterns:
    """Label each tracked sample "stable", "early", "late" or "fluctuating" ([concepts.md: Time windows]).

    Args:
        window_scores: ``Tensor[W, k]``, the DIT window scores of one query, one row per window in
            time order (``W ≥ 1``), one column per tracked sample. Negative = harmful, positive =
            helpful. Any real dtype and device; the work is done on the CPU in float64.
        sample_ids: ``LongTensor[k]`` (distinct integers), the ids of the columns; ``None`` gives
            ``0 .. k−1``.
        fluctuation_threshold: in (0, 1]; "fluctuating" when the sign of the sample's z-score flips
            in at least this fraction of the ``W − 1`` transitions. Default 0.5.
        trend_threshold: > 0 (``inf`` disables early/late); the trend of ``|z|`` is significant when
            the absolute t-statistic of its least-squares slope is at least this. Default 2.0.
        min_slope: ≥ 0, finite; a significant trend must also change ``|z|`` by at least this many
            z-units per window. Default 0.01.
        sign_tolerance: ≥ 0, finite; a z-score with ``|z| ≤ sign_tolerance`` has no sign (cannot flip
            nor be flipped from). Default 0.5: within half a standard deviation of the window's mean
            a sample's side of the mean is noise, and counting it would call most samples fluctuating.

    Returns:
        :class:`InfluencePatterns` on the CPU, in the column order of ``window_scores``.

    Raises:
        TypeError: ``window_scores`` or ``sample_ids`` is not a tensor of a usable dtype, or a
            threshold is not a real number.
        ValueError: wrong shapes, ``W = 0``, non-finite scores, duplicate ids, or a threshold out of
            range.

    The full rule (z-scores per window, how zeros count, the zero-residual case, ``W < 3``) is in
    this module's docstring and ``docs/patterns.md``.
    """
    fluctuation_threshold = _check_number(
        "fluctuation_threshold", fluctuation_threshold, low=0.0, low_inclusive=False, high=1.0
    )
    trend_threshold = _check_number("trend_threshold", trend_threshold, low=0.0, low_inclusive=False)
    min_slope = _check_number("min_slope", min_slope, low=0.0, low_inclusive=True)
    sign_tolerance = _check_number("sign_tolerance", sign_tolerance, low=0.0, low_inclusive=True)
    for name, value in (("min_slope", min_slope), ("sign_tolerance", sign_tolerance)):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value!r}.")
    scores, ids = _check_inputs(window_scores, sample_ids)
    num_windows, k = scores.shape

    z = window_zscores(scores) if k > 0 else scores
    flip_rate = sign_flip_rate(z, sign_tolerance)
    slope, trend = abs_z_trend(z)

    fluctuating = flip_rate >= fluctuation_threshold
    significant = (trend.abs() >= trend_threshold) & (slope.abs() >= min_slope) & (num_windows >= 3)
    early = ~fluctuating & significant & (slope < 0)
    late = ~fluctuating & significant & (slope > 0)
    code = torch.zeros(k, dtype=torch.long)  # 0 = stable
    code[early] = 1
    code[late] = 2
    code[fluctuating] = 3
    labels = [PATTERNS[c] for c in code.tolist()]
    return InfluencePatterns(ids, labels, flip_rate, trend, slope, num_windows)


__all__ = ["PATTERNS", "InfluencePatterns", "abs_z_trend", "classify_patterns", "sign_flip_rate", "window_zscores"]
