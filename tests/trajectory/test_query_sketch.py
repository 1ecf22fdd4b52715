"""Many query examples by the directions their gradients span (trajectory/query_sketch.py), float64: with every
direction (energy 1) the per-example scores are the stacked single-row replays; truncated, the result says so and its
reported error is the error on the exactly swept rows."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_influence import InfluenceTracker, load_trajectory
from lightning_influence.testing import (
    TinyClassifier,
    fixed_loader,
    lightning_trainer,
    random_classification,
    random_schedule,
)
from lightning_influence.trajectory.query_sketch import QuerySketch, check_rows, sketch_error
from lightning_influence.trajectory.replay import TrajectoryReplay

N, D, C = 24, 3, 3


def test_the_sketch_keeps_the_rank_and_the_energy_asked_for():
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(12, 4, dtype=torch.float64, generator=gen) @ torch.randn(4, 30, dtype=torch.float64, generator=gen)
    full = QuerySketch.of(g)  # rank 4: exact with 4 directions
    assert full.rank == 4 and abs(full.kept - 1) < 1e-12
    torch.testing.assert_close(full.expand(full.directions @ g.T).T, g @ g.T)  # the directions' scores map back
    torch.testing.assert_close(full.coefficients @ full.directions, g)
    half = QuerySketch.of(g, energy=0.5)
    assert half.rank < 4 and half.kept >= 0.5
    with pytest.raises(ValueError, match="energy must lie in"):
        QuerySketch.of(g, energy=0.0)


@pytest.fixture(scope="module")
def replay(tmp_path_factory):
    x, y, _ = random_classification(N, D, C, seed=1)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(D, 5), nn.Tanh(), nn.Linear(5, C)).double()
    tracker = InfluenceTracker(track=(), record_trajectory=True, dirpath=tmp_path_factory.mktemp("sketch"))
    module = TinyClassifier(net, lambda m: torch.optim.AdamW(m.parameters(), lr=0.05))
    lightning_trainer(2, callbacks=[tracker]).fit(module, fixed_loader(x, y, random_schedule(N, 6, 2, seed=2)))
    return TrajectoryReplay(load_trajectory(tracker.dirpath / "trajectory"), module, list(zip(x, y)), progress=False)


def _query():
    return random_classification(16, D, C, seed=5)[2]  # 8 query examples


def test_with_every_direction_the_sketch_is_the_stacked_rows(replay):
    rows = replay.influence(_query(), per_example=True)
    sketched = replay.influence(_query(), per_example=True, energy=1.0)
    assert rows.approximation is None and "8 directions for 8 examples" in sketched.approximation
    torch.testing.assert_close(sketched.per_example, rows.per_example, rtol=1e-8, atol=1e-13)
    torch.testing.assert_close(sketched.scores, rows.scores, rtol=1e-8, atol=1e-13)


def test_a_truncated_sketch_reports_its_error_on_exact_rows(replay):
    rows = replay.influence(_query(), per_example=True).per_example
    sketched = replay.influence(_query(), per_example=True, energy=0.9)
    directions = int(sketched.approximation.split("query sketch: ")[1].split(" ")[0])
    assert directions < 8
    checked = check_rows(8, 4)
    error = sketch_error(sketched.per_example[:, checked], rows[:, checked])
    assert f"max relative error {error:.2e}" in sketched.approximation
    assert error > 0  # truncated: not the exact rows
