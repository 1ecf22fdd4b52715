"""The optimizer models' four maps against each other and against ``torch.optim`` (float64, no Trainer):
``apply`` is the real step, the linear ``advance`` is the derivative of ``apply``, ``transpose`` is the
transpose of the linear ``advance`` (dot-product test), and the state readers read a live optimizer."""

from __future__ import annotations

import pytest
import torch

from lightning_influence.optimizers import (
    STATE_KEYS,
    OptimizerStep,
    flat_optimizer_state,
    model_optimizer,
    read_group_step,
    read_step_groups,
)
from lightning_influence.optimizers.clipping import NormClip, ValueClip

DTYPE = torch.float64
SIZES = (5, 3, 2)  # the third param group is never tracked: an empty region
P = 8
REGIONS = [slice(0, 5), slice(5, 8), slice(8, 8)]
BLOCK_OF = {"exp_avg": "m", "exp_avg_sq": "v", "momentum_buffer": "buf"}

CASES = {
    "sgd": (torch.optim.SGD, [{"lr": 0.1}, {"lr": 0.05}]),
    "sgd-wd": (torch.optim.SGD, [{"lr": 0.1, "weight_decay": 0.1}, {"lr": 0.05, "weight_decay": 0.3}]),
    "momentum": (torch.optim.SGD, [{"lr": 0.1, "momentum": 0.9}, {"lr": 0.05, "momentum": 0.5, "weight_decay": 0.1}]),
    "dampening": (
        torch.optim.SGD,
        [{"lr": 0.1, "momentum": 0.9, "dampening": 0.3}, {"lr": 0.05, "momentum": 0.5, "dampening": 0.9}],
    ),
    "nesterov": (
        torch.optim.SGD,
        [
            {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
            {"lr": 0.05, "momentum": 0.5, "nesterov": True},
        ],
    ),
    "momentum-one-group": (torch.optim.SGD, [{"lr": 0.1, "momentum": 0.9}, {"lr": 0.05}]),
    "adam": (torch.optim.Adam, [{"lr": 0.01}, {"lr": 0.02, "betas": (0.8, 0.99), "eps": 1e-6}]),
    "adam-l2": (
        torch.optim.Adam,
        [{"lr": 0.01, "weight_decay": 0.1}, {"lr": 0.02, "betas": (0.8, 0.99), "weight_decay": 0.5}],
    ),
    "adamw": (
        torch.optim.AdamW,
        [{"lr": 0.01, "weight_decay": 0.1}, {"lr": 0.02, "betas": (0.8, 0.99), "weight_decay": 0.5}],
    ),
    "adam-decoupled": (torch.optim.Adam, [{"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True}] * 2),
}
# step counts after the update per tracked group: fresh state, an older state, or one of each
VARIANTS = {"fresh": (1, 1), "later": (4, 7), "mixed": (1, 3)}


def _optimizer(name: str, model: str = "auto"):
    """A real optimizer over three parameters (one per group), and its model."""
    cls, kwargs = CASES[name]
    params = [torch.zeros(n, dtype=DTYPE, requires_grad=True) for n in SIZES]
    opt = cls([{"params": [q], **kw} for q, kw in zip(params, [*kwargs, kwargs[0]])])
    return opt, params, model_optimizer(opt, model).jacobian


def _groups(opt, variant: str):
    steps = (*VARIANTS[variant], 1)
    return [read_group_step(g, r, c, c == 1) for g, r, c in zip(opt.param_groups, REGIONS, steps)]


def _random_step(opt, variant: str, gen) -> tuple[OptimizerStep, dict]:
    """A pre-step point with a made-up pre-step state, and its factual post-step moments."""
    theta, grad = torch.randn(P, generator=gen, dtype=DTYPE), torch.randn(P, generator=gen, dtype=DTYPE)
    v = torch.randn(P, generator=gen, dtype=DTYPE).pow(2) + 0.1
    pre = {"exp_avg": torch.randn(P, generator=gen, dtype=DTYPE), "exp_avg_sq": v}
    pre["momentum_buffer"] = torch.randn(P, generator=gen, dtype=DTYPE)
    return OptimizerStep(_groups(opt, variant), theta, grad), pre


def _with_moments(jac, step: OptimizerStep, pre: dict) -> OptimizerStep:
    _, post = jac.apply(step, pre)
    return OptimizerStep(step.groups, step.theta, step.grad, post.get("exp_avg"), post.get("exp_avg_sq"))


def _dot(a: dict, b: dict) -> float:
    return sum(float((a[k] * b[k]).sum()) for k in a)


# ======================================================================== transpose


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("model", ["auto", "sgd"])
@pytest.mark.parametrize("name", list(CASES))
def test_transpose_is_the_transpose_of_the_linear_map(name, model, variant):
    gen = torch.Generator().manual_seed(0)
    opt, _, jac = _optimizer(name, model)
    step, pre = _random_step(opt, variant, gen)
    step = _with_moments(jac, step, pre)
    if step.exp_avg_sq is not None:  # exercise the v̂ = 0 branch too (a larger ε keeps 1/(√v̂+ε) moderate there)
        step.exp_avg_sq[2] = 0.0
        step.groups[0].eps = 1e-2
    c = 3
    s = {b: torch.randn(c, P, generator=gen, dtype=DTYPE) for b in jac.blocks}
    delta_g = torch.randn(c, P, generator=gen, dtype=DTYPE)
    lam = {b: torch.randn(c, P, generator=gen, dtype=DTYPE) for b in jac.blocks}

    forward = {b: x.clone() for b, x in s.items()}
    jac.advance(forward, delta_g.clone(), step, exact=False)
    back = {b: x.clone() for b, x in lam.items()}
    u = jac.transpose(back, step)
    lhs, rhs = _dot(lam, forward), _dot(back, s) + float((u * delta_g).sum())
    assert abs(lhs - rhs) <= 1e-12 * max(abs(lhs), 1.0)
    assert u.shape == (c, P) and not u[:, REGIONS[2]].numel()


@pytest.mark.parametrize("active", [True, False], ids=["clipping", "not-clipping"])
@pytest.mark.parametrize("kind", ["norm", "value"])
def test_clip_transpose_is_the_transpose_of_its_jacobian(kind, active):
    gen = torch.Generator().manual_seed(1)
    grad = torch.randn(P, generator=gen, dtype=DTYPE)
    if kind == "norm":
        clip = NormClip(grad, 0.5 if active else 100.0, other_sq_norm=0.3)
        assert (clip.scale < 1) == active
    else:
        clip = ValueClip(grad, 0.7 if active else 100.0)
        assert bool((grad.abs() >= 0.7).any()) and bool((grad.abs() < 0.7).any())
    delta, lam = torch.randn(4, P, generator=gen, dtype=DTYPE), torch.randn(4, P, generator=gen, dtype=DTYPE)
    lam_before = lam.clone()
    lhs = float((lam * clip.perturb(delta.clone(), exact=False)).sum())
    rhs = float((clip.transpose(lam) * delta).sum())
    assert abs(lhs - rhs) <= 1e-12 * max(abs(lhs), 1.0)
    assert torch.equal(lam, lam_before)  # transpose leaves its input alone


# ============================================================= apply vs torch.optim


def _real_step(opt, params, grad: torch.Tensor):
    """Read the tracker's view of the step, run the real step; return (groups, pre, θ, θ', post)."""
    tracked = params[:2]  # the third group's parameter is untracked and gets no gradient: no state
    for q, r in zip(tracked, REGIONS):
        q.grad = grad[r].clone()
    theta = torch.cat([q.detach().clone() for q in tracked])
    groups = read_step_groups(opt, [[params[0]], [params[1]], []], REGIONS)
    pre = flat_optimizer_state(opt, tracked)
    opt.step()
    post = flat_optimizer_state(opt, tracked)
    return groups, pre, theta, torch.cat([q.detach().clone() for q in tracked]), post


@pytest.mark.parametrize("name", list(CASES))
def test_apply_is_the_real_step(name):
    gen = torch.Generator().manual_seed(2)
    opt, params, jac = _optimizer(name)
    with torch.no_grad():
        for q in params:
            q.copy_(torch.randn(q.shape, generator=gen, dtype=DTYPE))
    for t in range(4):
        for group in opt.param_groups:
            group["lr"] *= 0.8  # a schedule: read_step_groups reads the value the step uses
        grad = torch.randn(P, generator=gen, dtype=DTYPE)
        groups, pre, theta, theta_new, post = _real_step(opt, params, grad)
        counts = t + 1 if "m" in jac.blocks else 1  # SGD keeps no step count
        assert [g.step for g in groups] == [counts, counts, 1]
        got_theta, got_state = jac.apply(OptimizerStep(groups, theta, grad), pre)
        torch.testing.assert_close(got_theta, theta_new, rtol=0, atol=1e-12)
        assert set(got_state) == {k for k, v in post.items() if v is not None}
        for key, value in got_state.items():
            torch.testing.assert_close(value, post[key], rtol=0, atol=1e-12, msg=key)
        assert jac.predict(OptimizerStep(groups, theta, grad), pre).equal(got_theta)
    assert params[2].grad is None and params[2] not in opt.state


# ======================================================= linear map = derivative of apply


def _fd_direction(jac, step: OptimizerStep, pre: dict, gen) -> dict:
    """A perturbation of θ, g and every pre-step state the model keeps (none where the state does not exist)."""
    d = {"theta": torch.randn(P, generator=gen, dtype=DTYPE), "grad": torch.randn(P, generator=gen, dtype=DTYPE)}
    for key, block in BLOCK_OF.items():
        if block in jac.blocks:
            noise = torch.randn(P, generator=gen, dtype=DTYPE)
            d[key] = 0.5 * pre[key] * noise.tanh() if key == "exp_avg_sq" else noise  # keeps v + εδv > 0
    if "momentum_buffer" in d:
        for g in step.groups:
            if not g.momentum:
                d["momentum_buffer"][g.region] = 0
    return d


def _apply_at(jac, step: OptimizerStep, pre: dict, d: dict, eps: float):
    moved = OptimizerStep(step.groups, step.theta + eps * d["theta"], step.grad + eps * d["grad"])
    return jac.apply(moved, {k: v + eps * d[k] if k in d else v for k, v in pre.items()})


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name", list(CASES))
def test_linear_advance_is_the_derivative_of_apply(name, variant):
    gen = torch.Generator().manual_seed(3)
    opt, _, jac = _optimizer(name)
    step, pre = _random_step(opt, variant, gen)
    step = _with_moments(jac, step, pre)
    d = _fd_direction(jac, step, pre, gen)
    states = {"theta": d["theta"][None].clone()}
    states.update({b: d[k][None].clone() for k, b in BLOCK_OF.items() if b in jac.blocks})
    jac.advance(states, d["grad"][None].clone(), step, exact=False)

    eps = 1e-6
    (plus, plus_state), (minus, minus_state) = _apply_at(jac, step, pre, d, eps), _apply_at(jac, step, pre, d, -eps)
    expected = {"theta": (plus - minus) / (2 * eps)}
    expected.update({BLOCK_OF[k]: (plus_state[k] - minus_state[k]) / (2 * eps) for k in plus_state})
    assert set(expected) == set(states)
    for block, value in expected.items():
        err = float((states[block][0] - value).norm() / value.norm().clamp_min(1e-30))
        assert err <= 1e-7, (block, err)


# ==================================================================== state readers


def test_read_step_groups_and_flat_state_on_a_real_sgd():
    a, b, c = (torch.ones(n, dtype=DTYPE, requires_grad=True) for n in (3, 2, 4))
    opt = torch.optim.SGD([{"params": [a], "momentum": 0.9}, {"params": [b, c], "lr": 0.2}], lr=0.1, nesterov=False)
    groups = read_step_groups(opt, [[a], [b]], [slice(0, 3), slice(3, 5)])
    assert [g.first_momentum_step for g in groups] == [True, True] and [g.momentum for g in groups] == [0.9, 0.0]
    assert flat_optimizer_state(opt, [a, b]) == dict.fromkeys(STATE_KEYS)  # no state yet: every key None
    for q in (a, b, c):
        q.grad = torch.full_like(q, 2.0)
    opt.step()
    groups = read_step_groups(opt, [[a], [b]], [slice(0, 3), slice(3, 5)])
    assert groups[0].first_momentum_step is False and (groups[0].lr, groups[1].lr) == (0.1, 0.2)
    flat = flat_optimizer_state(opt, [b, a], keys=("momentum_buffer",))  # tracked_params order, zeros for b
    torch.testing.assert_close(flat["momentum_buffer"], torch.tensor([0, 0, 2, 2, 2], dtype=DTYPE))


def test_read_step_groups_and_flat_state_on_a_real_adam():
    a, b, frozen = (torch.ones(n, dtype=DTYPE, requires_grad=True) for n in (3, 2, 4))
    opt = torch.optim.AdamW(
        [{"params": [a], "betas": (0.8, 0.9)}, {"params": [frozen], "weight_decay": 0.5}, {"params": [b], "eps": 1e-5}],
        lr=0.1,
    )
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    slices = [slice(0, 3), slice(3, 3), slice(3, 5)]
    for t in range(3):
        groups = read_step_groups(opt, [[a], [], [b]], slices)
        assert [g.step for g in groups] == [t + 1, 1, t + 1]
        assert [g.lr for g in groups] == [0.1 * 0.5**t] * 3
        assert (groups[0].beta1, groups[0].beta2, groups[2].eps, groups[1].region) == (0.8, 0.9, 1e-5, slice(3, 3))
        a.grad, b.grad = torch.full_like(a, 1.0), torch.full_like(b, -1.0)
        opt.step()
        sched.step()
    flat = flat_optimizer_state(opt, [a, b])
    assert flat["momentum_buffer"] is None
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(flat[key], torch.cat([opt.state[a][key], opt.state[b][key]]), rtol=0, atol=0)
    flat["exp_avg"].add_(1)  # a copy: the optimizer's state is untouched
    assert not torch.equal(flat["exp_avg"][:3], opt.state[a]["exp_avg"])
