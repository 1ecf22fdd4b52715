"""The coupled path (per-sample terms from the batch's own forward) computes what the per-row path computes on a model
whose rows are independent: the same gradients and HVPs, float64, to rounding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_influence.autodiff.functional import FlatParameters, FunctionalLoss
from lightning_influence.testing import cross_entropy_losses


@pytest.mark.parametrize("rows", [[3], [0, 5, 7], list(range(8))])
def test_gradients_and_hvps_from_the_batch_forward_equal_the_per_row_ones(rows):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    layout = FlatParameters.from_groups([list(net.named_parameters())])
    theta = layout.flatten([p.detach() for p in net.parameters()])
    batch = (torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,)))
    index = torch.tensor(rows)
    vectors = torch.randn(len(rows), theta.numel(), dtype=torch.float64)
    out = {}
    for coupled in (False, True):
        loss = FunctionalLoss(net, lambda m, b: cross_entropy_losses(m, b[0], b[1]), layout, coupled=coupled)
        out[coupled] = (
            *loss.sample_gradients_and_hvps(theta, batch, index, 8, vectors),
            loss.sample_gradients(theta, batch, index, 8),
        )
    for per_row, coupled in zip(out[False], out[True]):
        torch.testing.assert_close(coupled, per_row, rtol=1e-12, atol=1e-14)
    assert out[True][1].abs().sum() > 0  # the HVPs are not trivially zero
