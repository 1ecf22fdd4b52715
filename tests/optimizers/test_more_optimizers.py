"""RMSprop, Adagrad, Adamax and Adam(W) with AMSGrad: the models' maps against ``torch.optim`` and against each other
(float64, no Trainer). ``apply`` is the real step for every flag combination (foreach / fused included); the linear
``advance`` is the central finite difference of ``apply`` in θ, the gradient and the pre-step state; the exact
``advance`` is the exact difference of ``apply`` for a finite perturbation; ``transpose`` passes the dot-product
test; and the options the models do not follow are refused by name."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from lightning_influence.errors import UnsupportedOptimizerError
from lightning_influence.optimizers import (
    STATE_KEYS,
    OptimizerStep,
    flat_optimizer_state,
    model_optimizer,
    read_group_step,
    read_step_groups,
)
from lightning_influence.optimizers.registry import jacobian_for_kind

DTYPE = torch.float64
SIZES = (5, 3, 2)  # the third param group is never tracked: an empty region
P = 8
REGIONS = [slice(0, 5), slice(5, 8), slice(8, 8)]
BLOCK_OF = {
    "exp_avg": "m",
    "exp_avg_sq": "v",
    "max_exp_avg_sq": "vmax",
    "momentum_buffer": "buf",
    "square_avg": "v",
    "grad_avg": "g_avg",
    "sum": "sum",
    "exp_inf": "u",
}
RMS, ADAGRAD, ADAMAX, RADAM = torch.optim.RMSprop, torch.optim.Adagrad, torch.optim.Adamax, torch.optim.RAdam

# name -> (class, per-group options of the two tracked groups, kind)
CASES = {
    "rmsprop": (RMS, [{"lr": 0.01}, {"lr": 0.02, "alpha": 0.9, "weight_decay": 0.1}], "rmsprop"),
    "rmsprop-momentum": (
        RMS,
        [{"lr": 0.01, "momentum": 0.9, "weight_decay": 0.05}, {"lr": 0.02, "eps": 1e-3}],
        "rmsprop",
    ),
    "rmsprop-centered": (
        RMS,
        [{"lr": 0.01, "centered": True}, {"lr": 0.02, "alpha": 0.8, "centered": True, "weight_decay": 0.1}],
        "rmsprop-centered",
    ),
    "rmsprop-centered-momentum": (
        RMS,
        [{"lr": 0.01, "centered": True, "momentum": 0.5}, {"lr": 0.02, "momentum": 0.8, "weight_decay": 0.1}],
        "rmsprop-centered",
    ),
    "adagrad": (ADAGRAD, [{"lr": 0.1}, {"lr": 0.05, "weight_decay": 0.1, "eps": 1e-6}], "adagrad"),
    "adagrad-decay": (
        ADAGRAD,
        [{"lr": 0.1, "lr_decay": 0.1, "initial_accumulator_value": 0.5}, {"lr": 0.05, "weight_decay": 0.2}],
        "adagrad",
    ),
    "adamax": (ADAMAX, [{"lr": 0.02}, {"lr": 0.01, "betas": (0.8, 0.95), "weight_decay": 0.1}], "adamax"),
    "adam-amsgrad": (
        torch.optim.Adam,
        [{"lr": 0.01, "amsgrad": True}, {"lr": 0.02, "betas": (0.8, 0.99), "weight_decay": 0.1, "amsgrad": True}],
        "adam-amsgrad",
    ),
    "adamw-amsgrad": (
        torch.optim.AdamW,
        [{"lr": 0.01, "amsgrad": True, "weight_decay": 0.1}, {"lr": 0.02, "amsgrad": True, "weight_decay": 0.3}],
        "adamw-amsgrad",
    ),
    "nadam": (
        torch.optim.NAdam,
        [{"lr": 0.01}, {"lr": 0.02, "betas": (0.8, 0.99), "weight_decay": 0.1, "momentum_decay": 0.01}],
        "nadam",
    ),
    "nadam-decoupled": (
        torch.optim.NAdam,
        [{"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True}, {"lr": 0.02, "weight_decay": 0.05}],
        "nadam",
    ),
    "radam": (RADAM, [{"lr": 0.01}, {"lr": 0.02, "betas": (0.8, 0.9), "weight_decay": 0.1}], "radam"),
    "radam-decoupled": (
        RADAM,
        [{"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True}, {"lr": 0.02, "betas": (0.9, 0.9)}],
        "radam",
    ),
    "adam-amsgrad-one-group": (
        torch.optim.Adam,
        [{"lr": 0.01, "amsgrad": True}, {"lr": 0.02, "weight_decay": 0.1}],
        "adam-amsgrad",
    ),
}
# the implementations torch has for each class (CPU): every one computes the same step
IMPLEMENTATIONS = {
    RMS: [{"foreach": False}, {"foreach": True}],
    ADAGRAD: [{"foreach": False}, {"foreach": True}, {"fused": True}],
    ADAMAX: [{"foreach": False}, {"foreach": True}],
    torch.optim.NAdam: [{"foreach": False}, {"foreach": True}],
    RADAM: [{"foreach": False}, {"foreach": True}],
    torch.optim.Adam: [{"foreach": False}, {"foreach": True}, {"fused": True}],
    torch.optim.AdamW: [{"foreach": False}, {"foreach": True}, {"fused": True}],
}
# step counts after the update per tracked group: fresh state, an older state, or one of each
VARIANTS = {"fresh": (1, 1), "later": (4, 7), "mixed": (1, 3)}


def _optimizer(name: str, **options):
    """A real optimizer over three parameters (one per group), and its model."""
    cls, kwargs, _ = CASES[name]
    params = [torch.zeros(n, dtype=DTYPE, requires_grad=True) for n in SIZES]
    opt = cls([{"params": [q], **kw} for q, kw in zip(params, [*kwargs, kwargs[0]])], **options)
    return opt, params, model_optimizer(opt).jacobian


def _groups(opt, variant: str):
    steps = (*VARIANTS[variant], 1)
    return [read_group_step(g, r, c, c == 1) for g, r, c in zip(opt.param_groups, REGIONS, steps)]


def _random_pre_state(gen) -> dict:
    """A plausible pre-step state for every key (moments ≥ 0 where they must be; centered: v > a²; both branches
    of AMSGrad's and Adamax's maximum occur)."""

    def randn():
        return torch.randn(P, generator=gen, dtype=DTYPE)

    pre = {key: randn() for key in ("exp_avg", "momentum_buffer")}
    pre["grad_avg"] = 0.3 * randn()
    for key in ("exp_avg_sq", "square_avg", "sum"):
        pre[key] = randn().pow(2) + 0.1 + pre["grad_avg"] ** 2
    pre["max_exp_avg_sq"] = pre["exp_avg_sq"] * (0.5 + torch.rand(P, generator=gen, dtype=DTYPE))
    pre["exp_inf"] = randn().abs() + 0.1
    return pre


def _random_step(opt, jac, variant: str, gen) -> tuple[OptimizerStep, dict]:
    """A pre-step point, a made-up pre-step state, and the step carrying its factual post-step state."""
    theta, grad = torch.randn(P, generator=gen, dtype=DTYPE), torch.randn(P, generator=gen, dtype=DTYPE)
    pre = _random_pre_state(gen)
    step = OptimizerStep(_groups(opt, variant), theta, grad)
    _, post = jac.apply(step, pre)
    return step.with_post_state(post), pre


def _state_keys(jac, step: OptimizerStep, pre: dict) -> dict[str, str]:
    """{state key: block} of the state the model keeps."""
    _, post = jac.apply(step, pre)
    keys = {k: BLOCK_OF[k] for k in post}
    assert set(keys.values()) == set(jac.blocks) - {"theta"}
    return keys


def _direction(jac, step: OptimizerStep, pre: dict, gen, scale: float = 1.0) -> dict:
    """A perturbation of θ, g and the pre-step state (0 over a group whose state this step creates: the
    counterfactual state is created there too)."""
    d = {"theta": torch.randn(P, generator=gen, dtype=DTYPE), "grad": torch.randn(P, generator=gen, dtype=DTYPE)}
    for key in _state_keys(jac, step, pre):
        noise = torch.randn(P, generator=gen, dtype=DTYPE)
        squares = ("exp_avg_sq", "square_avg", "sum", "max_exp_avg_sq", "exp_inf")
        d[key] = 0.3 * pre[key] * noise.tanh() if key in squares else 0.3 * noise  # keeps squares positive
        if key == "grad_avg":  # keeps v − a² positive
            d[key] = 0.1 * pre[key] * noise.tanh()
        for g in step.groups:
            # fresh state, or a group that keeps no such state (e.g. no momentum): the state stays 0 there
            if g.step == 1 or not step.post_state[key][g.region].any():
                d[key][g.region] = 0
    return {k: scale * v for k, v in d.items()}


def _apply_at(jac, step: OptimizerStep, pre: dict, d: dict, eps: float):
    moved = OptimizerStep(step.groups, step.theta + eps * d["theta"], step.grad + eps * d["grad"])
    return jac.apply(moved, {k: v + eps * d[k] if k in d else v for k, v in pre.items()})


def _states(jac, keys: dict, d: dict) -> dict:
    states = {"theta": d["theta"][None].clone()}
    states.update({b: d[k][None].clone() for k, b in keys.items()})
    assert set(states) == set(jac.blocks)
    return states


def _introduce_previous_step(jac, step: OptimizerStep, pre: dict) -> None:
    """Let the model see the step before ``step``, whose post-step state is ``pre`` (the exact maps of the running
    maxima read the pre-step maximum from it)."""
    # (a fresh group has no step before: its pre-step state is 0, and the model knows it)
    before = OptimizerStep([replace(g, step=max(g.step - 1, 1)) for g in step.groups], step.theta, step.grad)
    before = before.with_post_state(pre)
    jac.advance({b: torch.zeros(1, P, dtype=DTYPE) for b in jac.blocks}, torch.zeros(1, P, dtype=DTYPE), before, True)


def _relative(got: torch.Tensor, want: torch.Tensor, floor: float = 1e-30) -> float:
    """‖got − want‖ / max(‖want‖, floor)."""
    return float((got - want).norm() / want.norm().clamp_min(floor))


def _dot(a: dict, b: dict) -> float:
    return sum(float((a[k] * b[k]).sum()) for k in a)


# ============================================================= apply vs torch.optim


def _real_step(opt, params, grad: torch.Tensor):
    """Read the tracker's view of the step, run the real step; return (groups, pre, θ, θ', post)."""
    tracked = params[:2]  # the third group's parameter is untracked and gets no gradient
    for q, r in zip(tracked, REGIONS):
        q.grad = grad[r].clone()
    theta = torch.cat([q.detach().clone() for q in tracked])
    groups = read_step_groups(opt, [[params[0]], [params[1]], []], REGIONS)
    pre = flat_optimizer_state(opt, tracked)
    opt.step()
    post = flat_optimizer_state(opt, tracked)
    return groups, pre, theta, torch.cat([q.detach().clone() for q in tracked]), post


@pytest.mark.parametrize(
    ("name", "options"),
    [
        pytest.param(name, options, id=f"{name}-{'-'.join(f'{k}' for k in options)}")
        for name, (cls, _, _) in CASES.items()
        for options in IMPLEMENTATIONS[cls]
    ],
)
def test_apply_is_the_real_step(name, options):
    gen = torch.Generator().manual_seed(2)
    opt, params, jac = _optimizer(name, **options)
    assert jac is not None and type(jac) is type(jacobian_for_kind(CASES[name][2], False))
    with torch.no_grad():
        for q in params:
            q.copy_(torch.randn(q.shape, generator=gen, dtype=DTYPE))
    for t in range(8):  # RAdam with β2 = 0.9 rectifies from step 7 on
        for group in opt.param_groups:
            group["lr"] *= 0.8  # a schedule: read_step_groups reads the value the step uses
        grad = torch.randn(P, generator=gen, dtype=DTYPE)
        groups, pre, theta, theta_new, post = _real_step(opt, params, grad)
        assert [g.step for g in groups] == [t + 1, t + 1, 1]
        got_theta, got_state = jac.apply(OptimizerStep(groups, theta, grad), pre)
        torch.testing.assert_close(got_theta, theta_new, rtol=1e-12, atol=1e-14)
        assert set(got_state) == {k for k, v in post.items() if v is not None}
        for key, value in got_state.items():
            torch.testing.assert_close(value, post[key], rtol=1e-12, atol=1e-14, msg=key)
    assert params[2].grad is None


# ======================================================= linear map = derivative of apply


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name", list(CASES))
def test_linear_advance_is_the_derivative_of_apply(name, variant):
    gen = torch.Generator().manual_seed(3)
    opt, _, jac = _optimizer(name)
    step, pre = _random_step(opt, jac, variant, gen)
    keys = _state_keys(jac, step, pre)
    d = _direction(jac, step, pre, gen)
    states = _states(jac, keys, d)
    jac.advance(states, d["grad"][None].clone(), step, exact=False)

    eps = 1e-5
    (plus, plus_state), (minus, minus_state) = _apply_at(jac, step, pre, d, eps), _apply_at(jac, step, pre, d, -eps)
    expected = {"theta": (plus - minus) / (2 * eps)}
    expected.update({keys[k]: (plus_state[k] - minus_state[k]) / (2 * eps) for k in plus_state})
    for block, value in expected.items():
        # the floor: at a fresh RMSprop / Adagrad state ĝ/√v' hardly depends on ĝ, so a block's derivative can be
        # ~1e-6, where the finite difference's round-off (~1e-16 / ε) alone is 1e-3 of it
        err = _relative(states[block][0], value, floor=1e-3)
        assert err <= 1e-6, (block, err)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name", list(CASES))
def test_exact_advance_is_the_difference_of_apply(name, variant):
    """A finite perturbation (large enough that the maxima switch branch somewhere)."""
    gen = torch.Generator().manual_seed(4)
    opt, _, jac = _optimizer(name)
    step, pre = _random_step(opt, jac, variant, gen)
    keys = _state_keys(jac, step, pre)
    d = _direction(jac, step, pre, gen, scale=0.5)
    _introduce_previous_step(jac, step, pre)
    states = _states(jac, keys, d)
    jac.advance(states, d["grad"][None].clone(), step, exact=True)

    (base, base_state), (moved, moved_state) = jac.apply(step, pre), _apply_at(jac, step, pre, d, 1.0)
    expected = {"theta": moved - base}
    expected.update({keys[k]: moved_state[k] - base_state[k] for k in moved_state})
    for block, value in expected.items():
        err = _relative(states[block][0], value)
        assert err <= 1e-10, (block, err)


@pytest.mark.parametrize("name", list(CASES))
def test_exact_advance_keeps_an_unperturbed_row_at_zero(name):
    gen = torch.Generator().manual_seed(5)
    opt, _, jac = _optimizer(name)
    step, _ = _random_step(opt, jac, "later", gen)
    states = {b: torch.zeros(2, P, dtype=DTYPE) for b in jac.blocks}
    jac.advance(states, torch.zeros(2, P, dtype=DTYPE), step, exact=True)  # no previous step seen: the fallback
    assert all(not s.any() for s in states.values())


# ======================================================================== transpose


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name", list(CASES))
def test_transpose_is_the_transpose_of_the_linear_map(name, variant):
    gen = torch.Generator().manual_seed(0)
    opt, _, jac = _optimizer(name)
    step, _ = _random_step(opt, jac, variant, gen)
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


# ================================================================ branches and ties


def test_amsgrad_ties_follow_the_new_value():
    """v̄' = v' exactly (a tie, or the new value won): the linear map carries δv'; v̄' > v': it carries δv̄."""
    opt, _, jac = _optimizer("adam-amsgrad")
    theta, grad = torch.ones(P, dtype=DTYPE), torch.zeros(P, dtype=DTYPE)
    step = OptimizerStep(_groups(opt, "later"), theta, grad)
    v = torch.full((P,), 0.5, dtype=DTYPE)
    vmax = torch.where(torch.arange(P) % 2 == 0, v, 2 * v)  # even: tie; odd: the running maximum won
    step = step.with_post_state({"exp_avg": torch.ones(P, dtype=DTYPE), "exp_avg_sq": v, "max_exp_avg_sq": vmax})
    states = {b: torch.zeros(1, P, dtype=DTYPE) for b in jac.blocks}
    states["v"].fill_(1.0)
    states["vmax"].fill_(3.0)
    jac.advance(states, torch.zeros(1, P, dtype=DTYPE), step, exact=False)
    beta2 = torch.tensor([step.groups[0].beta2] * 5 + [step.groups[1].beta2] * 3, dtype=DTYPE)
    expected = torch.where(torch.arange(P) % 2 == 0, beta2, 3.0)
    torch.testing.assert_close(states["vmax"][0], expected, rtol=0, atol=1e-15)


def test_adamax_ties_follow_the_fresh_value():
    opt, _, jac = _optimizer("adamax")
    grad = torch.tensor([0.5, -0.5, 0.5, -0.5, 0.5, 0.5, -0.5, 0.5], dtype=DTYPE)
    step = OptimizerStep(_groups(opt, "later"), torch.zeros(P, dtype=DTYPE), grad)
    eps = step.groups[0].eps
    fresh = grad.abs() + eps
    u = torch.where(torch.arange(P) < 4, fresh, 2 * fresh)  # first four: the fresh value won (or tied)
    step = step.with_post_state({"exp_avg": torch.ones(P, dtype=DTYPE), "exp_inf": u})
    states = {b: torch.zeros(1, P, dtype=DTYPE) for b in jac.blocks}
    states["u"].fill_(1.0)
    delta_g = torch.ones(1, P, dtype=DTYPE)
    jac.advance(states, delta_g, step, exact=False)
    beta2 = torch.tensor([step.groups[0].beta2] * 5 + [step.groups[1].beta2] * 3, dtype=DTYPE)
    expected = torch.where(torch.arange(P) < 4, grad.sign(), beta2)
    torch.testing.assert_close(states["u"][0], expected, rtol=0, atol=1e-15)


# ==================================================================== state readers and refusals


def test_state_keys_cover_every_modelled_state():
    for name in CASES:
        opt, params, jac = _optimizer(name)
        for q in params[:2]:
            q.grad = torch.ones_like(q)
        opt.step()
        kept = {k for p in params[:2] for k, v in opt.state[p].items() if torch.is_tensor(v) and v.shape == p.shape}
        assert kept <= set(STATE_KEYS), name
        assert set(jac.post_state_keys) <= kept, name


def test_read_step_groups_reads_the_new_hyper_parameters():
    a, b = (torch.ones(n, dtype=DTYPE, requires_grad=True) for n in (3, 2))
    opt = torch.optim.Adagrad(
        [{"params": [a], "lr_decay": 0.1}, {"params": [b], "initial_accumulator_value": 0.3}], lr=0.1
    )
    groups = read_step_groups(opt, [[a], [b]], [slice(0, 3), slice(3, 5)])
    assert [g.step for g in groups] == [1, 1]  # Adagrad's state exists from construction, at step 0
    assert (groups[0].lr_decay, groups[1].initial_accumulator_value) == (0.1, 0.3)
    opt = torch.optim.RMSprop([{"params": [a], "centered": True, "alpha": 0.7}, {"params": [b], "momentum": 0.2}])
    groups = read_step_groups(opt, [[a], [b]], [slice(0, 3), slice(3, 5)])
    assert (groups[0].centered, groups[0].alpha, groups[1].centered, groups[1].momentum) == (True, 0.7, False, 0.2)
    groups = read_step_groups(torch.optim.Adam([a], amsgrad=True), [[a]], [slice(0, 3)])
    assert groups[0].amsgrad is True
    opt = torch.optim.NAdam([{"params": [a], "decoupled_weight_decay": True}, {"params": [b]}], momentum_decay=0.01)
    for _ in range(3):  # the product after each step is the one torch stores once it has stepped
        groups = read_step_groups(opt, [[a], [b]], [slice(0, 3), slice(3, 5)])
        a.grad, b.grad = torch.ones_like(a), torch.ones_like(b)
        opt.step()
        assert [g.mu_product for g in groups] == [float(opt.state[q]["mu_product"]) for q in (a, b)]
    assert (groups[0].decoupled_weight_decay, groups[1].decoupled_weight_decay, groups[0].step) == (True, False, 3)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        pytest.param(lambda p: RMS(p, maximize=True), r"RMSprop\(maximize=True\) is not supported", id="maximize"),
        pytest.param(
            lambda p: ADAGRAD(p, differentiable=True),
            r"Adagrad\(differentiable=True\) is not supported.*differentiable=False",
            id="differentiable",
        ),
        pytest.param(
            lambda p: ADAMAX(p, capturable=True),
            r"Adamax\(capturable=True\) is not supported.*capturable=False",
            id="capturable",
        ),
        pytest.param(
            lambda p: RMS(p, capturable=True), r"RMSprop\(capturable=True\) is not supported", id="rms-capturable"
        ),
        pytest.param(
            lambda p: torch.optim.NAdam(p, capturable=True), r"NAdam\(capturable=True\) is not supported", id="nadam"
        ),
        pytest.param(lambda p: torch.optim.Rprop(p), r"Rprop cannot be modelled exactly", id="rprop"),
        pytest.param(lambda p: torch.optim.LBFGS(p), r"LBFGS cannot be modelled exactly", id="lbfgs"),
    ],
)
def test_what_is_still_refused(make, match):
    opt = make([torch.zeros(3, dtype=DTYPE, requires_grad=True)])
    with pytest.raises(UnsupportedOptimizerError, match=match):
        model_optimizer(opt)


@pytest.mark.parametrize(
    ("make", "kind", "blocks"),
    [
        (lambda p: RMS(p), "rmsprop", ("theta", "v")),
        (lambda p: RMS(p, momentum=0.9), "rmsprop", ("theta", "v", "buf")),
        (lambda p: RMS(p, centered=True, momentum=0.9), "rmsprop-centered", ("theta", "v", "buf", "g_avg")),
        (lambda p: ADAGRAD(p, fused=True), "adagrad", ("theta", "sum")),
        (lambda p: ADAMAX(p, foreach=True), "adamax", ("theta", "m", "u")),
        (lambda p: torch.optim.Adam(p, amsgrad=True), "adam-amsgrad", ("theta", "m", "v", "vmax")),
        (lambda p: torch.optim.AdamW(p, amsgrad=True, fused=True), "adamw-amsgrad", ("theta", "m", "v", "vmax")),
        (lambda p: torch.optim.NAdam(p, decoupled_weight_decay=True), "nadam", ("theta", "m", "v")),
        (lambda p: RADAM(p, foreach=True), "radam", ("theta", "m", "v")),
    ],
)
def test_the_model_each_optimizer_gets(make, kind, blocks):
    spec = model_optimizer(make([torch.zeros(3, dtype=DTYPE, requires_grad=True)]))
    assert (spec.kind, spec.jacobian.blocks) == (kind, blocks)
