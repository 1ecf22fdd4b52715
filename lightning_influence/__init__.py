"""lightning-influence: optimizer-aware, accumulative training-data influence as a Lightning callback.

Sign convention everywhere: a score is the predicted change of the query, f(θ_-j) − f(θ), when
training sample j is removed. Negative = harmful, positive = helpful.

The names below are the public API. The package's rooms (``callbacks``, ``reporting``, ``core``,
``estimators``, ``autodiff``, ``optimizers``, ``trajectory``, ``results``, ``io``) are described in
``docs/architecture.md``.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

from lightning_influence import _legacy_modules
from lightning_influence.callbacks.datamodels import linear_datamodeling_score
from lightning_influence.callbacks.exclusion import ExcludeSamples
from lightning_influence.callbacks.offline import OfflineSelection, most_harmful_ids, offline_selection
from lightning_influence.callbacks.processes import load_trajectory
from lightning_influence.callbacks.selector import InfluenceDataSelector
from lightning_influence.callbacks.tracker import InfluenceTracker
from lightning_influence.core.config import TrackerConfig
from lightning_influence.errors import (
    DamagedFileError,
    FolderInUseError,
    InfluenceConfigurationError,
    InfluenceError,
    NonFiniteInfluenceError,
    ReplayInputError,
    ReplayMismatchError,
    SampleIdError,
    SelfCheckError,
    TrajectoryWriteError,
    UnfinishedTrajectoryError,
    UnsupportedOptimizerError,
)
from lightning_influence.estimators.tracin import PerExampleQuery
from lightning_influence.io.artifacts_reader import load_final_scores, load_snapshots
from lightning_influence.io.audit import load_audit
from lightning_influence.io.selection import load_selection
from lightning_influence.results.audit import AuditReport
from lightning_influence.results.lds import LDSReport
from lightning_influence.results.patterns import InfluencePatterns, classify_patterns
from lightning_influence.results.result import InfluenceResult
from lightning_influence.results.selection import SelectionDecision, SelectionPolicy
from lightning_influence.results.windows import WindowSnapshot
from lightning_influence.sample_ids import IndexedDataset, default_sample_ids
from lightning_influence.trajectory.reader import Trajectory
from lightning_influence.trajectory.replay import TrajectoryReplay

__version__ = "0.1.0"

_legacy_modules.install()  # 0.1.0's flat module paths (lightning_influence.engine, ...) still import, with a warning

_MOVED = {
    "InfluenceEngine": "lightning_influence.estimators.engine",
    "TracInAccumulator": "lightning_influence.estimators.tracin",
    "AdamJacobian": "lightning_influence.optimizers",
    "AdamWJacobian": "lightning_influence.optimizers",
    "SGDJacobian": "lightning_influence.optimizers",
}
"""Internal classes that 0.1.0 exported at the top level: still importable from here for one release, with a
``DeprecationWarning`` that names their room."""


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        module = _MOVED[name]
        warnings.warn(
            f"lightning_influence.{name} is internal and will leave the top level in the next release;"
            f" import it from {module} instead.",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(module), name)
    raise AttributeError(f"module 'lightning_influence' has no attribute {name!r}")


__all__ = [
    "AuditReport",
    "DamagedFileError",
    "FolderInUseError",
    "ExcludeSamples",
    "IndexedDataset",
    "InfluenceConfigurationError",
    "InfluenceDataSelector",
    "InfluenceError",
    "InfluencePatterns",
    "InfluenceResult",
    "InfluenceTracker",
    "LDSReport",
    "NonFiniteInfluenceError",
    "OfflineSelection",
    "PerExampleQuery",
    "ReplayInputError",
    "ReplayMismatchError",
    "SampleIdError",
    "SelectionDecision",
    "SelectionPolicy",
    "SelfCheckError",
    "TrackerConfig",
    "TrajectoryWriteError",
    "Trajectory",
    "TrajectoryReplay",
    "UnfinishedTrajectoryError",
    "UnsupportedOptimizerError",
    "WindowSnapshot",
    "classify_patterns",
    "default_sample_ids",
    "load_audit",
    "load_final_scores",
    "load_selection",
    "load_snapshots",
    "linear_datamodeling_score",
    "load_trajectory",
    "most_harmful_ids",
    "offline_selection",
]
