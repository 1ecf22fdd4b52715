"""The HVP's two methods agree, and ``choose_hvp`` keeps the cheapest per row (on a simulated clock: the
choice logic is tested, not this machine's speed)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_influence import InfluenceTracker
from lightning_influence.autodiff.functional import FlatParameters, FunctionalLoss
from lightning_influence.autodiff.hvp_plan import HvpChoice, choose_hvp
from lightning_influence.testing import (
    TinyClassifier,
    cross_entropy_losses,
    fixed_loader,
    lightning_trainer,
    random_classification,
    random_schedule,
)


def test_loop_and_vmap_give_the_same_hvp():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    layout = FlatParameters.from_groups([list(net.named_parameters())])
    loss = FunctionalLoss(net, lambda m, b: cross_entropy_losses(m, b[0], b[1]), layout)
    x, y, _ = random_classification(16, 4, 3)
    theta = layout.flatten([p.detach() for p in net.parameters()])
    V = torch.randn(6, theta.numel(), dtype=torch.float64)
    grads, hvps = [], []
    for method in ("loop", "vmap"):
        g, hvp, losses = loss.linearize(theta, [(x, y)], method=method)
        grads.append(g)
        hvps.append(hvp(V))
        assert hvp.method == method and losses[0].shape == (16,)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(hvps[0], hvps[1], rtol=1e-12, atol=1e-14)
    hessian = torch.func.hessian(lambda t: loss.step_loss_and_losses(t, [(x, y)], [1.0], None)[0])(theta)
    torch.testing.assert_close(hvps[0], V @ hessian, rtol=1e-10, atol=1e-12)


class SimulatedStep:
    """A step whose HVP builds and calls advance a simulated clock. Building the graph costs ``build[method]``;
    applying it to c rows costs ``call + row × c`` with vmap and ``single × c`` in the loop."""

    def __init__(self, build: dict[str, float], call: float, row: float, single: float) -> None:
        self.now, self.build_cost, self.call, self.row, self.single, self.calls = 0.0, build, call, row, single, []

    def clock(self) -> float:
        return self.now

    def build(self, method: str):
        self.now += self.build_cost[method]

        def hvp(V: torch.Tensor) -> torch.Tensor:
            rows = V.shape[0]
            self.now += rows * self.single if method == "loop" else self.call + self.row * rows
            self.calls.append((method, rows))
            return V

        return hvp


SMALL_MODEL = (1e-3, 1e-5, 1e-3)  # call overhead dominates: vmap is far cheaper per row
LARGE_MODEL = (1e-3, 0.5, 0.2)  # vmap's batched kernels cost more per row than separate backwards


@pytest.mark.parametrize(
    "k, build, costs, expected",
    [
        (1000, {"loop": 1e-3, "vmap": 2e-3}, SMALL_MODEL, ("vmap", 128)),  # as wide as allowed
        (1, {"loop": 1e-3, "vmap": 2e-3}, SMALL_MODEL, ("loop", 1)),  # one row: the cheaper graph wins
        (1000, {"loop": 1e-3, "vmap": 2e-3}, LARGE_MODEL, ("loop", 128)),
        (1000, {"loop": 1e-3, "vmap": 2e-3}, (0.2, 0.1, 0.5), ("vmap", 2)),  # the next call would exceed 1 s
    ],
)
def test_choose_hvp_keeps_the_cheapest_step(k, build, costs, expected):
    step = SimulatedStep(build, *costs)
    choice = choose_hvp(step.build, torch.zeros(k, 3), max_rows=128, budget_seconds=1.0, clock=step.clock)
    assert (choice.method, choice.rows) == expected
    assert {"loop build", "loop/row", "vmap build"} <= set(choice.seconds)
    assert max(rows for _, rows in step.calls) <= 128


class WideningCostStep(SimulatedStep):
    """vmap's cost per row grows by ``growth`` with every ×4 of the rows (cache pressure on a wide call)."""

    def __init__(self, growth: float) -> None:
        super().__init__({"loop": 1.0, "vmap": 1e-3}, 0.0, 1e-4, 1.0)
        self.growth = growth

    def build(self, method: str):
        self.now += self.build_cost[method]

        def hvp(V: torch.Tensor) -> torch.Tensor:
            rows = V.shape[0]
            self.now += self.single * rows if method == "loop" else self.row * rows * self.growth ** math.log(rows, 4)
            return V

        return hvp


@pytest.mark.parametrize("growth, rows", [(1.05, 128), (1.3, 2)])
def test_choose_hvp_takes_the_wider_call_within_the_tie(growth, rows):
    """Per-row costs within 10% are a tie (timing noise): the wider call wins, with fewer calls per step."""
    step = WideningCostStep(growth)
    choice = choose_hvp(step.build, torch.zeros(1000, 3), max_rows=128, budget_seconds=1.0, clock=step.clock)
    assert (choice.method, choice.rows) == ("vmap", rows)


def test_a_tuned_tracker_gives_the_same_scores_as_a_fixed_chunk():
    x, y, query = random_classification(24, 4, 3)
    schedule = random_schedule(24, 6, 2, seed=1)
    scores = []
    for chunk in (None, 5):
        torch.manual_seed(2)
        net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
        tracker = InfluenceTracker(queries={"q": query}, hvp_chunk_size=chunk, write_artifacts=False)
        module = TinyClassifier(net, lambda m: torch.optim.AdamW(m.parameters(), lr=0.03))
        lightning_trainer(2, callbacks=[tracker]).fit(module, fixed_loader(x, y, schedule))
        choice = tracker.engine.hvp_choice
        assert choice is not None and (choice.seconds == {}) == (chunk is not None)
        scores.append(tracker.influence("q").scores)
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-10, atol=1e-14)


def test_the_step_estimate_is_the_measured_build_plus_the_rows():
    loop = HvpChoice("loop", 4, {"loop build": 0.010, "loop/row": 0.002})
    assert abs(loop.step_seconds(5) - (0.010 + 5 * 0.002)) < 1e-12
    vmapped = HvpChoice("vmap", 8, {"vmap build": 0.004, "vmap×8/row": 0.001})
    assert abs(vmapped.step_seconds(10) - (0.004 + 2 * 8 * 0.001)) < 1e-12  # two calls of 8 rows
    assert HvpChoice("vmap", 8).step_seconds(10) is None  # nothing measured
