"""The recorded trajectory of a run: recording, the on-disk format, fingerprints, loading, replaying segments
and the adjoint sweep that scores every sample (docs/concepts.md, "Every sample at once"). No Lightning.

``load_trajectory`` and ``Trajectory`` are importable from here as they were from the flat module of 0.1.0.
"""

from lightning_influence.trajectory.reader import Trajectory, load_trajectory

__all__ = ["Trajectory", "load_trajectory"]
