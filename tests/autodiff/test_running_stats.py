"""The running-buffer map of a step (autodiff/running_stats.py) against BatchNorm itself and against autograd's
Jacobian; the query's buffer gradient against finite differences."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_influence import InfluenceConfigurationError
from lightning_influence.autodiff.functional import FlatParameters, FunctionalLoss
from lightning_influence.autodiff.queries import running_stats_gradient


def _loss(net: nn.Module) -> FunctionalLoss:
    layout = FlatParameters.from_groups([list(net.named_parameters())])

    def per_sample(module: nn.Module, batch) -> torch.Tensor:
        return nn.functional.cross_entropy(module(batch[0]), batch[1], reduction="none")

    return FunctionalLoss(net, per_sample, layout)


def _net(norm: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), norm, nn.Tanh(), nn.Linear(4, 2)).double()


def _batches():
    torch.manual_seed(1)
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    return [(x, y), (x[:5], y[:5])]


def _theta(net: nn.Module, loss: FunctionalLoss) -> torch.Tensor:
    return loss.layout.flatten([p.detach() for p in net.parameters()])


def test_the_fold_moves_the_buffers_as_batch_norm_does_and_leaves_them_alone():
    net = _net(nn.BatchNorm1d(4, momentum=0.3))
    loss, batches = _loss(net), _batches()
    stats = loss.running_stats
    assert stats is not None and stats.numel == 8
    before = stats.read(net).clone()
    update, decay = loss.fold_statistics(_theta(net, loss), batches)
    assert torch.equal(stats.read(net), before)  # the tracker's evaluations move no buffer
    for x, _ in batches:
        net(x)  # the run's own forwards move them
    torch.testing.assert_close(decay * before + update, stats.read(net))


def test_the_step_map_derivatives_are_autograd_s_jacobian():
    net = _net(nn.BatchNorm1d(4))
    loss, batches = _loss(net), _batches()
    theta = _theta(net, loss)
    jacobian = torch.autograd.functional.jacobian(lambda t: loss.fold_statistics(t, batches)[0], theta)
    step = loss.step_statistics(theta, batches)
    assert step is not None
    v = torch.randn(3, theta.numel(), dtype=torch.float64)
    w = torch.randn(3, 8, dtype=torch.float64)
    torch.testing.assert_close(step.jvp(v), v @ jacobian.T)
    torch.testing.assert_close(step.vjp(w), w @ jacobian)


def test_the_query_gradient_with_respect_to_the_buffers_is_the_finite_difference():
    net = _net(nn.BatchNorm1d(4))
    loss, (query, _) = _loss(net), _batches()
    theta = _theta(net, loss)
    with torch.no_grad():
        net[1].running_mean.copy_(torch.randn(4))
        net[1].running_var.copy_(torch.rand(4) + 0.5)
    got = running_stats_gradient(loss, theta, query, lambda b: b)
    stats = loss.running_stats
    assert got is not None and stats is not None
    buffers, eps = stats.read(net).clone(), 1e-6

    def value(flat: torch.Tensor) -> float:
        with loss.evaluating():
            return float(loss.per_sample_losses(theta, query, stats.with_values(None, flat)).mean())

    for i in range(buffers.numel()):
        step = torch.zeros_like(buffers)
        step[i] = eps
        truth = (value(buffers + step) - value(buffers - step)) / (2 * eps)
        assert abs(float(got[i]) - truth) <= 1e-6 * abs(truth) + 1e-9, (i, float(got[i]), truth)
    assert got.abs().sum() > 0


def test_eval_mode_batch_norm_and_none_move_nothing():
    assert _loss(_net(nn.BatchNorm1d(4)).eval()).running_stats is None
    assert _loss(_net(nn.LayerNorm(4))).running_stats is None
    assert _loss(_net(nn.BatchNorm1d(4, track_running_stats=False))).running_stats is None


def test_a_cumulative_average_is_refused_with_the_fix():
    with pytest.raises(InfluenceConfigurationError, match="momentum=None"):
        _loss(_net(nn.BatchNorm1d(4, momentum=None)))
