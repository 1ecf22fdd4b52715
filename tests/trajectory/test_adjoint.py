"""The adjoint sweep ([concepts.md: Every sample at once]) against the forward ``"first-order"`` engine, on runs
simulated with a plain training loop (float64, no Trainer): duality for every sample, windows seeded at an intermediate
boundary, unseen samples, and the per-step structure (one vectorised HVP, one vectorised JVP per micro-batch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
from torch import nn

from lightning_influence.autodiff.functional import FlatParameters, FunctionalLoss
from lightning_influence.estimators.engine import InfluenceEngine, MicroBatch
from lightning_influence.optimizers import OptimizerStep, flat_optimizer_state, model_optimizer, read_step_groups
from lightning_influence.optimizers.clipping import NormClip, ValueClip
from lightning_influence.testing import cross_entropy_losses
from lightning_influence.trajectory.adjoint import AdjointStep, AdjointSweep

DTYPE = torch.float64
NUM_SAMPLES, UNSEEN, STEPS = 10, 9, 6  # sample 9 is in no batch
MIDDLE = 3  # an intermediate window boundary


@dataclass
class Run:
    """How to train: the optimizer (param groups of the MLP's two layers), schedule, clip and loss."""

    optimizer: Callable[[list[dict]], torch.optim.Optimizer]
    groups: tuple[dict, dict] = ({}, {})  # per-layer hyper-parameters
    scheduler: Callable | None = None
    clip: tuple[str, float] | None = None  # ("norm" | "value", threshold)
    micro_sizes: tuple[int, ...] = (4,)  # one micro-batch per step, or several (gradient accumulation)
    track_first_layer: bool = True  # False: the first layer is an untracked constant of the loss
    regularizer: Callable | None = None
    clipped_steps: list[bool] = field(default_factory=list)  # filled by the simulation


def _sgd(**kw):
    return lambda groups: torch.optim.SGD(groups, **{"lr": 0.1, **kw})


def _adam(cls=torch.optim.Adam, **kw):
    return lambda groups: cls(groups, **{"lr": 0.01, **kw})


RUNS = {
    "sgd": Run(_sgd()),
    "momentum": Run(_sgd(momentum=0.9, dampening=0.1)),
    "nesterov": Run(_sgd(momentum=0.9, nesterov=True, weight_decay=0.01)),
    "sgd-weight-decay": Run(_sgd(weight_decay=0.05)),
    "adam": Run(_adam()),
    "adam-l2": Run(_adam(weight_decay=0.1)),
    "adamw": Run(_adam(torch.optim.AdamW, weight_decay=0.1)),
    "two-groups-adamw": Run(
        _adam(torch.optim.AdamW), ({"lr": 0.02, "weight_decay": 0.1, "betas": (0.8, 0.99)}, {"weight_decay": 0.0})
    ),
    "two-groups-sgd": Run(_sgd(), ({"momentum": 0.9}, {"lr": 0.05, "weight_decay": 0.1})),
    "lr-schedule": Run(_sgd(momentum=0.5), scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.7)),
    "norm-clip": Run(_adam(), clip=("norm", 0.3)),
    "value-clip": Run(_sgd(momentum=0.9), clip=("value", 0.05)),
    "accumulation": Run(_adam(torch.optim.AdamW, weight_decay=0.1), micro_sizes=(3, 2)),
    "frozen-subset": Run(_adam(torch.optim.AdamW, weight_decay=0.1), clip=("norm", 0.3), track_first_layer=False),
    "regularizer": Run(_sgd(momentum=0.9), regularizer=lambda m: 0.05 * m[0].weight.pow(2).sum()),
}


def _losses(module, batch):
    return cross_entropy_losses(module, batch[0], batch[1])


@dataclass
class Simulation:
    loss: FunctionalLoss
    jacobian: object
    steps: list[AdjointStep]
    queries: list[torch.Tensor]  # ∇ of the query loss at each boundary s = 0..STEPS, Tensor[p]


def _record_step(run: Run, net, opt, tracked, layout, micro) -> AdjointStep:
    """One real training step on ``micro`` (``[(batch, ids, weight)]``) with what the sweep needs of it."""
    opt.zero_grad()
    for batch, _, weight in micro:
        loss = _losses(net, batch).mean() + (run.regularizer(net) if run.regularizer else 0.0)
        (weight * loss).backward()
    untracked = [p for p in net.parameters() if all(p is not q for q in tracked)]
    raw = layout.flatten([p.grad for p in tracked])
    clip = None
    if run.clip and run.clip[0] == "norm":
        clip = NormClip(raw, run.clip[1], sum(float(p.grad.pow(2).sum()) for p in untracked))
        torch.nn.utils.clip_grad_norm_(net.parameters(), run.clip[1])
        run.clipped_steps.append(clip.scale < 1)
    elif run.clip:
        clip = ValueClip(raw, run.clip[1])
        torch.nn.utils.clip_grad_value_(net.parameters(), run.clip[1])
        run.clipped_steps.append(bool((raw.abs() > run.clip[1]).any()))
    groups = read_step_groups(opt, _tracked_groups(run, net), layout.group_slices)
    theta, grad = layout.flatten([p.detach() for p in tracked]), layout.flatten([p.grad for p in tracked])
    frozen = {n: p.detach().clone() for n, p in net.named_parameters() if all(p is not q for q in tracked)}
    opt.step()
    post = flat_optimizer_state(opt, tracked, ("exp_avg", "exp_avg_sq"))
    opt_step = OptimizerStep(groups, theta, grad, post["exp_avg"], post["exp_avg_sq"])
    return AdjointStep(opt_step, micro, clip, frozen)


def _tracked_groups(run: Run, net) -> list[list[nn.Parameter]]:
    return [list(net[0].parameters()) if run.track_first_layer else [], list(net[2].parameters())]


def simulate(run: Run, seed: int = 0) -> Simulation:
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(NUM_SAMPLES, 3, generator=gen, dtype=DTYPE), torch.randint(0, 3, (NUM_SAMPLES,), generator=gen)
    xq, yq = torch.randn(5, 3, generator=gen, dtype=DTYPE), torch.randint(0, 3, (5,), generator=gen)
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DTYPE)
    layers = [net[0], net[2]]
    opt = run.optimizer([{"params": list(m.parameters()), **kw} for m, kw in zip(layers, run.groups)])
    sched = run.scheduler(opt) if run.scheduler else None
    named = [[(f"{i}.{n}", p) for n, p in m.named_parameters()] for i, m in zip((0, 2), layers)]
    if not run.track_first_layer:
        named[0] = []
    layout = FlatParameters.from_groups(named)
    tracked = [p for group in named for _, p in group]
    loss = FunctionalLoss(net, _losses, layout, run.regularizer)
    steps, queries = [], []
    for _ in range(STEPS):
        queries.append(_query_gradient(loss, layout, net, tracked, (xq, yq)))
        micro = []
        for size in run.micro_sizes:
            ids = torch.randperm(UNSEEN, generator=gen)[:size]
            micro.append(((x[ids], y[ids]), ids, 1.0 / len(run.micro_sizes)))
        steps.append(_record_step(run, net, opt, tracked, layout, micro))
        if sched:
            sched.step()
    queries.append(_query_gradient(loss, layout, net, tracked, (xq, yq)))
    return Simulation(loss, model_optimizer(opt).jacobian, steps, queries)


def _query_gradient(loss, layout, net, tracked, batch) -> torch.Tensor:
    """∇ of the mean query loss at the current parameters (untracked ones held at their current values)."""
    frozen = {n: p.detach() for n, p in net.named_parameters() if all(p is not q for q in tracked)}
    theta = layout.flatten([p.detach() for p in tracked])
    return torch.func.grad(lambda t: loss.per_sample_losses(t, batch, frozen).mean())(theta)


def forward_scores(sim: Simulation, vectors: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """The forward ``"first-order"`` engine tracking every sample: ``{s: δθ(s) @ vectors[s]ᵀ}`` (``Tensor[k, n]``)."""
    p = sim.loss.layout.numel
    engine = InfluenceEngine(
        sim.loss, sim.jacobian, NUM_SAMPLES, "first-order", NUM_SAMPLES, DTYPE, torch.device("cpu")
    )
    out = {}
    for t in range(STEPS + 1):
        if t in vectors:
            out[t] = engine.theta @ vectors[t].reshape(-1, p).T
        if t == STEPS:
            break
        step = sim.steps[t]
        parts = [MicroBatch(b, ids.numel(), ids, torch.arange(ids.numel()), w) for b, ids, w in step.micro_batches]
        engine.step(parts, step.opt_step, frozen=step.frozen, clip=step.clip)
    return out


def adjoint_scores(sim: Simulation, vectors: dict[int, torch.Tensor], chunk_size=None, loss=None) -> dict:
    """The sweep with the rows of ``vectors[s]`` (``Tensor[n, p]``) seeded at boundary s: ``{s: Tensor[k, n]}``."""
    rows, start = {}, 0
    for s, v in vectors.items():
        rows[s] = torch.arange(start, start + v.shape[0])
        start += v.shape[0]
    sweep = AdjointSweep(loss or sim.loss, sim.jacobian, NUM_SAMPLES, start, DTYPE, torch.device("cpu"), chunk_size)
    for t in range(STEPS, -1, -1):
        if t in vectors:
            sweep.seed(rows[t], vectors[t])
        if t:
            sweep.step_back(sim.steps[t - 1])
    return {s: sweep.scores[r].T for s, r in rows.items()}


def _assert_same(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert expected.abs().max() > 0
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-8 * float(expected.abs().max()))


def _vectors(sim: Simulation, seed: int = 1) -> dict[int, torch.Tensor]:
    """Query gradients and a random vector at the end, the query gradient at an intermediate boundary."""
    random = torch.randn(sim.loss.layout.numel, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)
    return {STEPS: torch.stack([sim.queries[STEPS], random]), MIDDLE: sim.queries[MIDDLE][None]}


@pytest.mark.parametrize("name", list(RUNS))
def test_adjoint_scores_equal_forward_first_order_scores(name):
    run = RUNS[name]
    run.clipped_steps.clear()
    sim = simulate(run)
    if run.clip:  # the clip must matter on some steps and not on others
        assert any(run.clipped_steps), run.clipped_steps
    vectors = _vectors(sim)
    expected, got = forward_scores(sim, vectors), adjoint_scores(sim, vectors)
    for s in vectors:  # I_j(s) for every sample, at the end and at the intermediate boundary
        _assert_same(got[s], expected[s])
        assert torch.equal(got[s][UNSEEN], torch.zeros_like(got[s][UNSEEN]))
    # a window [MIDDLE, STEPS] for the same query: I(b) − I(a), as ⟨∇q(θ_b), δθ(b)⟩ − ⟨∇q(θ_a), δθ(a)⟩
    _assert_same(got[STEPS][:, 0] - got[MIDDLE][:, 0], expected[STEPS][:, 0] - expected[MIDDLE][:, 0])


def test_rows_and_chunks_are_independent():
    sim = simulate(RUNS["adamw"])
    vectors = _vectors(sim)
    whole = adjoint_scores(sim, vectors)
    chunked = adjoint_scores(sim, vectors, chunk_size=1)
    alone = adjoint_scores(sim, {STEPS: vectors[STEPS][1:]})
    for s in vectors:
        torch.testing.assert_close(chunked[s], whole[s], rtol=1e-12, atol=1e-16)
    torch.testing.assert_close(alone[STEPS][:, 0], whole[STEPS][:, 1], rtol=1e-12, atol=1e-16)


class _SpyLoss:
    """Counts what the sweep asks of the loss; per-sample gradients are forbidden."""

    def __init__(self, loss: FunctionalLoss) -> None:
        self.inner, self.linearizations, self.hvp_rows, self.per_sample_calls = loss, 0, [], 0

    def __getattr__(self, name):
        if name.startswith("sample_gradients"):
            raise AssertionError(f"the sweep must not call {name}")
        return getattr(self.inner, name)

    def hvp_and_directional(self, theta, batches, directions, *args, **kwargs):
        self.linearizations += 1
        self.hvp_rows.append(directions.shape[0])
        self.per_sample_calls += len(batches)
        return self.inner.hvp_and_directional(theta, batches, directions, *args, **kwargs)


def test_each_step_is_one_vectorised_forward_over_reverse_pass():
    """Per step, one pass vectorised over the active rows gives H u and the in-batch ⟨u, ∇ℓ_i⟩ of every
    micro-batch; no per-sample gradient is formed."""
    sim = simulate(RUNS["accumulation"])
    spy = _SpyLoss(sim.loss)
    adjoint_scores(sim, _vectors(sim), loss=spy)
    # rows seeded at the end are active on every step, the intermediate boundary's row from MIDDLE on
    assert spy.linearizations == STEPS
    assert spy.hvp_rows == [2] * (STEPS - MIDDLE) + [3] * MIDDLE
    assert spy.per_sample_calls == STEPS * len(RUNS["accumulation"].micro_sizes)


def test_a_sweep_with_no_seeded_row_does_nothing():
    sim = simulate(RUNS["sgd"])
    spy = _SpyLoss(sim.loss)
    sweep = AdjointSweep(spy, sim.jacobian, NUM_SAMPLES, 2, DTYPE, torch.device("cpu"))
    sweep.step_back(sim.steps[-1])
    assert spy.linearizations == 0 and not sweep.scores.any()
