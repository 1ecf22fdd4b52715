"""The default path, ``InfluenceTracker(queries=...)`` with ``track="auto"``: every sample scored, a few live.

Forward states cost one Hessian-vector product per tracked sample and step, so tracking every sample forward grows
with the training set (a 1,000-sample CNN: 43 s per step). The adjoint replay of a recorded run scores every sample
for the price of a few training passes ([concepts.md: Every sample at once]). So, at train start, once the training
set's size is known:

- a small training set (at most :data:`ALL_FORWARD_UP_TO` samples), ``estimator="tracin"`` (a per-sample gradient,
  no propagation), or a data selector acting on every sample's windows during training: every sample is tracked
  forward, as ``track=None``;
- otherwise the run is recorded and replayed once at the end of fit for the registered queries (every sample scored,
  its windows logged; after a fit on several processes, the replay is shared by them), while :data:`LIVE_SAMPLES`
  samples, evenly spread over the ids, are tracked forward so that TensorBoard shows influence window by window
  during training;
- when the run cannot be recorded (the reason comes from the recording's own checks), the live samples only, and the
  announcement says why.

Nothing here knows Lightning.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

from lightning_influence.core.config import TrackerConfig

ALL_FORWARD_UP_TO = 64
"""Training sets of at most this many samples are tracked forward in full by the default path."""

LIVE_SAMPLES = 16
"""How many samples the default path tracks forward (live windows) when it records and replays the rest."""


def live_ids(num_samples: int, count: int = LIVE_SAMPLES) -> torch.Tensor:
    """``LongTensor[min(count, num_samples)]``: ids evenly spread over ``[0, num_samples)`` (a sorted training set,
    by class or by source, still gives a mix)."""
    count = min(count, num_samples)
    if count <= 1:
        return torch.zeros(count, dtype=torch.long)
    return torch.arange(count, dtype=torch.long) * (num_samples - 1) // (count - 1)  # exact integers, any size


@dataclass(frozen=True)
class DefaultPath:
    """What ``track="auto"`` decided for one fit: its ``config`` (``track`` and ``record_trajectory`` resolved),
    whether the recorded run is replayed once at the end of fit for the registered queries (``replay_at_end``) and
    answers ``influence(name)`` for every sample without a flag (``answers_by_replay``), and the start-up ``line``
    that says so (empty for a configuration that asked for its own path)."""

    config: TrackerConfig
    replay_at_end: bool = False
    answers_by_replay: bool = False
    line: str = ""


def resolve_default_path(
    config: TrackerConfig,
    num_samples: int,
    world_size: int,
    why_not_recorded: Callable[[TrackerConfig], str | None],
    online: bool = False,
) -> DefaultPath:
    """The fit's own path for ``track="auto"`` (any other ``config`` is kept, ``record_trajectory`` None read as
    False). ``why_not_recorded(recording_config)``: the reason the recording would be refused, or None. ``online``:
    a consumer acts on every sample's windows during training (a data selector), which needs forward states."""
    if not isinstance(config.track, str):
        return DefaultPath(dataclasses.replace(config, record_trajectory=bool(config.record_trajectory)))
    every = dataclasses.replace(config, track=None, record_trajectory=bool(config.record_trajectory))
    if not config.keeps_states:
        return DefaultPath(every, line=f"every one of the {num_samples} samples tracked (estimator='tracin')")
    if num_samples <= ALL_FORWARD_UP_TO or config.record_trajectory is False or online:
        why = (
            "a small training set" if num_samples <= ALL_FORWARD_UP_TO
            else "record_trajectory=False" if config.record_trajectory is False
            else "a data selector acts on every sample during training"
        )  # fmt: skip
        return DefaultPath(every, line=f"every one of the {num_samples} samples tracked forward ({why})")
    live = live_ids(num_samples)
    recording = dataclasses.replace(config, track=live, record_trajectory=True)
    refused = why_not_recorded(recording)
    if refused is not None:
        line = (
            f"{live.numel()} of {num_samples} samples tracked forward; the run cannot be recorded for the"
            f" every-sample replay: {refused}"
        )
        return DefaultPath(dataclasses.replace(config, track=live, record_trajectory=False), line=line)
    shared = f", shared by the {world_size} processes" if world_size > 1 else ""
    line = (
        f"every one of the {num_samples} samples scored by the recorded run, replayed once at the end of fit for the"
        f" registered queries{shared}; {live.numel()} tracked forward for the live windows (track=[ids] to choose"
        " them, track=None for forward states of all)"
    )
    return DefaultPath(recording, replay_at_end=True, answers_by_replay=True, line=line)
