"""``estimator="tracin"`` per query example: a query registered as ``PerExampleQuery`` keeps running sums Tensor[k, n]
(one batched gradient of the query's examples per step), checked against a plain float64 loop."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import InfluenceTracker
from lightning_influence.estimators.tracin import PerExampleQuery
from lightning_influence.testing import cross_entropy_losses

LR, EPOCHS = 0.1, 2
NUM_FEATURES, NUM_CLASSES = 4, 3  # the conftest's data


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    layers = [torch.nn.Linear(NUM_FEATURES, 5), torch.nn.Tanh(), torch.nn.Linear(5, NUM_CLASSES)]
    return torch.nn.Sequential(*layers).double()


def query_data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, NUM_FEATURES, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, NUM_CLASSES, (5,), generator=gen)


def direct_tracin(net: torch.nn.Module, loader: DataLoader, xq: torch.Tensor, yq: torch.Tensor, k: int) -> torch.Tensor:
    """Σ_t (η/|B_t|) ⟨∇ℓ_i(θ_t), ∇ℓ_j(θ_t)⟩ for every training sample j (rows) and query example i (columns), by a
    plain loop of SGD steps, one backward per sample."""
    net = copy.deepcopy(net)
    params = list(net.parameters())

    def grad_of(x, y) -> torch.Tensor:
        loss = cross_entropy_losses(net, x[None], y[None])[0]
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])

    scores = torch.zeros(k, len(xq), dtype=torch.float64)
    for _ in range(EPOCHS):
        for x, y, ids in loader:
            queries = torch.stack([grad_of(xq[i], yq[i]) for i in range(len(xq))])  # [n, p]
            for row, j in enumerate(ids.tolist()):
                scores[j] += (LR / len(ids)) * (queries @ grad_of(x[row], y[row]))
            loss = cross_entropy_losses(net, x, y).mean()
            with torch.no_grad():
                for p, g in zip(params, torch.autograd.grad(loss, params)):
                    p -= LR * g
    return scores


@pytest.fixture
def fitted(make_trainer, make_model, train_loader):
    xq, yq = query_data()
    loader = DataLoader(TensorDataset(xq, yq), batch_size=2, shuffle=False)  # batches of 2, 2 and 1 examples
    queries = {"val": PerExampleQuery(loader), "batch": PerExampleQuery((xq, yq)), "mean": (xq, yq)}
    tracker = InfluenceTracker(estimator="tracin", queries=queries, write_artifacts=False)
    net = mlp()
    expected = direct_tracin(net, train_loader, xq, yq, len(train_loader.dataset))
    make_trainer(tracker, epochs=EPOCHS).fit(make_model(net=net), train_dataloaders=train_loader)
    return tracker, expected


def test_per_example_scores_match_a_direct_float64_loop(fitted):
    tracker, expected = fitted
    assert expected.abs().min() > 1e-6  # every pair scored
    for name in ("val", "batch"):
        result = tracker.influence(name, per_example=True)
        assert result.per_example is not None and result.per_example.shape == expected.shape
        torch.testing.assert_close(result.per_example, expected[result.sample_ids], rtol=1e-10, atol=1e-14)
        # the per-example mean is the query's score: in the answer, in influence(name) and in the windows
        torch.testing.assert_close(result.scores, result.per_example.mean(dim=1), rtol=0, atol=0)
        torch.testing.assert_close(tracker.influence(name).scores, result.scores, rtol=0, atol=0)
        assert result.estimator == "tracin"
    # the same query registered without per-example sums: the same aggregate, from one gradient of the mean loss
    torch.testing.assert_close(
        tracker.influence("mean").scores, tracker.influence("val").scores, rtol=1e-10, atol=1e-14
    )
    torch.testing.assert_close(tracker.influence("mean").scores, expected.mean(dim=1), rtol=1e-10, atol=1e-14)


def test_per_example_needs_a_query_registered_per_example(fitted):
    tracker, _ = fitted
    with pytest.raises(ValueError, match=r"per_example=True is not available with estimator='tracin' for query 'mean'"):
        tracker.influence("mean", per_example=True)
    with pytest.raises(ValueError, match=r"PerExampleQuery\(batch_or_loader\)"):
        tracker.influence("mean", per_example=True)
    with pytest.raises(ValueError, match=r"only answers registered queries: per_example=True needs the name"):
        tracker.influence(query_data(), per_example=True)


def test_checkpointed_per_example_sums(fitted):
    tracker, _ = fitted
    estimator = tracker._fit.estimator
    state = estimator.state_dict()
    assert set(state["tracin_example_scores"]) == {"val", "batch"}
    before = estimator.running_examples("val").clone()
    estimator.load_state_dict(state)
    torch.testing.assert_close(estimator.running_examples("val"), before, rtol=0, atol=0)
    estimator.load_state_dict({"tracin_scores": state["tracin_scores"]})  # a checkpoint without them
    with pytest.raises(ValueError, match=r"incomplete"):
        estimator.running_examples("val")


def test_per_example_query_is_checked():
    xq, yq = query_data()
    with pytest.raises(TypeError, match=r"batch or a DataLoader"):
        PerExampleQuery(lambda module: module(xq).sum())
    with pytest.raises(ValueError, match=r"shuffle=False"):
        PerExampleQuery(DataLoader(TensorDataset(xq, yq), batch_size=2, shuffle=True))
    with pytest.raises(FloatingPointError, match=r"NaN or inf"):
        PerExampleQuery((torch.full_like(xq, float("nan")), yq))
    batch = (xq, yq)
    assert [b for b in PerExampleQuery(batch)] == [batch]
    assert PerExampleQuery(PerExampleQuery(batch)).query is batch
