"""BatchNorm in train mode is followed, not refused ([concepts.md: Random draws and batch-coupled layers]).

The sample stays in the batch and its statistics (w_j weights its loss); the running statistics are part of the state
and the queries, in eval mode, read them. Ground truth is the same seeded Lightning run with w_j = 1 ± ε (the
derivative) and w_j = 0 (the retrained run), whose running buffers move as the real run's do; dropout in the same
model draws the same masks in every one of these runs.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_influence import (
    InfluenceConfigurationError,
    InfluenceTracker,
    ReplayInputError,
    TrackerConfig,
    TrajectoryReplay,
    load_trajectory,
)
from lightning_influence.core.build import refuse_unreplayable_draws
from lightning_influence.core.state import FitContext
from lightning_influence.testing import TinyClassifier, eval_query_loss, random_classification, seeded_fit

N, D, C = 16, 4, 3
SCHEDULE = [[[3, 7, 1, 12, 0, 9, 14, 5], [2, 10, 4, 15, 6, 11, 8, 13]]] * 2  # 2 epochs of 2 batches
PROBES = (1, 6, 13)
OPTIMIZERS = {
    "momentum": (lambda m: torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.9), 1e-5),
    "adamw": (lambda m: torch.optim.AdamW(m.parameters(), lr=0.02, weight_decay=0.1), 1e-6),
}


def _mlp() -> nn.Module:
    """Linear → BatchNorm1d → Tanh → Dropout → Linear: both couplings at once. The layers before a BatchNorm have no
    bias, as in ResNets: such a bias gets a gradient of exactly 0 in train mode (the batch mean removes it), rounded
    to ~1e-17, which Adam divides by √v + ε ≈ 1e-8: the finite-difference runs would differ by amplified rounding."""
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Linear(D, 12, bias=False), nn.BatchNorm1d(12), nn.Tanh(), nn.Dropout(0.3), nn.Linear(12, C)
    ).double()


class SmallCNN(nn.Module):
    """Conv → BatchNorm2d → ReLU → pooled → dropout → Linear, on the D features seen as a 2 × 2 image."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(1, 4, kernel_size=2, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(4, momentum=0.3)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(4, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.norm(self.conv(x.view(-1, 1, 2, 2))))
        return self.head(self.drop(h.mean(dim=(2, 3))))


def _fit(net, make_opt, x, y, weights=None, tracker=None) -> TinyClassifier:
    return seeded_fit(net, make_opt, x, y, SCHEDULE, weights, [tracker] if tracker else [])


def _weights(j: int, value: float) -> torch.Tensor:
    w = torch.ones(N, dtype=torch.float64)
    w[j] = value
    return w


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
@pytest.mark.parametrize("net", [_mlp, SmallCNN], ids=["bn-dropout-mlp", "bn-dropout-cnn"])
def test_first_order_is_the_derivative_of_the_same_seeded_run(net, opt):
    make_opt, eps = OPTIMIZERS[opt]
    x, y, query = random_classification(N, D, C)
    tracker = InfluenceTracker(track=list(PROBES), estimator="first-order", queries={"q": query})
    _fit(net().double(), make_opt, x, y, tracker=tracker)
    got = tracker.influence("q").scores
    for row, j in enumerate(PROBES):
        up = eval_query_loss(_fit(net().double(), make_opt, x, y, _weights(j, 1 + eps)), query)
        down = eval_query_loss(_fit(net().double(), make_opt, x, y, _weights(j, 1 - eps)), query)
        truth = -(up - down) / (2 * eps)
        assert abs(float(got[row]) - truth) <= 1e-4 * abs(truth) + 1e-12, (j, float(got[row]), truth)


def test_exact_is_the_retrained_run_without_the_sample():
    make_opt, _ = OPTIMIZERS["adamw"]
    x, y, query = random_classification(N, D, C)
    tracker = InfluenceTracker(track=list(PROBES), estimator="exact", queries={"q": query})
    fitted = _fit(_mlp(), make_opt, x, y, tracker=tracker)
    got = tracker.influence("q").scores
    base = eval_query_loss(fitted, query)
    for row, j in enumerate(PROBES):
        truth = eval_query_loss(_fit(_mlp(), make_opt, x, y, _weights(j, 0.0)), query) - base
        assert abs(float(got[row]) - truth) <= 1e-6 * abs(truth) + 1e-12, (j, float(got[row]), truth)


def test_tracked_fit_ends_where_the_untracked_fit_ends():
    make_opt, _ = OPTIMIZERS["momentum"]
    x, y, query = random_classification(N, D, C)
    plain = _fit(_mlp(), make_opt, x, y)
    tracked = _fit(_mlp(), make_opt, x, y, tracker=InfluenceTracker(track=list(PROBES), queries={"q": query}))
    for (name, a), b in zip(plain.state_dict().items(), tracked.state_dict().values()):
        assert torch.equal(a, b), name  # parameters and running buffers alike


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_replay_equals_the_forward_engine(tmp_path, opt):
    make_opt, _ = OPTIMIZERS[opt]
    x, y, query = random_classification(N, D, C)
    forward = InfluenceTracker(track=list(range(N)), estimator="first-order", queries={"q": query})
    _fit(_mlp(), make_opt, x, y, tracker=forward)
    recorder = InfluenceTracker(track=(), record_trajectory=True, dirpath=tmp_path, queries={"q": query})
    fitted = _fit(_mlp(), make_opt, x, y, tracker=recorder)
    trajectory = load_trajectory(recorder.dirpath / "trajectory")
    replayed = trajectory.influence(fitted.train(), list(zip(x, y)), query, progress=False)
    want = forward.influence("q").scores
    got = replayed.scores[torch.argsort(replayed.sample_ids)]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-12)


def test_replayed_windows_equal_the_forward_windows_across_segments(tmp_path):
    """Windows at every step read the running buffers of their own step; checkpoints every 3 steps split the replay
    into segments whose buffers are checked against the recorded ones."""
    make_opt, _ = OPTIMIZERS["momentum"]
    x, y, query = random_classification(N, D, C)
    tracker = InfluenceTracker(
        track=list(range(N)), estimator="first-order", queries={"q": query}, window_every_n_steps=1,
        record_trajectory=True, checkpoint_every_n_steps=3, dirpath=tmp_path,
    )  # fmt: skip
    fitted = _fit(SmallCNN(), make_opt, x, y, tracker=tracker)
    replay = TrajectoryReplay(tracker.dirpath / "trajectory", fitted.train(), list(zip(x, y)), progress=False)
    forward, replayed = tracker.windows("q"), replay.windows("q", query)
    assert [w.end_step for w in forward] == [w.end_step for w in replayed] == [1, 2, 3, 4]
    for f, r in zip(forward, replayed):
        want = f.scores[torch.argsort(f.sample_ids)]
        torch.testing.assert_close(r.scores[torch.argsort(r.sample_ids)], want, rtol=1e-6, atol=1e-12)


def test_a_replay_module_in_eval_mode_is_refused_with_the_fix(tmp_path):
    x, y, query = random_classification(N, D, C)
    tracker = InfluenceTracker(track=(), record_trajectory=True, dirpath=tmp_path, queries={"q": query})
    fitted = _fit(_mlp(), OPTIMIZERS["momentum"][0], x, y, tracker=tracker)
    with pytest.raises(ReplayInputError, match=r"module.train\(\)"):
        TrajectoryReplay(tracker.dirpath / "trajectory", fitted.eval(), list(zip(x, y)))


def test_batch_norm_under_data_parallelism_is_refused_with_the_fix():
    config = TrackerConfig(track=[0])
    with pytest.raises(InfluenceConfigurationError, match=r"BatchNorm '1' in train mode under data.*GroupNorm"):
        refuse_unreplayable_draws(config, _mlp(), FitContext(world_size=2))
    refuse_unreplayable_draws(config, _mlp(), FitContext(world_size=1))
    refuse_unreplayable_draws(config, _mlp().eval(), FitContext(world_size=2))  # frozen statistics move nothing
