"""Exactness of the linearisation (docs/benchmarks.md): the "first-order" estimate equals the derivative of the
query with respect to the removed sample's weight, measured by central finite differences of two
real float64 training runs (w_j = 1 ± ε), for every supported optimizer configuration."""

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
    retrain,
)

N, D, C = 24, 4, 3
EPS = 1e-4
PROBES = (0, 5, 17)


def _data():
    return random_classification(N, D, C)


def _net(kind: str) -> nn.Module:
    torch.manual_seed(1)
    if kind == "logreg":
        return nn.Sequential(nn.Linear(D, C)).double()
    if kind == "cnn":  # a 1-D convolution over the D features
        conv = [nn.Unflatten(1, (1, D)), nn.Conv1d(1, 2, 3, padding=1), nn.Tanh(), nn.Flatten()]
        return nn.Sequential(*conv, nn.Linear(2 * D, C)).double()
    return nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, C)).double()


def _two_groups(opt_cls, first: dict, rest: dict):
    def make(net: nn.Module):
        params = list(net.parameters())
        return opt_cls([{"params": params[:1], **first}, {"params": params[1:], **rest}])

    return make


OPTIMIZERS = {
    "sgd": (lambda m: torch.optim.SGD(m.parameters(), lr=0.3), None),
    "sgd-weight-decay": (lambda m: torch.optim.SGD(m.parameters(), lr=0.3, weight_decay=0.05), None),
    "momentum-dampening": (lambda m: torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.9, dampening=0.1), None),
    "nesterov": (
        lambda m: torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.8, nesterov=True, weight_decay=0.01),
        None,
    ),
    "adam-l2": (lambda m: torch.optim.Adam(m.parameters(), lr=0.03, weight_decay=0.05), None),
    "adamw": (lambda m: torch.optim.AdamW(m.parameters(), lr=0.03, weight_decay=0.1, betas=(0.8, 0.95)), None),
    "adamw-step-lr": (
        lambda m: torch.optim.AdamW(m.parameters(), lr=0.05, weight_decay=0.1),
        lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=4, gamma=0.5),
    ),
    "momentum-step-lr": (
        lambda m: torch.optim.SGD(m.parameters(), lr=0.3, momentum=0.9),
        lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.7),
    ),
    "sgd-two-groups": (
        _two_groups(torch.optim.SGD, {"lr": 0.1, "momentum": 0.5}, {"lr": 0.4, "weight_decay": 0.02}),
        None,
    ),
    "adamw-two-groups": (_two_groups(torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.0}, {"lr": 0.04}), None),
}


def _tracked_run(net, make_opt, make_sched, x, y, schedule, **tracker_kwargs):
    tracker = InfluenceTracker(**tracker_kwargs)
    module = TinyClassifier(copy.deepcopy(net), make_opt, make_sched)
    lightning_trainer(len(schedule), callbacks=[tracker]).fit(module, fixed_loader(x, y, schedule))
    return tracker, module


def test_lightning_run_replays_the_reference_run():
    """Prerequisite of every ground-truth test: the tracked Lightning run is the reference run."""
    x, y, _ = _data()
    schedule = random_schedule(N, 6, 3, seed=2)
    net = _net("mlp")
    make_opt, make_sched = OPTIMIZERS["adamw-step-lr"]
    _, module = _tracked_run(net, make_opt, make_sched, x, y, schedule)
    ref = retrain(net, make_opt, x, y, schedule, None, make_sched)
    for a, b in zip(module.net.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("model", ["logreg", "mlp", "cnn"])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_first_order_matches_finite_differences(model, optimizer):
    x, y, query = _data()
    schedule = random_schedule(N, 6, 3, seed=3)
    net = _net(model)
    make_opt, make_sched = OPTIMIZERS[optimizer]
    tracker, _ = _tracked_run(net, make_opt, make_sched, x, y, schedule, estimator="first-order")
    scores = tracker.influence(query).scores
    for j in PROBES:
        expected = removal_derivative(net, make_opt, x, y, schedule, query, j, make_sched, EPS)
        assert abs(float(scores[j]) - expected) <= 1e-3 * abs(expected), (j, float(scores[j]), expected)


def test_tracked_subset_of_parameters_with_the_rest_frozen():
    """params= selects the head; the frozen body is excluded: the estimate stays exact."""
    x, y, query = _data()
    schedule = random_schedule(N, 6, 3, seed=4)
    net = _net("mlp")
    net[0].requires_grad_(False)
    make_opt, _ = OPTIMIZERS["adamw"]
    tracker, _ = _tracked_run(net, make_opt, None, x, y, schedule, estimator="first-order", params=["net.2"])
    assert tracker.engine.theta.shape[1] == 8 * C + C
    scores = tracker.influence(query).scores
    for j in PROBES:
        expected = removal_derivative(net, make_opt, x, y, schedule, query, j, None, EPS)
        assert abs(float(scores[j]) - expected) <= 1e-3 * abs(expected)


def test_tracked_ids_subset_gives_the_same_scores():
    x, y, query = _data()
    schedule = random_schedule(N, 6, 2, seed=5)
    net = _net("mlp")
    make_opt, _ = OPTIMIZERS["nesterov"]
    full, _ = _tracked_run(net, make_opt, None, x, y, schedule, estimator="acc")
    some, _ = _tracked_run(net, make_opt, None, x, y, schedule, estimator="acc", track=[17, 3], hvp_chunk_size=1)
    res = some.influence(query)
    assert res.sample_ids.tolist() == [17, 3]
    torch.testing.assert_close(res.scores, full.influence(query).scores[[17, 3]], rtol=1e-10, atol=1e-14)


def test_two_trackers_on_one_trainer_match_separate_runs():
    x, y, query = _data()
    schedule = random_schedule(N, 6, 2, seed=6)
    net = _net("mlp")
    make_opt, make_sched = OPTIMIZERS["adamw-step-lr"]
    both = [InfluenceTracker(estimator="acc"), InfluenceTracker(estimator="first-order", track=[1, 2, 3])]
    assert both[0].state_key != both[1].state_key
    module = TinyClassifier(copy.deepcopy(net), make_opt, make_sched)
    lightning_trainer(len(schedule), callbacks=both).fit(module, fixed_loader(x, y, schedule))
    alone, _ = _tracked_run(net, make_opt, make_sched, x, y, schedule, estimator="first-order", track=[1, 2, 3])
    torch.testing.assert_close(both[1].influence(query).scores, alone.influence(query).scores, rtol=1e-12, atol=0)
    acc_alone, _ = _tracked_run(net, make_opt, make_sched, x, y, schedule, estimator="acc")
    torch.testing.assert_close(both[0].influence(query).scores, acc_alone.influence(query).scores, rtol=1e-12, atol=0)
