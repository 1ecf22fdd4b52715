"""Unit tests on plain tensors (no Trainer): sample ids, the flat parameter layout, the optimizer
models against real ``torch.optim`` steps, the functional loss against autograd, and the result."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, IterableDataset, TensorDataset
from torch.utils.data.dataloader import default_collate

from lightning_influence import (
    IndexedDataset,
    InfluenceResult,
    NonFiniteInfluenceError,
    SampleIdError,
    default_sample_ids,
)
from lightning_influence.autodiff.functional import FlatParameters, FunctionalLoss, check_per_sample_losses
from lightning_influence.autodiff.hvp_plan import HvpChoice
from lightning_influence.core.state import BookingClock
from lightning_influence.estimators.engine import InfluenceEngine, MicroBatch, chunk_rows_for_budget
from lightning_influence.optimizers import (
    AdamJacobian,
    AdamWJacobian,
    OptimizerStep,
    SGDJacobian,
    model_optimizer,
    read_group_step,
)
from lightning_influence.sample_ids import PYTHON_ROWS, RowIndex, validate_sample_ids
from lightning_influence.testing import cross_entropy_losses

DTYPE = torch.float64

# ======================================================================================= data


class _Items(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        pytest.param((1.0, 2), (1.0, 2, 3), id="tuple"),
        pytest.param([1.0, 2], [1.0, 2, 3], id="list"),
        pytest.param({"x": 1.0}, {"x": 1.0, "sample_id": 3}, id="dict"),
        pytest.param(7.0, (7.0, 3), id="bare"),
    ],
)
def test_indexed_dataset_item(item, expected):
    ds = IndexedDataset(_Items([item] * 5))
    assert len(ds) == 5
    out = ds[3]
    assert out == expected and type(out) is type(expected)


@pytest.mark.parametrize(
    "items",
    [
        pytest.param([(torch.randn(2), 1)] * 6, id="tuple"),
        pytest.param([{"x": torch.randn(2), "y": 1}] * 6, id="dict"),
        pytest.param([torch.randn(2)] * 6, id="bare"),
    ],
)
def test_default_sample_ids_after_collate(items):
    batch = default_collate([IndexedDataset(_Items(items))[i] for i in (4, 0, 5)])
    ids = default_sample_ids(batch)
    assert ids.dtype == torch.long and ids.tolist() == [4, 0, 5]


def test_indexed_dataset_with_a_dataloader():
    x, y = torch.randn(10, 3), torch.arange(10)
    loader = DataLoader(
        IndexedDataset(TensorDataset(x, y)), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    for bx, by, ids in loader:
        assert torch.equal(bx, x[ids]) and torch.equal(by, y[ids])


def test_indexed_dataset_refuses_an_existing_sample_id_key():
    with pytest.raises(KeyError, match="already have a 'sample_id' key"):
        IndexedDataset(_Items([{"sample_id": 0}]))[0]


def test_indexed_dataset_refuses_iterable_datasets():
    class Stream(IterableDataset):
        def __iter__(self):
            yield 1

    with pytest.raises(TypeError, match=r"map-style dataset.*sample_ids="):
        IndexedDataset(Stream())


@pytest.mark.parametrize(
    ("batch", "match"),
    [
        pytest.param({"x": torch.zeros(2)}, r"dict without a 'sample_id' key", id="dict"),
        pytest.param(torch.zeros(4, 2), r"Cannot find sample ids in a training batch of type Tensor", id="tensor"),
        pytest.param([torch.zeros(2)], r"Cannot find sample ids in a training batch of type list", id="one-element"),
        pytest.param("abc", r"Cannot find sample ids in a training batch of type str", id="str"),
    ],
)
def test_default_sample_ids_errors(batch, match):
    with pytest.raises(SampleIdError, match=match):
        default_sample_ids(batch)


@pytest.mark.parametrize(
    "ids",
    [
        pytest.param(torch.tensor([3, 0, 9]), id="long"),
        pytest.param(torch.tensor([3, 0, 9], dtype=torch.int32), id="int32"),
        pytest.param([3, 0, 9], id="list"),
        pytest.param(torch.tensor([3, 0, 9]).numpy(), id="numpy"),
    ],
)
def test_validate_sample_ids_accepts(ids):
    out = validate_sample_ids(ids, 3, 10)
    assert out.dtype == torch.long and out.device.type == "cpu" and out.tolist() == [3, 0, 9]
    assert validate_sample_ids(ids, None, 10).tolist() == [3, 0, 9]


def test_validate_sample_ids_empty_batch():
    assert validate_sample_ids(torch.zeros(0, dtype=torch.long), 0, 10).numel() == 0


@pytest.mark.parametrize(
    ("ids", "batch_size", "match"),
    [
        pytest.param(torch.tensor([0.0, 1.0]), None, r"1-D integer tensor.*float32", id="float"),
        pytest.param(torch.tensor([[0, 1]]), None, r"1-D integer tensor.*shape=\(1, 2\)", id="2-D"),
        pytest.param(torch.tensor(3), None, r"1-D integer tensor.*shape=\(\)", id="0-D"),
        pytest.param(torch.tensor([True, False]), None, r"dtype=torch.bool", id="bool"),
        pytest.param(torch.tensor([1, 2], dtype=torch.complex64), None, r"dtype=torch.complex64", id="complex"),
        pytest.param(object(), None, r"must be a LongTensor\[B\], got object", id="object"),
        pytest.param(torch.tensor([0, 1, 2]), 2, r"Got 3 sample ids for a batch of 2", id="length"),
        pytest.param(torch.tensor([0, 10]), None, r"Sample ids \[10\] are outside \[0, 10\)", id="too-large"),
        pytest.param(torch.tensor([-1, 2]), None, r"Sample ids \[-1\] are outside \[0, 10\)", id="negative"),
        pytest.param(torch.tensor([4, 2, 4, 2, 1]), None, r"Sample ids \[2, 4\] appear more than once", id="repeated"),
    ],
)
def test_validate_sample_ids_errors(ids, batch_size, match):
    with pytest.raises(SampleIdError, match=match):
        validate_sample_ids(ids, batch_size, 10)


@pytest.mark.parametrize("size", [5, PYTHON_ROWS + 100], ids=["python", "numpy"])
@pytest.mark.parametrize(
    ("change", "match"),
    [
        pytest.param(lambda ids: ids.__setitem__(3, 10_000), r"Sample ids \[10000\] are outside", id="too-large"),
        pytest.param(lambda ids: ids.__setitem__(1, -2), r"Sample ids \[-2\] are outside", id="negative"),
        pytest.param(lambda ids: ids.__setitem__(4, ids[0]), r"appear more than once", id="repeated"),
    ],
)
def test_validate_sample_ids_checks_small_and_large_batches(size, change, match):
    ids = torch.randperm(5_000, generator=torch.Generator().manual_seed(size))[:size]
    assert validate_sample_ids(ids, size, 5_000) is not None
    change(ids)
    with pytest.raises(SampleIdError, match=match):
        validate_sample_ids(ids, size, 5_000)


@pytest.mark.parametrize("size", [0, 1, 32, PYTHON_ROWS, PYTHON_ROWS + 1, 3_000])
@pytest.mark.parametrize("num_tracked", [0, 1, 700])
def test_row_index_finds_every_tracked_sample_of_a_batch(size, num_tracked):
    gen = torch.Generator().manual_seed(size + num_tracked)
    tracked = torch.randperm(5_000, generator=gen)[:num_tracked]
    batch = torch.randperm(5_000, generator=gen)[:size]
    state_rows, batch_rows = RowIndex(tracked, 5_000).rows(batch)
    expected = [(r, b) for b, i in enumerate(batch.tolist()) for r, t in enumerate(tracked.tolist()) if t == i]
    assert list(zip(state_rows.tolist(), batch_rows.tolist())) == expected
    assert state_rows.dtype == batch_rows.dtype == torch.long


def test_booking_clock_updates_the_progress_bar_at_step_3_then_with_the_mean_of_each_interval():
    clock = BookingClock(every=4)
    shown = {}
    for booked, seconds in enumerate([9.0, 5.0, 0.003, 0.001, 0.002, 0.004, 0.006, 0.008], start=1):
        clock.add(seconds)
        shown[booked] = clock.progress_ms(booked)
    # step 3 alone (steps 1-2 pay the HVP's tuning), then the mean of steps 4 (after 3) and of 5-8
    assert shown == pytest.approx({1: None, 2: None, 3: 3.0, 4: 1.0, 5: None, 6: None, 7: None, 8: 5.0})
    assert clock.last == 0.008 and clock.progress_ms(8) is None  # a skipped step at the same count: no new update


# ========================================================================== flat parameters


def test_flat_parameters_round_trip_and_group_slices():
    a, b, c = torch.randn(2, 3), torch.randn(4), torch.randn(1, 1, 2)
    layout = FlatParameters.from_groups([[("a", a), ("b", b)], [], [("c", c)]])
    assert layout.names == ("a", "b", "c")
    assert layout.offsets == (0, 6, 10) and layout.numel == 12
    assert layout.group_slices == (slice(0, 10), slice(10, 10), slice(10, 12))
    flat = layout.flatten([a, b, c])
    assert flat.shape == (12,)
    back = layout.unflatten(flat)
    assert list(back) == ["a", "b", "c"]
    for name, t in zip("abc", (a, b, c)):
        assert back[name].shape == t.shape and torch.equal(back[name], t)
    assert torch.equal(flat[layout.group_slices[0]], torch.cat([a.flatten(), b]))


def test_flat_parameters_unflatten_is_differentiable():
    layout = FlatParameters.from_groups([[("w", torch.empty(2, 2)), ("b", torch.empty(2))]])
    flat = torch.randn(6, dtype=DTYPE, requires_grad=True)
    parts = layout.unflatten(flat)
    (parts["w"].sum() * 2 + parts["b"].pow(2).sum()).backward()
    assert torch.equal(flat.grad, torch.cat([torch.full((4,), 2.0, dtype=DTYPE), 2 * flat.detach()[4:]]))


def test_flat_parameters_empty():
    layout = FlatParameters.from_groups([[]])
    assert layout.numel == 0 and layout.group_slices == (slice(0, 0),)


# ======================================================================= optimizer models

SIZES = (5, 3)  # two param groups, so every model is exercised on two regions with their own hyper-parameters

OPTIMIZERS = {
    "sgd": (torch.optim.SGD, [dict(lr=0.1), dict(lr=0.05)]),
    "sgd-wd": (torch.optim.SGD, [dict(lr=0.1, weight_decay=0.1), dict(lr=0.05, weight_decay=0.3)]),
    "momentum": (torch.optim.SGD, [dict(lr=0.1, momentum=0.9), dict(lr=0.05, momentum=0.5, weight_decay=0.1)]),
    "dampening": (
        torch.optim.SGD,
        [dict(lr=0.1, momentum=0.9, dampening=0.3), dict(lr=0.05, momentum=0.5, dampening=0.9)],
    ),
    "nesterov": (
        torch.optim.SGD,
        [dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01), dict(lr=0.05, momentum=0.5, nesterov=True)],
    ),
    "momentum-one-group": (torch.optim.SGD, [dict(lr=0.1, momentum=0.9), dict(lr=0.05)]),
    "adam": (torch.optim.Adam, [dict(lr=0.01), dict(lr=0.02, betas=(0.8, 0.99), eps=1e-6)]),
    "adam-l2": (
        torch.optim.Adam,
        [dict(lr=0.01, weight_decay=0.1), dict(lr=0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.5)],
    ),
    "adamw": (
        torch.optim.AdamW,
        [dict(lr=0.01, weight_decay=0.1), dict(lr=0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.5)],
    ),
    "adam-decoupled": (
        torch.optim.Adam,
        [
            dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
            dict(lr=0.02, weight_decay=0.2, decoupled_weight_decay=True),
        ],
    ),
}
ADAMS = [k for k, (cls, _) in OPTIMIZERS.items() if cls is not torch.optim.SGD]


def _regions():
    out, start = [], 0
    for n in SIZES:
        out.append(slice(start, start + n))
        start += n
    return out


class TorchStep:
    """A real ``torch.optim`` step on a flat vector split into ``SIZES`` param groups.

    ``state`` is a flat dict ``{"step": int, "exp_avg", "exp_avg_sq" | "momentum_buffer": Tensor[p]}``
    (empty before the first step), written into the optimizer before stepping.
    """

    def __init__(self, name: str) -> None:
        self.cls, self.group_kwargs = OPTIMIZERS[name]
        p = sum(SIZES)
        self.params = [torch.zeros(n, dtype=DTYPE, requires_grad=True) for n in SIZES]
        self.opt = self.cls([{"params": [q], **kw} for q, kw in zip(self.params, self.group_kwargs)])
        self.p = p

    def __call__(self, theta, grad, state):
        """Return ``(θ_new, state_new)`` after one step from ``(θ, grad, state)``; inputs are not modified."""
        self.opt.state.clear()
        for q, r in zip(self.params, _regions()):
            with torch.no_grad():
                q.copy_(theta[r])
            q.grad = grad[r].clone()
            s = {}
            for key, value in state.items():
                if key == "step":
                    s[key] = torch.tensor(float(value), dtype=DTYPE)
                elif key != "momentum_buffer" or self.opt.param_groups[len(self.opt.state)].get("momentum"):
                    s[key] = value[r].clone()
            if s:
                self.opt.state[q] = s
        self.opt.step()
        theta_new = torch.cat([q.detach().clone() for q in self.params])
        new = {"step": int(self.opt.state[self.params[0]].get("step", 0))} if self.cls is not torch.optim.SGD else {}
        for key in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
            if any(key in self.opt.state[q] for q in self.params):
                # a flat Tensor[p]; zeros in the regions of groups that keep no such state (no momentum)
                new[key] = torch.cat(
                    [
                        self.opt.state[q][key].detach().clone() if key in self.opt.state[q] else torch.zeros_like(q)
                        for q in self.params
                    ]
                )
        return theta_new, new

    def groups(self, state):
        """``GroupStep``s as the tracker reads them before this step (step count after the update)."""
        out = []
        for group, _, r in zip(self.opt.param_groups, self.params, _regions()):
            first_momentum = "momentum_buffer" not in state or not group.get("momentum")
            out.append(read_group_step(group, r, int(state.get("step", 0)) + 1, first_momentum))
        return out


def _trajectory(name: str, prior_steps: int, seed: int = 0):
    """A reproducible pre-step point ``(θ, grad, state)`` after ``prior_steps`` real steps."""
    gen = torch.Generator().manual_seed(seed)
    step = TorchStep(name)
    theta, state = torch.randn(step.p, generator=gen, dtype=DTYPE), {}
    for _ in range(prior_steps):
        theta, state = step(theta, torch.randn(step.p, generator=gen, dtype=DTYPE), state)
    grad = torch.randn(step.p, generator=gen, dtype=DTYPE)
    return step, theta, grad, state, gen


def _jacobian(step: TorchStep):
    return model_optimizer(step.opt).jacobian


@pytest.mark.parametrize(
    ("name", "kind", "jacobian_cls", "blocks"),
    [
        ("sgd", "sgd", SGDJacobian, ("theta",)),
        ("sgd-wd", "sgd", SGDJacobian, ("theta",)),
        ("momentum", "sgd", SGDJacobian, ("theta", "buf")),
        ("momentum-one-group", "sgd", SGDJacobian, ("theta", "buf")),
        ("nesterov", "sgd", SGDJacobian, ("theta", "buf")),
        ("adam", "adam", AdamJacobian, ("theta", "m", "v")),
        ("adam-l2", "adam", AdamJacobian, ("theta", "m", "v")),
        ("adamw", "adamw", AdamWJacobian, ("theta", "m", "v")),
        ("adam-decoupled", "adamw", AdamWJacobian, ("theta", "m", "v")),
    ],
)
def test_model_optimizer_picks_the_model(name, kind, jacobian_cls, blocks):
    spec = model_optimizer(TorchStep(name).opt)
    assert spec.kind == kind and type(spec.jacobian) is jacobian_cls and spec.jacobian.blocks == blocks
    approx = model_optimizer(TorchStep(name).opt, "sgd")
    assert approx.kind == "sgd-approx" and approx.jacobian.blocks == ("theta",) and approx.notes


def test_read_group_step_reads_every_hyper_parameter():
    opt = torch.optim.Adam([torch.zeros(2, requires_grad=True)], lr=0.3, betas=(0.7, 0.8), eps=1e-5, weight_decay=0.2)
    g = read_group_step(opt.param_groups[0], slice(0, 2), 4, False)
    assert (g.lr, g.beta1, g.beta2, g.eps, g.weight_decay, g.step) == (0.3, 0.7, 0.8, 1e-5, 0.2, 4)
    sgd = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.1, momentum=0.9, dampening=0.1, nesterov=False)
    g = read_group_step(sgd.param_groups[0], slice(0, 2), 1, True)
    assert (g.lr, g.momentum, g.dampening, g.nesterov, g.first_momentum_step) == (0.1, 0.9, 0.1, False, True)


def _pre_state(state):
    return {key: state.get(key) for key in ("exp_avg", "exp_avg_sq", "momentum_buffer")}


@pytest.mark.parametrize("prior_steps", [0, 1, 4], ids=["first-step", "second-step", "later-step"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_predict_reproduces_a_real_step(name, prior_steps):
    step, theta, grad, state, _ = _trajectory(name, prior_steps)
    theta_new, _ = step(theta, grad, state)
    opt_step = OptimizerStep(step.groups(state), theta.clone(), grad.clone())
    predicted = _jacobian(step).predict(opt_step, _pre_state(state))
    torch.testing.assert_close(predicted, theta_new, rtol=0, atol=1e-12)


def _directions(step, theta, grad, state, gen, scale=1.0, first_step_zero_moments=True):
    """A perturbation of every input of the step: δθ, δg and the pre-step optimizer state."""
    d = {
        "theta": scale * torch.randn(step.p, generator=gen, dtype=DTYPE),
        "grad": scale * torch.randn(step.p, generator=gen, dtype=DTYPE),
    }
    for key, value in state.items():
        if key == "step":
            continue
        noise = torch.randn(step.p, generator=gen, dtype=DTYPE)
        # keep v + δv ≥ 0: perturb the second moment relative to itself
        d[key] = scale * (0.5 * value * noise.tanh() if key == "exp_avg_sq" else noise)
    if "momentum_buffer" in d:  # groups without momentum have no buffer to perturb
        for group, r in zip(step.opt.param_groups, _regions()):
            if not group.get("momentum"):
                d["momentum_buffer"][r] = 0
    return d


def _perturbed(theta, grad, state, d, eps):
    new_state = {k: (v if k == "step" else v + eps * d[k]) for k, v in state.items()}
    return theta + eps * d["theta"], grad + eps * d["grad"], new_state


_BLOCK_OF = {"theta": "theta", "exp_avg": "m", "exp_avg_sq": "v", "momentum_buffer": "buf"}


def _advance(jacobian, step, theta, grad, state, d, exact):
    """Run ``advance`` on the perturbation ``d`` (one row) and return the advanced blocks."""
    _, post = step(theta, grad, state)
    opt_step = OptimizerStep(
        step.groups(state), theta.clone(), grad.clone(), post.get("exp_avg"), post.get("exp_avg_sq")
    )
    states = {b: torch.zeros(1, step.p, dtype=DTYPE) for b in jacobian.blocks}
    states["theta"][0] = d["theta"]
    for key in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
        if key in d and _BLOCK_OF[key] in states:
            states[_BLOCK_OF[key]][0] = d[key]
    jacobian.advance(states, d["grad"][None].clone(), opt_step, exact=exact)
    return {b: s[0] for b, s in states.items()}, post


def _rel_err(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.mark.parametrize("prior_steps", [0, 3], ids=["first-step", "later-step"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_linear_advance_is_the_derivative_of_the_real_step(name, prior_steps):
    step, theta, grad, state, gen = _trajectory(name, prior_steps, seed=1)
    jacobian = _jacobian(step)
    d = _directions(step, theta, grad, state, gen)
    got, _ = _advance(jacobian, step, theta, grad, state, d, exact=False)

    eps = 1e-6
    plus_theta, plus = step(*_perturbed(theta, grad, state, d, eps))
    minus_theta, minus = step(*_perturbed(theta, grad, state, d, -eps))
    expected = {"theta": (plus_theta - minus_theta) / (2 * eps)}
    for key, block in _BLOCK_OF.items():
        if key in plus and block in got:
            expected[block] = (plus[key] - minus[key]) / (2 * eps)
    assert set(expected) == set(got), (set(expected), set(got))
    for block in got:
        assert _rel_err(got[block], expected[block]) <= 1e-5, block


@pytest.mark.parametrize("prior_steps", [0, 3], ids=["first-step", "later-step"])
@pytest.mark.parametrize("scale", [1e-2, 0.3])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_exact_advance_is_the_difference_of_two_real_steps(name, prior_steps, scale):
    step, theta, grad, state, gen = _trajectory(name, prior_steps, seed=2)
    jacobian = _jacobian(step)
    d = _directions(step, theta, grad, state, gen, scale=scale)
    got, post = _advance(jacobian, step, theta, grad, state, d, exact=True)

    theta_new, _ = step(theta, grad, state)
    cf_theta, cf = step(*_perturbed(theta, grad, state, d, 1.0))
    expected = {"theta": cf_theta - theta_new}
    for key, block in _BLOCK_OF.items():
        if key in cf and block in got:
            expected[block] = cf[key] - post[key]
    assert set(expected) == set(got)
    for block in got:
        torch.testing.assert_close(got[block], expected[block], rtol=1e-9, atol=1e-12, msg=block)


@pytest.mark.parametrize("name", ADAMS)
def test_exact_and_linear_advance_differ_for_adam_only_at_second_order(name):
    step, theta, grad, state, gen = _trajectory(name, 3, seed=3)
    jacobian = _jacobian(step)
    errs = []
    for scale in (1e-3, 1e-4):
        d = _directions(step, theta, grad, state, torch.Generator().manual_seed(5), scale=scale)
        lin, _ = _advance(jacobian, step, theta, grad, state, d, exact=False)
        ex, _ = _advance(jacobian, step, theta, grad, state, d, exact=True)
        errs.append(float((lin["theta"] - ex["theta"]).norm()))
    assert errs[0] > 0 and 50 < errs[0] / errs[1] < 200  # quadratic in the perturbation


@pytest.mark.parametrize("name", ["sgd-wd", "momentum", "nesterov"])
def test_sgd_exact_and_linear_advance_agree(name):
    step, theta, grad, state, gen = _trajectory(name, 2, seed=4)
    jacobian = _jacobian(step)
    d = _directions(step, theta, grad, state, gen, scale=0.5)
    lin, _ = _advance(jacobian, step, theta, grad, state, d, exact=False)
    ex, _ = _advance(jacobian, step, theta, grad, state, d, exact=True)
    for block in lin:
        torch.testing.assert_close(lin[block], ex[block], rtol=0, atol=0)


def test_sgd_approximation_ignores_momentum():
    step, theta, grad, state, gen = _trajectory("momentum", 2)
    jacobian = model_optimizer(step.opt, "sgd").jacobian
    d = _directions(step, theta, grad, state, gen)
    got, _ = _advance(jacobian, step, theta, grad, state, d, exact=False)
    lr = OptimizerStep(step.groups(state), theta, grad).lr_vector()
    wd = torch.cat(
        [torch.full((n,), g.get("weight_decay", 0.0), dtype=DTYPE) for n, g in zip(SIZES, step.group_kwargs)]
    )
    torch.testing.assert_close(got["theta"], d["theta"] - lr * (d["grad"] + wd * d["theta"]), rtol=0, atol=1e-15)


def test_advance_handles_many_rows_like_one():
    """Rows of the stacked states are independent samples: advancing k rows at once equals k single advances."""
    step, theta, grad, state, gen = _trajectory("adamw", 2)
    jacobian = _jacobian(step)
    _, post = step(theta, grad, state)
    opt_step = OptimizerStep(step.groups(state), theta, grad, post["exp_avg"], post["exp_avg_sq"])
    k = 4
    rows = {b: 1e-3 * torch.randn(k, step.p, generator=gen, dtype=DTYPE) for b in jacobian.blocks}
    rows["v"] = rows["v"].abs() * post["exp_avg_sq"]
    delta_g = 1e-3 * torch.randn(k, step.p, generator=gen, dtype=DTYPE)
    for exact in (False, True):
        together = {b: s.clone() for b, s in rows.items()}
        jacobian.advance(together, delta_g.clone(), opt_step, exact)
        for i in range(k):
            one = {b: s[i : i + 1].clone() for b, s in rows.items()}
            jacobian.advance(one, delta_g[i : i + 1].clone(), opt_step, exact)
            for b in one:
                torch.testing.assert_close(one[b][0], together[b][i], rtol=0, atol=1e-18)


def test_lr_vector():
    step, theta, grad, state, _ = _trajectory("sgd", 0)
    lr = OptimizerStep(step.groups(state), theta, grad).lr_vector()
    assert lr.tolist() == [0.1] * SIZES[0] + [0.05] * SIZES[1]


# ======================================================================== functional loss


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DTYPE)


def _losses(module, batch):
    return cross_entropy_losses(module, batch[0], batch[1])


def _regularizer(module):
    return 0.05 * module[0].weight.pow(2).sum()


@pytest.fixture
def problem(data):
    """A tanh MLP, its layout (all parameters, one group), the functional loss and an ``(x, y, ids)`` batch."""
    net = _mlp()
    layout = FlatParameters.from_groups([list(net.named_parameters())])
    loss = FunctionalLoss(net, _losses, layout, _regularizer)
    x, y = data
    batch = (x[:8], y[:8], torch.arange(8))
    theta = layout.flatten([p.detach() for p in net.parameters()]).clone()
    return net, layout, loss, batch, theta


def _reference_losses(net, layout, theta, x, y):
    return cross_entropy_losses(lambda inp: functional_call(net, layout.unflatten(theta), (inp,)), x, y)


def _reference_batch_loss(net, layout, batch):
    def f(theta):
        return (
            _reference_losses(net, layout, theta, batch[0], batch[1]).mean()
            + 0.05 * layout.unflatten(theta)["0.weight"].pow(2).sum()
        )

    return f


def test_per_sample_and_batch_loss(problem):
    net, layout, loss, batch, theta = problem
    expected = cross_entropy_losses(net, batch[0], batch[1])
    torch.testing.assert_close(loss.per_sample_losses(theta, batch), expected.detach(), rtol=1e-14, atol=0)
    torch.testing.assert_close(
        loss.batch_loss(theta, batch), (expected.mean() + _regularizer(net)).detach(), rtol=1e-14, atol=0
    )


def test_gradient_and_hvp_match_autograd(problem):
    net, layout, loss, batch, theta = problem
    f = _reference_batch_loss(net, layout, batch)
    g, hvp = loss.gradient_and_hvp(theta, [batch])
    torch.testing.assert_close(g, torch.func.grad(f)(theta), rtol=1e-12, atol=1e-14)

    V = torch.randn(3, theta.numel(), dtype=DTYPE)
    got = hvp(V)
    assert got.shape == V.shape
    for v, row in zip(V, got):
        _, expected = torch.autograd.functional.hvp(f, theta, v)
        torch.testing.assert_close(row, expected, rtol=1e-10, atol=1e-13)
        # and as a finite difference of the gradient
        eps = 1e-5
        fd = (torch.func.grad(f)(theta + eps * v) - torch.func.grad(f)(theta - eps * v)) / (2 * eps)
        assert _rel_err(row, fd) < 1e-7


@pytest.mark.parametrize("picked", [[5, 0, 3], [4]])  # vmapped, and the one-row path (plain autograd)
def test_sample_gradients_match_per_sample_autograd(problem, picked):
    net, layout, loss, batch, theta = problem
    rows = torch.tensor(picked)
    got = loss.sample_gradients(theta, batch, rows, 8)
    assert got.shape == (len(picked), theta.numel())
    for i, r in enumerate(rows.tolist()):
        expected = torch.func.grad(
            lambda t, r=r: _reference_losses(net, layout, t, batch[0][r : r + 1], batch[1][r : r + 1])[0]
        )(theta)
        torch.testing.assert_close(got[i], expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("picked", [[7, 2], [6]])  # vmapped, and the one-row path (plain autograd)
def test_sample_gradients_and_hvps_match_per_sample_autograd(problem, picked):
    net, layout, loss, batch, theta = problem
    rows = torch.tensor(picked)
    vectors = torch.randn(len(picked), theta.numel(), dtype=DTYPE)
    grads, hvps = loss.sample_gradients_and_hvps(theta, batch, rows, 8, vectors)
    assert grads.shape == hvps.shape == vectors.shape
    for i, r in enumerate(rows.tolist()):

        def f(t, r=r):
            return _reference_losses(net, layout, t, batch[0][r : r + 1], batch[1][r : r + 1])[0]

        g, h = torch.autograd.functional.vhp(f, theta, vectors[i])
        torch.testing.assert_close(grads[i], torch.func.grad(f)(theta), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(hvps[i], h, rtol=1e-10, atol=1e-13)


def test_frozen_parameters_are_read_from_the_dict(problem):
    net, _, _, batch, _ = problem
    layout = FlatParameters.from_groups([[(n, p) for n, p in net.named_parameters() if n.startswith("2.")]])
    loss = FunctionalLoss(net, _losses, layout)
    theta = layout.flatten([net[2].weight.detach(), net[2].bias.detach()])
    frozen = {"0.weight": net[0].weight.detach() * 2, "0.bias": net[0].bias.detach() - 1}
    shifted = copy.deepcopy(net)
    with torch.no_grad():
        shifted[0].weight.mul_(2)
        shifted[0].bias.sub_(1)
    torch.testing.assert_close(
        loss.per_sample_losses(theta, batch, frozen), _losses(shifted, batch).detach(), rtol=1e-14, atol=0
    )
    # the gradient is taken only with respect to the tracked (last-layer) parameters
    g, _ = loss.gradient_and_hvp(theta, [batch], frozen)
    assert g.shape == (18,)


@pytest.mark.parametrize(
    ("value", "match"),
    [
        pytest.param(torch.tensor(1.0), r"got \(\)", id="scalar"),
        pytest.param(torch.ones(2, 3), r"got \(2, 3\)", id="2-D"),
        pytest.param(1.0, r"got float", id="float"),
    ],
)
def test_check_per_sample_losses(value, match):
    with pytest.raises(ValueError, match=r"1-D Tensor\[B\] of per-sample losses.*" + match):
        check_per_sample_losses(value)


# ================================================================================ engine


@pytest.mark.parametrize("estimator", ["acc", "first-order"])
def test_engine_result_does_not_depend_on_the_chunk_size(problem, estimator):
    net, layout, loss, batch, theta = problem
    k = 6
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    jac = model_optimizer(opt).jacobian
    grad = loss.gradient_and_hvp(theta, [batch])[0]
    groups = [read_group_step(opt.param_groups[0], layout.group_slices[0], 1, True)]
    init = {b: 1e-2 * torch.randn(k, theta.numel(), dtype=DTYPE) for b in jac.blocks}
    out = []
    for chunk in (1, 4, k):
        engine = InfluenceEngine(loss, jac, k, estimator, chunk, DTYPE, torch.device("cpu"))
        engine.load_state_dict({"states": init, "tracin_scores": {}})
        # tracked samples 1, 4, 5 sit at batch rows 6, 0, 3
        engine.step(
            [MicroBatch(batch, 8, torch.tensor([1, 4, 5]), torch.tensor([6, 0, 3]))], OptimizerStep(groups, theta, grad)
        )
        out.append(engine.theta.clone())
    torch.testing.assert_close(out[0], out[1], rtol=1e-13, atol=1e-16)
    torch.testing.assert_close(out[0], out[2], rtol=1e-13, atol=1e-16)
    # rows outside the batch only feel the batch Hessian; rows inside also their own source term
    assert not torch.allclose(out[0][1], init["theta"][1])


def test_engine_takes_the_agreed_hvp_choice_so_every_process_reduces_the_same_chunks(problem):
    """Under DDP each process times the HVP's methods on its own; the chunks decide the all-reduces, so every process
    must use rank zero's choice (a per-process choice mismatched the collectives: issue 24's gloo crash)."""
    net, layout, loss, batch, theta = problem
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    jac = model_optimizer(opt).jacobian
    grad = loss.gradient_and_hvp(theta, [batch])[0]
    groups = [read_group_step(opt.param_groups[0], layout.group_slices[0], 1, True)]
    asked, reduced = [], []

    def rank_zeros_choice(local: HvpChoice) -> HvpChoice:
        asked.append(local)
        return HvpChoice("loop", 2)

    def reduce(t: torch.Tensor) -> torch.Tensor:
        reduced.append(tuple(t.shape))
        return t

    engine = InfluenceEngine(loss, jac, 5, "acc", 4, DTYPE, torch.device("cpu"), tune_hvp=True, agree=rank_zeros_choice)
    step = OptimizerStep(groups, theta, grad)
    engine.step([MicroBatch(batch, 8, torch.tensor([1]), torch.tensor([6]))], step, reduce=reduce)
    assert len(asked) == 1 and isinstance(asked[0], HvpChoice)
    assert (engine.hvp_choice.method, engine.hvp_choice.rows) == ("loop", 2)
    assert reduced[:3] == [(2, theta.numel()), (2, theta.numel()), (1, theta.numel())]  # the agreed chunks


def test_engine_check_finite_names_step_and_samples(problem):
    _, _, loss, _, _ = problem
    engine = InfluenceEngine(loss, SGDJacobian(momentum=False), 3, "acc", 3, DTYPE, torch.device("cpu"))
    engine.check_finite(0, torch.tensor([10, 11, 12]))
    engine.states["theta"][1, 2] = float("nan")
    with pytest.raises(NonFiniteInfluenceError, match=r"'theta' at optimizer step 7 for sample ids \[11\]"):
        engine.check_finite(7, torch.tensor([10, 11, 12]))


def test_engine_rejects_unknown_estimator(problem):
    with pytest.raises(ValueError, match="estimator must be one of"):
        InfluenceEngine(problem[2], SGDJacobian(False), 2, "exact", 1, DTYPE, torch.device("cpu"))


@pytest.mark.parametrize(
    ("p", "itemsize", "budget", "k", "expected"),
    [(10, 8, 480 * 3, 100, 3), (10, 8, 1, 100, 1), (10, 8, 10**9, 7, 7)],
)
def test_chunk_rows_for_budget(p, itemsize, budget, k, expected):
    assert chunk_rows_for_budget(p, itemsize, budget, k) == expected


# ================================================================================= result


@pytest.fixture
def result():
    ids = torch.tensor([10, 11, 12, 13, 14])
    scores = torch.tensor([0.3, -0.5, 0.0, -0.1, 0.7], dtype=DTYPE)
    per_example = torch.stack([scores - 1, scores + 1], dim=1)
    return InfluenceResult(ids, scores, per_example, "first-order")


def test_result_most_harmful(result):
    harmful = result.most_harmful()
    assert harmful.sample_ids.tolist() == [11, 13]  # only negative scores, most negative first
    assert harmful.scores.tolist() == [-0.5, -0.1]
    assert harmful.per_example[:, 1].tolist() == [0.5, 0.9]
    assert harmful.estimator == "first-order"
    assert result.most_harmful(1).sample_ids.tolist() == [11]


def test_result_most_helpful(result):
    helpful = result.most_helpful()
    assert helpful.sample_ids.tolist() == [14, 10]  # only positive scores, most positive first
    assert result.most_helpful(1).scores.tolist() == [0.7]
    assert 12 not in result.most_helpful().sample_ids.tolist() + result.most_harmful().sample_ids.tolist()


def test_result_ranking_dict_iteration(result):
    assert result.ranking().sample_ids.tolist() == [11, 13, 12, 10, 14]
    assert len(result) == 5
    assert list(result) == [(10, 0.3), (11, -0.5), (12, 0.0), (13, -0.1), (14, 0.7)]
    assert result.as_dict() == {10: 0.3, 11: -0.5, 12: 0.0, 13: -0.1, 14: 0.7}
    assert repr(result).splitlines()[0] == "InfluenceResult(k=5, estimator='first-order', harmful=2)"


def test_result_without_per_example():
    r = InfluenceResult(torch.tensor([0, 1]), torch.tensor([1.0, -1.0]))
    assert r.ranking().per_example is None and r.most_harmful().sample_ids.tolist() == [1]
    assert len(r.most_helpful(0)) == 0
