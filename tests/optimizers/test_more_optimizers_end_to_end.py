"""RMSprop, Adagrad, Adamax, AMSGrad, NAdam and RAdam through a Lightning run (float64, a tanh MLP, a few steps):

- the tracker's ``"first-order"`` score is the derivative of the query with respect to the sample weight w_j,
  measured by central finite differences of two real retrainings (w_j = 1 ± 1e-6);
- a recorded run replayed by the adjoint sweep (``all_samples=True``) gives the forward scores of the tracked
  samples.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_influence import InfluenceTracker
from lightning_influence.testing import (
    TinyClassifier,
    fixed_loader,
    lightning_trainer,
    random_classification,
    random_schedule,
    removal_derivative,
)

N, D, C = 16, 3, 3
EPS = 1e-6
PROBES = (0, 7, 13)


def _data():
    return random_classification(N, D, C, seed=7)


def _mlp() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(D, 5), nn.Tanh(), nn.Linear(5, C)).double()


def _two_groups(opt_cls, first: dict, rest: dict, **common):
    """The first layer in one param group, the rest in another (weight decay on one of them)."""

    def make(net: nn.Module):
        return opt_cls([{"params": net[0].parameters(), **first}, {"params": net[2].parameters(), **rest}], **common)

    return make


OPTIMIZERS = {
    "rmsprop": _two_groups(torch.optim.RMSprop, {"weight_decay": 0.05}, {"alpha": 0.9}, lr=0.01),
    "rmsprop-centered-momentum": _two_groups(
        torch.optim.RMSprop, {"momentum": 0.8}, {"weight_decay": 0.05}, lr=0.005, centered=True, momentum=0.5
    ),
    "adagrad": _two_groups(
        torch.optim.Adagrad, {"lr_decay": 0.05}, {"weight_decay": 0.05}, lr=0.1, initial_accumulator_value=0.1
    ),
    "adamax": _two_groups(torch.optim.Adamax, {"weight_decay": 0.05}, {"betas": (0.8, 0.95)}, lr=0.05),
    "adam-amsgrad": _two_groups(torch.optim.Adam, {"weight_decay": 0.05}, {}, lr=0.03, amsgrad=True),
    "adamw-amsgrad": _two_groups(
        torch.optim.AdamW, {"weight_decay": 0.1}, {"weight_decay": 0.0}, lr=0.03, amsgrad=True, betas=(0.8, 0.9)
    ),
    "nadam": _two_groups(
        torch.optim.NAdam, {"weight_decay": 0.05}, {"weight_decay": 0.1, "decoupled_weight_decay": True}, lr=0.03
    ),
    "radam": _two_groups(  # β2 = 0.9: the first 6 steps unrectified, the last 2 rectified
        torch.optim.RAdam, {"weight_decay": 0.05, "decoupled_weight_decay": True}, {}, lr=0.03, betas=(0.9, 0.9)
    ),
}


def _fit(make_opt, schedule, tracker: InfluenceTracker):
    x, y, _ = _data()
    module = TinyClassifier(copy.deepcopy(_mlp()), make_opt)
    lightning_trainer(len(schedule), callbacks=[tracker]).fit(module, fixed_loader(x, y, schedule))
    return module


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_first_order_matches_finite_differences(name):
    x, y, query = _data()
    schedule = random_schedule(N, 4, 2, seed=1)  # 4 steps per epoch, 8 in all
    tracker = InfluenceTracker(estimator="first-order", track=list(PROBES))
    _fit(OPTIMIZERS[name], schedule, tracker)
    result = tracker.influence(query)
    errors = []
    for j, score in zip(result.sample_ids.tolist(), result.scores.tolist()):
        expected = removal_derivative(_mlp(), OPTIMIZERS[name], x, y, schedule, query, j, None, EPS)
        errors.append(abs(score - expected) / abs(expected))
    print(f"{name}: finite-difference relative error {max(errors):.1e}")
    assert max(errors) <= 1e-4, errors


@pytest.mark.parametrize("name", ["rmsprop-centered-momentum", "adagrad", "adamax", "adamw-amsgrad", "nadam", "radam"])
def test_recorded_run_replays_to_the_forward_scores(name, tmp_path):
    _, _, query = _data()
    schedule = random_schedule(N, 4, 2, seed=2)
    tracker = InfluenceTracker(
        estimator="first-order",
        queries={"val": query},
        track=list(PROBES),
        record_trajectory=True,
        checkpoint_every_n_steps=3,
        dirpath=tmp_path,
    )
    _fit(OPTIMIZERS[name], schedule, tracker)
    forward, replayed = tracker.influence("val"), tracker.influence("val", all_samples=True)
    assert torch.equal(replayed.sample_ids, torch.arange(N))
    got = replayed.scores[forward.sample_ids]
    print(f"{name}: duality relative error {float((got - forward.scores).norm() / forward.scores.norm()):.1e}")
    torch.testing.assert_close(got, forward.scores, rtol=1e-6, atol=1e-12)
