"""Reporting to the Trainer's loggers (rank zero): TensorBoard scalars, histograms, tables and images of
closed windows, audit reports and selection decisions. Imports Lightning's logger classes only.

The names of 0.1.0's flat ``lightning_influence.reporting`` module are importable from here.
"""

from lightning_influence.reporting.windows import (
    SCALAR_NAMES,
    log_window,
    metric_key,
    strongest_over_windows_figure,
    top_samples_table,
    window_summary,
)

__all__ = [
    "SCALAR_NAMES",
    "log_window",
    "metric_key",
    "strongest_over_windows_figure",
    "top_samples_table",
    "window_summary",
]
