"""The audit's maths ([concepts.md: The exact counterfactual]): how well the main estimator's scores follow the exact
counterfactual.

An audit tracks a few training samples with the ``"exact"`` estimator next to the main one. For a
query and a window (or the whole run) it compares, per audited sample j, the estimate with the
exact score f(θ_-j) − f(θ) (the sign convention of [concepts.md: The counterfactual run]: negative = harmful). The
numbers are a measurement on the user's own run, not a bound. Nothing here knows Lightning.

Undefined metrics are ``nan``, never an exception: the correlations need at least two samples,
finite scores and non-constant estimates and exact scores.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence, Union

import torch
from torchmetrics.functional import pearson_corrcoef, spearman_corrcoef

__all__ = [
    "NUM_WORST",
    "AuditReport",
    "agreement_metrics",
    "audit_advice",
    "audit_report",
    "poor_agreement_message",
    "window_label",
    "worst_samples",
]

#: How many of the worst-estimated samples a report keeps.
NUM_WORST = 5

TensorLike = Union[torch.Tensor, Sequence[Any]]


def window_label(start_step: int | None, end_step: int | None) -> str:
    """``"steps [s, e)"`` for a window (it covers optimizer steps s .. e − 1), ``"whole run"`` for None."""
    if start_step is None and end_step is None:
        return "whole run"
    if start_step is None:
        return f"steps up to {end_step}"
    if end_step is None:
        return f"steps from {start_step}"
    return f"steps [{start_step}, {end_step})"


def format_number(value: float) -> str:
    """A metric for a table or message: 4 significant digits, ``nan`` spelled out."""
    return "nan" if math.isnan(value) else f"{value:.4g}"


@dataclass(frozen=True, eq=False)
class AuditReport:
    """The agreement of the main estimator with the exact counterfactual, for one query and window.

    Attributes:
        query: the registered query's name.
        sample_ids: ``LongTensor[N]``, the audited training-set ids.
        exact_scores: float64 ``Tensor[N]``, the exact f(θ_-j) − f(θ) (negative = harmful).
        estimated_scores: float64 ``Tensor[N]``, the main estimator's scores for the same ids.
        spearman, pearson: rank and linear correlation of the estimates with the exact scores
            (torchmetrics); ``nan`` when undefined (N < 2, a constant or non-finite input).
        relative_error: ``‖est − exact‖ / ‖exact‖``; ``inf`` when the exact scores are all 0 and the
            estimates are not, 0 when both are (also for N = 0); ``nan`` with non-finite scores.
        sign_agreement: the fraction of samples whose estimate has the exact score's sign (an exact
            0 agrees only with an estimated 0); ``nan`` when N = 0.
        worst: up to :data:`NUM_WORST` ``(id, exact, estimated)`` with the largest ``|est − exact|``,
            largest first (a non-finite difference counts as the largest; ties keep the id order).
        start_step, end_step: the window (optimizer steps ``start_step .. end_step − 1``), or None
            for the whole run.
        estimator: the main estimator's name (``"acc"``, ``"first-order"``, ...).

    Reports compare by identity (their tensors have no single truth value).
    """

    query: str
    sample_ids: torch.Tensor
    exact_scores: torch.Tensor
    estimated_scores: torch.Tensor
    spearman: float
    pearson: float
    relative_error: float
    sign_agreement: float
    worst: list[tuple[int, float, float]]
    start_step: int | None = None
    end_step: int | None = None
    estimator: str = ""

    @property
    def num_samples(self) -> int:
        """N, the number of audited samples."""
        return int(self.sample_ids.numel())

    @property
    def window(self) -> str:
        """The window as text (see :func:`window_label`)."""
        return window_label(self.start_step, self.end_step)

    def __repr__(self) -> str:
        return (
            f"AuditReport(query={self.query!r}, estimator={self.estimator!r}, window={self.window}, "
            f"N={self.num_samples}, spearman={format_number(self.spearman)}, pearson={format_number(self.pearson)}, "
            f"relative_error={format_number(self.relative_error)}, sign_agreement={format_number(self.sign_agreement)})"
        )

    def __str__(self) -> str:
        return f"{self!r}\n{self.advice}"

    @property
    def advice(self) -> str:
        """What the numbers mean for this run and what to do, with the default thresholds of :meth:`is_poor`
        (see :func:`audit_advice`): e.g. ``"Poor agreement ...: relative error 1.1 ...: the linearisation is far
        from the retrained run ...; the ranking is still usable (Spearman 0.93) ... What usually helps here: ..."``."""
        return audit_advice(self)

    def is_poor(self, min_spearman: float = 0.8, max_relative_error: float = 0.5) -> bool:
        """True when the Spearman correlation is below ``min_spearman`` or the relative error above
        ``max_relative_error`` (``inf`` included). An undefined (nan) Spearman is no evidence either
        way; a nan relative error (non-finite scores) with N > 0 counts as poor."""
        low_rank = not math.isnan(self.spearman) and self.spearman < min_spearman
        if math.isnan(self.relative_error):
            return low_rank or self.num_samples > 0
        return low_rank or self.relative_error > max_relative_error


def _informative(values: torch.Tensor) -> bool:
    """Finite and not constant: a correlation with it is defined."""
    return bool(torch.isfinite(values).all()) and bool((values != values[0]).any())


def _correlation(fn: Callable[..., torch.Tensor], estimated: torch.Tensor, exact: torch.Tensor) -> float:
    if estimated.numel() < 2 or not (_informative(estimated) and _informative(exact)):
        return math.nan
    with warnings.catch_warnings():  # torchmetrics warns (and returns nan) on a near-zero variance
        warnings.simplefilter("ignore", UserWarning)
        return float(fn(estimated, exact))


def _relative_error(estimated: torch.Tensor, exact: torch.Tensor) -> float:
    if estimated.numel() == 0:
        return 0.0
    diff, ref = float((estimated - exact).norm()), float(exact.norm())
    if math.isnan(diff) or math.isnan(ref) or math.isinf(ref):
        return math.nan
    if ref == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / ref


def agreement_metrics(exact: torch.Tensor, estimated: torch.Tensor) -> dict[str, float]:
    """``spearman``, ``pearson``, ``relative_error`` and ``sign_agreement`` of ``estimated`` against
    ``exact`` (both ``Tensor[N]``, compared in float64); see :class:`AuditReport` for the definitions."""
    exact = exact.detach().cpu().to(torch.float64).reshape(-1)
    estimated = estimated.detach().cpu().to(torch.float64).reshape(-1)
    n = exact.numel()
    same_sign = torch.sign(estimated) == torch.sign(exact)
    return {
        "spearman": _correlation(spearman_corrcoef, estimated, exact),
        "pearson": _correlation(pearson_corrcoef, estimated, exact),
        "relative_error": _relative_error(estimated, exact),
        "sign_agreement": float(same_sign.to(torch.float64).mean()) if n else math.nan,
    }


def worst_samples(
    sample_ids: torch.Tensor, exact: torch.Tensor, estimated: torch.Tensor, k: int = NUM_WORST
) -> list[tuple[int, float, float]]:
    """Up to ``k`` ``(id, exact, estimated)`` with the largest ``|estimated − exact|``, largest first
    (a nan difference ranks as infinite; ties keep their order in ``sample_ids``)."""
    exact = exact.detach().cpu().to(torch.float64).reshape(-1)
    estimated = estimated.detach().cpu().to(torch.float64).reshape(-1)
    gap = (estimated - exact).abs()
    gap = torch.where(torch.isnan(gap), torch.full_like(gap, math.inf), gap)
    order = torch.argsort(gap, descending=True, stable=True)[: max(int(k), 0)].tolist()
    ids = sample_ids.detach().cpu().reshape(-1).tolist()
    return [(int(ids[i]), float(exact[i]), float(estimated[i])) for i in order]


def _vector(name: str, values: TensorLike, dtype: torch.dtype | None = None) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        tensor = values.detach().cpu()
    else:  # a sequence: floats are read as float64 (not torch's default float32), ids as int64
        try:
            tensor = torch.as_tensor(values, dtype=dtype)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"{name} must be a 1-D tensor [N] or a sequence of numbers: {err}") from err
    if tensor.dim() != 1:
        raise ValueError(f"{name} must be a 1-D tensor [N], got shape {tuple(tensor.shape)}.")
    return tensor


def _check_step(name: str, value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int or None, got {value!r}.")
    return int(value)


def _validated(sample_ids: TensorLike, exact: TensorLike, estimated: TensorLike) -> tuple[torch.Tensor, ...]:
    ids = _vector("sample_ids", sample_ids)
    ex, est = _vector("exact", exact, torch.float64), _vector("estimated", estimated, torch.float64)
    if ids.numel() and (ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool):
        raise ValueError(f"sample_ids must hold integers, got dtype {ids.dtype}.")
    for name, tensor in (("exact", ex), ("estimated", est)):
        if tensor.is_complex() or tensor.dtype == torch.bool:
            raise ValueError(f"{name} must hold real numbers, got dtype {tensor.dtype}.")
    if not ids.numel() == ex.numel() == est.numel():
        raise ValueError(
            f"sample_ids, exact and estimated must all have shape [N]: got sample_ids {tuple(ids.shape)}, "
            f"exact {tuple(ex.shape)}, estimated {tuple(est.shape)}."
        )
    return ids.to(torch.long), ex.to(torch.float64), est.to(torch.float64)


def audit_report(
    query: str,
    sample_ids: TensorLike,
    exact: TensorLike,
    estimated: TensorLike,
    estimator: str = "",
    start_step: int | None = None,
    end_step: int | None = None,
) -> AuditReport:
    """Compare the main estimator's scores with the exact ones for one query and window.

    Args:
        query: the query's name.
        sample_ids: ``LongTensor[N]`` (or a sequence of ints), the audited training-set ids.
        exact: ``Tensor[N]``, the exact estimator's scores f(θ_-j) − f(θ).
        estimated: ``Tensor[N]``, the main estimator's scores for the same ids, in the same order.
        estimator: the main estimator's name, for the summary and the warning.
        start_step, end_step: the window, or None for the whole run.

    Returns:
        An :class:`AuditReport` holding copies of the inputs (ids as int64, scores as float64, on the CPU).

    Raises:
        ValueError: an input that is not 1-D, lengths that differ (the message gives every shape),
            non-integer ids, complex or boolean scores, or an invalid window.
    """
    if not isinstance(query, str):
        raise ValueError(f"query must be a str, got {type(query).__name__}.")
    start, end = _check_step("start_step", start_step), _check_step("end_step", end_step)
    if start is not None and end is not None and end < start:
        raise ValueError(f"end_step ({end}) is before start_step ({start}).")
    ids, ex, est = (t.clone() for t in _validated(sample_ids, exact, estimated))
    return AuditReport(
        query=query,
        sample_ids=ids,
        exact_scores=ex,
        estimated_scores=est,
        worst=worst_samples(ids, ex, est),
        start_step=start,
        end_step=end,
        estimator=str(estimator),
        **agreement_metrics(ex, est),
    )


def _estimator_name(report: AuditReport) -> str:
    return f"the {report.estimator!r} estimator" if report.estimator else "the main estimator"


def _advice(report: AuditReport, min_spearman: float, max_relative_error: float) -> tuple[str, str, str]:
    """``(verdict, meaning, what to do)`` of :func:`audit_advice`; the last two are empty for a good agreement."""
    n, rho, rel = report.num_samples, report.spearman, report.relative_error
    where = "over the whole run" if report.start_step is None and report.end_step is None else f"over {report.window}"
    if n == 0:
        return (
            f"No audited sample {where}: nothing to judge.",
            "",
            "Pass audit=N (N ≥ 2, e.g. audit=8) or audit_ids=[...] of tracked samples.",
        )
    if math.isnan(rel):
        return (
            f"Poor agreement {where} ({n} audited samples): the scores are not finite (NaN or inf).",
            "Neither the ranking nor the magnitudes can be used.",
            'What usually helps here: float64 (Trainer(precision="64-true")), a smaller learning rate, and finite'
            " inputs and losses.",
        )
    rank_known = not math.isnan(rho)
    rank_ok, size_ok = rank_known and rho >= min_spearman, rel <= max_relative_error
    spearman, error = format_number(rho), format_number(rel)
    if (rank_ok or not rank_known) and size_ok:
        ranking = (
            f"the ranking (Spearman {spearman} ≥ {min_spearman:g}) and the magnitudes are usable"
            if rank_known
            else "the magnitudes are usable; the ranking cannot be judged (Spearman undefined: fewer than 2 audited"
            " samples or constant scores)"
        )
        return (
            f"Good agreement {where} ({n} audited samples): relative error {error} (≤ {max_relative_error:g}):"
            f" {_estimator_name(report)} follows the exact counterfactual f(θ_-j) − f(θ) on this run; {ranking}.",
            "",
            "",
        )
    meaning = f"{_magnitude(report, where, max_relative_error)}; {_ranking(report, min_spearman, size_ok)}."
    if report.sign_agreement < 0.75:
        agree = format_number(100.0 * report.sign_agreement)
        meaning += f" Signs agree for only {agree}%: helpful/harmful labels are unreliable."
    return (
        f"Poor agreement {where} ({n} audited samples).",
        meaning,
        "What usually helps here: " + "; ".join(_remedies(report)) + ".",
    )


def _magnitude(report: AuditReport, where: str, max_relative_error: float) -> str:
    """Whether the magnitudes of a poor report are usable (its relative error), capitalised."""
    error = format_number(report.relative_error)
    if report.relative_error <= max_relative_error:
        close = f"relative error {error} ≤ {max_relative_error:g}"
        return f"The magnitudes are close ({close}, carried by the largest scores)"
    named = f"the {report.estimator!r} linearisation" if report.estimator else "the linearisation"
    if report.estimator == "tracin":
        named = "TracIn (no propagation, no optimizer model)"
    model = f"{named} is far from the retrained run"
    if math.isinf(report.relative_error):
        model = "the exact scores are all 0 while the estimates are not"
    return (
        f"Relative error {error} {where} (wanted ≤ {max_relative_error:g}): {model}, so the scores are not predicted"
        " loss changes"
    )


def _ranking(report: AuditReport, min_spearman: float, size_ok: bool) -> str:
    """Whether the ranking of a poor report is usable (its Spearman correlation)."""
    rho = report.spearman
    if math.isnan(rho):
        return "the ranking cannot be judged (Spearman undefined: fewer than 2 audited samples or constant scores)"
    if rho >= min_spearman:
        return (
            f"the ranking is still usable (Spearman {format_number(rho)} ≥ {min_spearman:g}): read the order"
            " (most_harmful(n), most_helpful(n)), not the values"
        )
    ranking = f"the ranking is not usable (Spearman {format_number(rho)}, wanted ≥ {min_spearman:g})"
    return ranking + (": only the few largest |scores| are reliable" if size_ok else "")


def _remedies(report: AuditReport) -> list[str]:
    """What usually helps a poor report, sized from its window and naming its largest gaps."""
    steps = None if report.start_step is None or report.end_step is None else report.end_step - report.start_step
    if steps is not None and steps > 1:
        windows = f"shorter windows (e.g. window_every_n_steps={max(1, steps // 4)}: this one spans {steps} steps)"
    else:
        windows = "shorter windows (a smaller window_every_n_steps; tracker.audit_windows(name) shows where it drifts)"
    ids = [sid for sid, _, _ in report.worst[:3]]
    exact = f'estimator="exact" for the samples that matter (track=[...]; the largest gaps here: ids {ids})'
    if report.estimator == "tracin":  # a baseline: propagation, not a shorter horizon, is what it lacks
        return ['estimator="acc" (TracIn is the no-propagation baseline)', exact, windows, "a smaller learning rate"]
    todo = [windows, "a smaller learning rate", exact]
    if report.estimator == "first-order":
        todo.append('estimator="acc" rather than "first-order"')
    return [*todo, 'float64 (Trainer(precision="64-true")) for a float32 run']


def audit_advice(report: AuditReport, min_spearman: float = 0.8, max_relative_error: float = 0.5) -> str:
    """What a report means and what to do, with this run's numbers (:attr:`AuditReport.advice` uses the defaults).

    Good agreement: one sentence saying the ranking and the magnitudes are usable. Poor agreement (see
    :meth:`AuditReport.is_poor`): whether the magnitudes are usable (the relative error: far from the retrained run,
    so not predicted loss changes), whether the ranking still is (the Spearman correlation), how far the signs agree,
    and what usually helps: shorter windows (sized from this window), a smaller learning rate, ``estimator="exact"``
    for the samples that matter (naming the largest gaps), ``"acc"`` for ``"first-order"`` or ``"tracin"``, float64.
    """
    return " ".join(part for part in _advice(report, min_spearman, max_relative_error) if part)


def poor_agreement_message(report: AuditReport, min_spearman: float = 0.8, max_relative_error: float = 0.5) -> str:
    """The end-of-fit warning for a poor audit: what was measured, what it means, and what to do (the report's
    :func:`audit_advice`)."""
    worst = "; ".join(f"id {i}: exact {ex:+.3e}, estimated {est:+.3e}" for i, ex, est in report.worst[:3])
    _, meaning, todo = _advice(report, min_spearman, max_relative_error)
    return (
        f"Influence audit of query {report.query!r} ({report.window}, {report.num_samples} audited samples): "
        f"{_estimator_name(report)} agrees poorly with the exact counterfactual f(θ_-j) − f(θ) measured on this "
        f"run. Spearman {format_number(report.spearman)} (wanted ≥ {min_spearman:g}), "
        f"Pearson {format_number(report.pearson)}, "
        f"relative error {format_number(report.relative_error)} (wanted ≤ {max_relative_error:g}), signs agree for "
        f"{format_number(100.0 * report.sign_agreement)}% of the samples."
        + (f" Largest gaps: {worst}." if worst else "")
        + (f" {meaning}" if meaning else "")
        + (f" {todo}" if todo else "")
        + " This is a measurement on this run, not a bound."
    )
