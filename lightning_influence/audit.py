"""The audit (SPEC §8): a few training samples tracked with the exact counterfactual estimator next
to the main one, and the agreement of the two per window and query.

An audit is a measurement on the user's own run, not a bound. Sign convention everywhere: a score
is f(θ_-j) − f(θ), negative = harmful. This module gathers the public names of

- :mod:`lightning_influence.audit_metrics`: :class:`AuditReport`, :func:`audit_report` and the
  end-of-fit warning text :func:`poor_agreement_message` (no Lightning);
- :mod:`lightning_influence.audit_log`: :func:`log_audit`, scalars to every logger and a scatter
  image and worst-samples table to TensorBoard (rank zero);
- :mod:`lightning_influence.audit_io`: :class:`AuditWriter` and :func:`load_audit`, the
  ``audit.jsonl`` file (no Lightning).
"""

from __future__ import annotations

from lightning_influence.audit_io import AUDIT_FILE, AUDIT_FORMAT, AUDIT_VERSION, AuditWriter, audit_record, load_audit
from lightning_influence.audit_log import AUDIT_SCALARS, audit_key, audit_scatter_figure, audit_table, log_audit
from lightning_influence.audit_metrics import (
    NUM_WORST,
    AuditReport,
    agreement_metrics,
    audit_report,
    poor_agreement_message,
    window_label,
    worst_samples,
)

__all__ = [
    "AUDIT_FILE",
    "AUDIT_FORMAT",
    "AUDIT_SCALARS",
    "AUDIT_VERSION",
    "NUM_WORST",
    "AuditReport",
    "AuditWriter",
    "agreement_metrics",
    "audit_key",
    "audit_record",
    "audit_report",
    "audit_scatter_figure",
    "audit_table",
    "load_audit",
    "log_audit",
    "poor_agreement_message",
    "window_label",
    "worst_samples",
]
