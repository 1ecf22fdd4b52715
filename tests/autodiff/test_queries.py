"""Query forms after fit: a batch, a DataLoader, a callable, a registered name, per-example scores.
All are checked against each other and, for a callable query, against exact retraining."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import InfluenceTracker
from lightning_influence.testing import (
    TinyClassifier,
    fixed_loader,
    lightning_trainer,
    random_schedule,
    retrain,
)

N, D, C = 24, 4, 3


def _fit(register_query: bool = False, **tracker_kwargs):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=gen, dtype=torch.float64)
    y = torch.randint(0, C, (N,), generator=gen)
    xq = torch.randn(10, D, generator=gen, dtype=torch.float64)
    yq = torch.randint(0, C, (10,), generator=gen)
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, C)).double()
    schedule = random_schedule(N, 6, 2, seed=0)
    make_opt = lambda m: torch.optim.Adam(m.parameters(), lr=0.03)  # noqa: E731
    if register_query:
        tracker_kwargs["queries"] = {"val": (xq, yq)}
    tracker = InfluenceTracker(**tracker_kwargs)
    module = TinyClassifier(copy.deepcopy(net), make_opt)
    lightning_trainer(len(schedule), callbacks=[tracker]).fit(module, fixed_loader(x, y, schedule))
    return tracker, (xq, yq), (net, make_opt, x, y, schedule)


def test_batch_loader_callable_and_per_example_agree():
    tracker, (xq, yq), _ = _fit(estimator="first-order")
    by_batch = tracker.influence((xq, yq))
    loader = DataLoader(TensorDataset(xq, yq), batch_size=3)  # uneven last batch: a mean over all 10 samples
    torch.testing.assert_close(tracker.influence(loader).scores, by_batch.scores)
    by_callable = tracker.influence(lambda m: F.cross_entropy(m(xq), yq))
    torch.testing.assert_close(by_callable.scores, by_batch.scores)
    per = tracker.influence(loader, per_example=True)
    assert per.per_example.shape == (N, 10)
    torch.testing.assert_close(per.scores, by_batch.scores)
    torch.testing.assert_close(per.per_example[:, 4], tracker.influence((xq[4:5], yq[4:5])).scores)


def test_registered_query_by_name():
    tracker, (xq, yq), _ = _fit(register_query=True)
    torch.testing.assert_close(tracker.influence("val").scores, tracker.influence((xq, yq)).scores)
    tracin, _, _ = _fit(register_query=True, estimator="tracin")
    assert tracin.influence("val").scores.shape == (N,)
    assert tracin.influence("val").scores.abs().sum() > 0


def test_callable_query_on_a_prediction_tracks_retraining():
    """A logit as query: the first-order score matches the finite-difference derivative of the logit."""
    tracker, (xq, _), (net, make_opt, x, y, schedule) = _fit(estimator="first-order")
    logit = lambda m: m(xq[:1])[0, 1]  # noqa: E731
    scores = tracker.influence(logit).scores
    eps = 1e-4
    for j in (2, 11):
        vals = []
        for w_j in (1 + eps, 1 - eps):
            w = torch.ones(N, dtype=torch.float64)
            w[j] = w_j
            trained = retrain(net, make_opt, x, y, schedule, w)
            with torch.no_grad():
                vals.append(float(trained(xq[:1])[0, 1]))
        expected = -(vals[0] - vals[1]) / (2 * eps)
        assert abs(float(scores[j]) - expected) <= 1e-3 * abs(expected)


def test_result_helpers_follow_the_sign_convention():
    tracker, (xq, yq), _ = _fit()
    res = tracker.influence((xq, yq))
    harmful, helpful = res.most_harmful(5), res.most_helpful(5)
    assert (harmful.scores < 0).all() and (helpful.scores > 0).all()
    assert harmful.scores.tolist() == sorted(harmful.scores.tolist())
    assert helpful.scores.tolist() == sorted(helpful.scores.tolist(), reverse=True)
    assert float(harmful.scores[0]) == float(res.scores.min())
