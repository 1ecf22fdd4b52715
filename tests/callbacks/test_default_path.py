"""The default path, ``InfluenceTracker(queries=...)`` (``track="auto"``), float64: a small training set is tracked
forward in full; a larger one is recorded and replayed once at the end of fit for the registered queries (every
sample scored, its windows logged to the loggers and files), with a few samples tracked forward for the live windows.
"""

from __future__ import annotations

import json

import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from lightning_influence import InfluenceTracker, TrackerConfig
from lightning_influence.core.default_path import ALL_FORWARD_UP_TO, LIVE_SAMPLES, live_ids, resolve_default_path
from lightning_influence.testing import (
    TinyClassifier,
    fixed_loader,
    lightning_trainer,
    random_classification,
    random_schedule,
)

D, C = 3, 2


def _fit(tracker: InfluenceTracker, n: int, tmp_path, epochs: int = 2) -> TinyClassifier:
    x, y, _ = random_classification(n, D, C, seed=1)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(D, 4), nn.Tanh(), nn.Linear(4, C)).double()
    module = TinyClassifier(net, lambda m: torch.optim.AdamW(m.parameters(), lr=0.05))
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = lightning_trainer(epochs, callbacks=[tracker], logger=logger)
    trainer.fit(module, fixed_loader(x, y, random_schedule(n, 20, epochs, seed=2)))
    return module


def _query():
    return random_classification(16, D, C, seed=3)[2]


@pytest.fixture(scope="module")
def default(tmp_path_factory):
    folder = tmp_path_factory.mktemp("default")
    tracker = InfluenceTracker(queries={"val": _query()}, window_every_n_steps=5, dirpath=folder / "out")
    _fit(tracker, 200, folder)
    return tracker, folder


def test_every_sample_is_scored_by_the_end_of_fit_replay(default):
    tracker, _ = default
    assert tracker.replays == 1  # at the end of fit, for every registered query at once
    every = tracker.influence("val")
    assert torch.equal(every.sample_ids, torch.arange(200)) and every.estimator == "first-order"
    assert len(tracker.windows("val")) == 4 and tracker.windows("val")[0].sample_ids.numel() == 200
    assert tracker.patterns("val").sample_ids.numel() == 200
    assert tracker.replays == 1  # read back
    fresh = tracker.replay(progress=False).influence(_query())
    torch.testing.assert_close(every.scores, fresh.scores)


def test_a_few_samples_are_tracked_forward_for_the_live_windows(default):
    tracker, _ = default
    assert torch.equal(tracker.tracked_ids, live_ids(200)) and tracker.tracked_ids.numel() == LIVE_SAMPLES
    live = tracker.influence("val", all_samples=False)
    assert torch.equal(live.sample_ids, live_ids(200)) and live.estimator == "acc"
    assert len(tracker.windows("val", all_samples=False)) == 4
    every = tracker.influence("val")
    assert torch.equal(every.sample_ids[live.sample_ids], live.sample_ids)  # ids are row indices
    # "acc" and the replay's "first-order" differ by the leave-k-out term only: nearly the same scores
    replayed = every.scores[live.sample_ids]
    assert float(torch.corrcoef(torch.stack([live.scores, replayed]))[0, 1]) > 0.99


def test_the_every_sample_windows_reach_the_loggers_and_the_files(default):
    tracker, folder = default
    lines = (tracker.dirpath / "all_samples" / "windows.jsonl").read_text().splitlines()
    assert len(lines) == 4 and len(json.loads(lines[0])["sample_ids"]) == 200
    final = json.loads((tracker.dirpath / "all_samples" / "final_scores.json").read_text())
    assert len(final["queries"]["val"]["scores"]) == 200
    events = EventAccumulator(str(next((folder / "tb").rglob("events.out.tfevents.*")))).Reload()
    scalars, texts = events.Tags()["scalars"], events.Tags()["tensors"]
    assert any(t.startswith("influence/all_samples/val/") for t in scalars + texts)
    assert any(t.startswith("influence/val/") for t in scalars)  # the live windows, during training


def test_a_small_training_set_is_tracked_forward_in_full(tmp_path):
    tracker = InfluenceTracker(queries={"val": _query()})
    _fit(tracker, ALL_FORWARD_UP_TO, tmp_path)
    assert tracker.tracked_ids.numel() == ALL_FORWARD_UP_TO and tracker.trajectory_path is None
    assert tracker.influence("val").estimator == "acc" and tracker.replays == 0


@pytest.mark.parametrize(
    ("kwargs", "tracked", "records"),
    [
        (dict(), LIVE_SAMPLES, True),
        (dict(record_trajectory=False), 500, False),  # recording refused by the user: forward states of all
        (dict(estimator="tracin"), 500, False),  # no propagation: every sample is cheap
        (dict(track=None), 500, False),
        (dict(track=[1, 2]), 2, False),
    ],
)
def test_the_resolution(kwargs, tracked, records):
    config = TrackerConfig(queries={"val": _query()}, **kwargs)
    path = resolve_default_path(config, 500, 1, lambda c: None)
    resolved = path.config
    k = 500 if resolved.track is None else resolved.track.numel()
    assert (k, bool(resolved.record_trajectory), path.replay_at_end) == (tracked, records, records)


def test_a_data_selector_gets_every_sample_tracked_forward():
    path = resolve_default_path(TrackerConfig(queries={"val": _query()}), 500, 1, lambda c: None, online=True)
    assert path.config.track is None and not path.config.record_trajectory and "data selector" in path.line


def test_a_run_that_cannot_be_recorded_tracks_the_live_samples_and_says_why():
    config = TrackerConfig(queries={"val": _query()})
    refused = resolve_default_path(config, 500, 2, lambda c: "recording under DDP with dropout is refused")
    assert refused.config.track.numel() == LIVE_SAMPLES and not refused.config.record_trajectory
    assert "cannot be recorded" in refused.line and "DDP with dropout" in refused.line
    multi = resolve_default_path(config, 500, 2, lambda c: None)
    assert multi.answers_by_replay and multi.replay_at_end and "shared by the 2 processes" in multi.line
