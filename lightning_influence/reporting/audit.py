"""Reporting an :class:`~lightning_influence.results.audit.AuditReport` to the Trainer's loggers.

Every logger gets, at ``step = report.end_step`` unless told otherwise, the scalars
``<namespace>/<query>/audit/<name>`` for ``name`` in :data:`AUDIT_SCALARS` (nan where undefined).
A :class:`~lightning.pytorch.loggers.TensorBoardLogger` also gets, through its ``SummaryWriter``:

- ``<namespace>/<query>/audit/worst_samples``: the report's advice (what it means, what to do) and a markdown
  table of the worst-estimated samples;
- ``<namespace>/<query>/audit/scatter``: an image (only when matplotlib is installed) of the
  estimates against the exact scores, with the diagonal and the worst samples labelled by id.

Figures are drawn with matplotlib's Agg canvas without pyplot, as in :mod:`lightning_influence.reporting.windows`.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Iterable, Union

import numpy as np
import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from lightning_influence.reporting.windows import as_loggers, metric_key, render_figure
from lightning_influence.results.audit import AuditReport, format_number

__all__ = ["AUDIT_SCALARS", "audit_key", "audit_scatter_figure", "audit_table", "log_audit"]

#: The scalar names logged per report; the full key is ``<namespace>/<query>/audit/<name>``.
AUDIT_SCALARS = ("spearman", "pearson", "relative_error", "sign_agreement")

_RED = "#d62728"


def audit_key(query: str, name: str, namespace: str = "influence") -> str:
    """``<namespace>/<query>/audit/<name>``: the tag of every audit scalar, text and image."""
    return metric_key(query, f"audit/{name}", namespace)


def _summary(report: AuditReport) -> str:
    estimator = f", estimator {report.estimator!r}" if report.estimator else ""
    return (
        f"{report.window}, N = {report.num_samples}{estimator}: Spearman {format_number(report.spearman)}, "
        f"Pearson {format_number(report.pearson)}, relative error {format_number(report.relative_error)}, "
        f"sign agreement {format_number(report.sign_agreement)}"
    )


def audit_table(report: AuditReport) -> str:
    """Markdown: a summary line, the report's :attr:`~lightning_influence.results.audit.AuditReport.advice` (what the
    numbers mean and what to do), then ``| rank | sample id | exact | estimated | estimated − exact |`` for the
    report's worst samples (negative = harmful)."""
    title = f"**{report.query}**: audit against the exact counterfactual f(θ_-j) − f(θ), {_summary(report)}."
    title += f"\n\n{report.advice}"
    if not report.worst:
        return f"{title}\n\n_no audited samples_"
    lines = ["| rank | sample id | exact | estimated | estimated − exact |", "|---:|---:|---:|---:|---:|"]
    lines += [
        f"| {rank} | {sid} | {ex:+.4e} | {est:+.4e} | {est - ex:+.4e} |"
        for rank, (sid, ex, est) in enumerate(report.worst, start=1)
    ]
    return title + "\n\n**Largest gaps**\n\n" + "\n".join(lines)


def _limits(*arrays: np.ndarray) -> tuple[float, float]:
    values = np.concatenate([a[np.isfinite(a)] for a in arrays])
    if values.size == 0:
        return -1.0, 1.0
    lo, hi = float(values.min()), float(values.max())
    pad = 0.05 * (hi - lo) if hi > lo else max(abs(lo), 1.0) * 0.05
    return lo - pad, hi + pad


def audit_scatter_figure(report: AuditReport, title: str | None = None) -> Any:
    """A matplotlib ``Figure``: the estimates (y) against the exact scores (x), the diagonal
    ``estimate = exact``, and the worst samples circled and labelled with their ids. Non-finite
    points are left out. Raises ``ImportError`` without matplotlib; nothing is registered with pyplot."""
    from matplotlib.figure import Figure  # optional dependency, imported lazily

    exact = report.exact_scores.detach().cpu().to(torch.float64).numpy()
    estimated = report.estimated_scores.detach().cpu().to(torch.float64).numpy()
    finite = np.isfinite(exact) & np.isfinite(estimated)
    lo, hi = _limits(exact, estimated)
    fig = Figure(figsize=(5.6, 5.0), dpi=100)
    ax = fig.add_subplot()
    ax.axhline(0.0, color="0.8", linewidth=0.8)
    ax.axvline(0.0, color="0.8", linewidth=0.8)
    ax.plot([lo, hi], [lo, hi], "--", color="0.4", linewidth=1.0, label="estimate = exact")
    ax.scatter(exact[finite], estimated[finite], s=16, color="#1f77b4", label="audited samples")
    shown = [(sid, ex, est) for sid, ex, est in report.worst if math.isfinite(ex) and math.isfinite(est)]
    if shown:
        xs, ys = [ex for _, ex, _ in shown], [est for _, _, est in shown]
        ax.scatter(xs, ys, s=60, facecolors="none", edgecolors=_RED, label="largest gaps")
    for sid, ex, est in shown:
        ax.annotate(f"id {sid}", (ex, est), textcoords="offset points", xytext=(5, 4), fontsize="small", color=_RED)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel(r"exact $f(\theta_{-j}) - f(\theta)$")
    ax.set_ylabel(f"estimated ({report.estimator or 'main estimator'})")
    default = (
        f"{report.query}: audit, {report.window}, N = {report.num_samples}\n"
        f"Spearman {format_number(report.spearman)}, relative error {format_number(report.relative_error)}"
    )
    ax.set_title(title or default, fontsize="medium")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    return fig


def _scatter_image(report: AuditReport) -> np.ndarray | None:
    fig = None
    try:
        fig = audit_scatter_figure(report)
        return render_figure(fig)
    except ImportError:  # matplotlib is optional
        return None
    except Exception as err:  # a plot must never end a training run
        warnings.warn(f"Could not draw the audit figure of {report.query!r}: {err!r}.", stacklevel=3)
        return None
    finally:
        if fig is not None:
            fig.clear()


@rank_zero_only
def log_audit(
    loggers: Union[Logger, Iterable[Logger], None],
    report: AuditReport,
    namespace: str = "influence",
    step: int | None = None,
) -> None:
    """Report one audit to every logger (see the module docstring for keys and tags); rank zero only.

    Args:
        loggers: ``trainer.loggers`` (a list, possibly empty: then nothing happens) or one logger.
        report: the audit of one query and window.
        namespace: the first part of every tag (``influence_1`` etc. when several trackers log).
        step: the logging step; ``report.end_step`` by default (None for a whole-run report leaves
            the step to each logger).
    """
    loggers = as_loggers(loggers)
    if not loggers:
        return
    step = report.end_step if step is None else int(step)
    metrics = {audit_key(report.query, name, namespace): float(getattr(report, name)) for name in AUDIT_SCALARS}
    for logger in loggers:
        logger.log_metrics(metrics, step=step)
    boards = [logger for logger in loggers if isinstance(logger, TensorBoardLogger)]
    if not boards:
        return
    table = audit_table(report)
    image = _scatter_image(report)
    for logger in boards:
        writer = logger.experiment
        writer.add_text(audit_key(report.query, "worst_samples", namespace), table, global_step=step)
        if image is not None:
            writer.add_image(audit_key(report.query, "scatter", namespace), image, global_step=step, dataformats="CHW")
