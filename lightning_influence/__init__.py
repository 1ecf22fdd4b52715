"""lightning-influence: optimizer-aware, accumulative training-data influence as a Lightning callback.

Sign convention everywhere: a score is the predicted change of the query, f(θ_-j) − f(θ), when
training sample j is removed. Negative = harmful, positive = helpful.
"""

from lightning_influence.artifacts import load_final_scores, load_snapshots
from lightning_influence.callback import InfluenceTracker
from lightning_influence.config import TrackerConfig
from lightning_influence.data import IndexedDataset, SampleIdError, default_sample_ids
from lightning_influence.engine import InfluenceEngine
from lightning_influence.errors import InfluenceConfigurationError, NonFiniteInfluenceError, SelfCheckError
from lightning_influence.exclusion import ExcludeSamples
from lightning_influence.offline import OfflineSelection, most_harmful_ids, offline_selection
from lightning_influence.optimizers import AdamJacobian, AdamWJacobian, SGDJacobian, UnsupportedOptimizerError
from lightning_influence.patterns import InfluencePatterns, classify_patterns
from lightning_influence.replay import ReplayMismatchError, TrajectoryReplay
from lightning_influence.result import InfluenceResult
from lightning_influence.selection import SelectionDecision, SelectionPolicy
from lightning_influence.selection_io import load_selection
from lightning_influence.selector import InfluenceDataSelector
from lightning_influence.tracin import TracInAccumulator
from lightning_influence.trajectory import Trajectory, load_trajectory
from lightning_influence.windows import WindowSnapshot

__version__ = "0.1.0"

__all__ = [
    "AdamJacobian",
    "AdamWJacobian",
    "ExcludeSamples",
    "IndexedDataset",
    "InfluenceDataSelector",
    "InfluencePatterns",
    "InfluenceConfigurationError",
    "InfluenceEngine",
    "InfluenceResult",
    "InfluenceTracker",
    "NonFiniteInfluenceError",
    "OfflineSelection",
    "SGDJacobian",
    "SampleIdError",
    "ReplayMismatchError",
    "SelectionDecision",
    "SelectionPolicy",
    "SelfCheckError",
    "TrajectoryReplay",
    "TracInAccumulator",
    "TrackerConfig",
    "UnsupportedOptimizerError",
    "WindowSnapshot",
    "classify_patterns",
    "default_sample_ids",
    "load_final_scores",
    "load_selection",
    "most_harmful_ids",
    "offline_selection",
    "load_snapshots",
    "load_trajectory",
    "Trajectory",
]
