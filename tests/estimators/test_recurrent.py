"""Recurrent layers (``nn.LSTM``, ``nn.GRU``) are tracked exactly: their kernels have no batching rule (and, for the
LSTM on the CPU in float32, no forward-mode derivative), so the tracker takes the paths that need neither: HVPs by a
loop of double backwards, per-sample terms from the batch's forward, the replay by reverse-over-reverse."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_influence import InfluenceTracker
from lightning_influence.autodiff.functional import FlatParameters, FunctionalLoss
from lightning_influence.testing import eval_query_loss, seeded_fit

N, T, V, C = 12, 5, 10, 3
SCHEDULE = [[[4, 0, 9, 2, 7, 11], [1, 3, 5, 6, 8, 10]]] * 2
PROBES = (0, 5, 8)
OPTIMIZERS = {
    "momentum": (lambda m: torch.optim.SGD(m.parameters(), lr=0.3, momentum=0.9), 1e-5),
    "adamw": (lambda m: torch.optim.AdamW(m.parameters(), lr=0.02, weight_decay=0.1), 1e-6),
}


class Recurrent(nn.Module):
    """Tokens → embedding → LSTM or GRU → the last state → logits."""

    def __init__(self, cell: type[nn.RNNBase], dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.embed, self.rnn, self.head = nn.Embedding(V, 4), cell(4, 6, batch_first=True), nn.Linear(6, C)
        self.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.embed(x))[0][:, -1])


def _data():
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(0, V, (N + 4, T), generator=gen)
    y = torch.randint(0, C, (N + 4,), generator=gen)
    return x[:N], y[:N], (x[N:], y[N:])


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU], ids=["lstm", "gru"])
def test_first_order_is_the_derivative_of_the_training_run(cell, opt, tmp_path):
    make_opt, eps = OPTIMIZERS[opt]
    x, y, query = _data()
    tracker = InfluenceTracker(
        track=list(PROBES), estimator="first-order", queries={"q": query}, record_trajectory=True, dirpath=tmp_path
    )
    seeded_fit(Recurrent(cell), make_opt, x, y, SCHEDULE, callbacks=[tracker])
    got = tracker.influence("q").scores
    for row, j in enumerate(PROBES):
        values = []
        for w_j in (1 + eps, 1 - eps):
            w = torch.ones(N, dtype=torch.float64)
            w[j] = w_j
            values.append(eval_query_loss(seeded_fit(Recurrent(cell), make_opt, x, y, SCHEDULE, w), query))
        truth = -(values[0] - values[1]) / (2 * eps)
        assert abs(float(got[row]) - truth) <= 1e-4 * abs(truth) + 1e-12, (j, float(got[row]), truth)
    replayed = tracker.influence("q", all_samples=True)  # the adjoint replay of the recorded run
    rows = [int((replayed.sample_ids == j).nonzero()) for j in PROBES]
    torch.testing.assert_close(replayed.scores[rows], got, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU], ids=["lstm", "gru"])
def test_exact_is_the_retrained_run_without_the_sample(cell):
    """``"exact"`` evaluates each counterfactual's step gradient and query by a loop where vmap has no batching rule."""
    make_opt, _ = OPTIMIZERS["adamw"]
    x, y, query = _data()
    tracker = InfluenceTracker(track=list(PROBES), estimator="exact", queries={"q": query})
    base = eval_query_loss(seeded_fit(Recurrent(cell), make_opt, x, y, SCHEDULE, callbacks=[tracker]), query)
    got = tracker.influence("q").scores
    for row, j in enumerate(PROBES):
        w = torch.ones(N, dtype=torch.float64)
        w[j] = 0.0
        truth = eval_query_loss(seeded_fit(Recurrent(cell), make_opt, x, y, SCHEDULE, w), query) - base
        assert abs(float(got[row]) - truth) <= 1e-6 * abs(truth) + 1e-12, (j, float(got[row]), truth)


def test_a_float32_lstm_without_forward_mode_derivatives_gets_the_same_products_by_reverse_mode():
    x, y, _ = _data()
    out = {}
    for dtype in (torch.float64, torch.float32):  # float32 on the CPU runs mkldnn's LSTM: no forward-mode AD
        net = Recurrent(nn.LSTM, dtype)
        layout = FlatParameters.from_groups([list(net.named_parameters())])
        loss = FunctionalLoss(net, lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"), layout)
        theta = layout.flatten([p.detach() for p in net.parameters()])
        directions = torch.linspace(-1, 1, 2 * theta.numel(), dtype=dtype).reshape(2, -1)
        out[dtype] = loss.hvp_and_directional(theta, [(x[:6], y[:6]), (x[6:], y[6:])], directions, weights=[0.5, 0.5])
    hu64, (a64, b64) = out[torch.float64]
    hu32, (a32, b32) = out[torch.float32]
    torch.testing.assert_close(hu32.double(), hu64, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.cat([a32, b32], 1).double(), torch.cat([a64, b64], 1), rtol=1e-4, atol=1e-5)
