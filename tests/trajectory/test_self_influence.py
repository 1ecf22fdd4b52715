"""The in-run self-influence of every sample of a recorded run ([concepts.md: Self-influence of every sample]), float64:

- ``tracker.self_influence()`` of a record-only tracker and ``load_trajectory(path).self_influence(...)`` equal
  s_j = Σ_t Σ_{m∋j} (η_t w_m/|B_m|) ⟨∇ℓ_j(θ_t), P_t ∇ℓ_j(θ_t)⟩ computed independently: the same run re-run by hand
  in a plain torch loop, per-sample gradients by ``torch.autograd`` one sample at a time, P_t read from the torch
  optimizer's own state after each step (identity for SGD, 1/(√v̂ + ε) for Adam(W), ...), with gradient accumulation;
- a sample no step consumed scores exactly 0; the result says which definition it holds;
- the answer is replayed once per fit (``tracker.replays``), then read back;
- flipped labels get the largest self-influence on a tiny synthetic problem.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_influence import InfluenceResult, InfluenceTracker, load_trajectory
from lightning_influence.testing import TinyClassifier, fixed_loader, lightning_trainer

N, D, C = 17, 3, 3  # 16 samples per epoch: sample 16 is never trained on
UNSEEN = 16
ATOL = dict(rtol=1e-9, atol=1e-13)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return torch.randn(N, D, generator=gen, dtype=torch.float64), torch.randint(0, C, (N,), generator=gen)


def _schedule(epochs: int = 2) -> list[list[list[int]]]:
    gen = torch.Generator().manual_seed(7)
    out = []
    for _ in range(epochs):
        perm = torch.randperm(N - 1, generator=gen).tolist()
        out.append([perm[i : i + 4] for i in range(0, N - 1, 4)])
    return out


def _mlp() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(D, 5), nn.Tanh(), nn.Linear(5, C)).double()


def _adam_p(state: dict, group: dict, key: str = "exp_avg_sq") -> torch.Tensor:
    bc2 = 1 - group["betas"][1] ** float(state["step"])
    return 1 / ((state[key] / bc2).sqrt() + group["eps"])


def _rmsprop_p(state: dict, group: dict) -> torch.Tensor:
    s = state["square_avg"] - state["grad_avg"] ** 2 if group["centered"] else state["square_avg"]
    return 1 / (s.sqrt() + group["eps"])


def _adagrad_p(state: dict, group: dict) -> torch.Tensor:
    decay = 1 + (float(state["step"]) - 1) * group["lr_decay"]
    return 1 / decay / (state["sum"].sqrt() + group["eps"])


def _radam_p(state: dict, group: dict, p: torch.Tensor) -> torch.Tensor:
    beta2, t = group["betas"][1], float(state["step"])
    rho_inf = 2 / (1 - beta2) - 1
    rho = rho_inf - 2 * t * beta2**t / (1 - beta2**t)
    if rho <= 5:  # the unrectified step: plain (momentum) SGD
        return torch.ones_like(p)
    rect = math.sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))
    return rect * math.sqrt(1 - beta2**t) / (state["exp_avg_sq"].sqrt() + group["eps"])


# name: (optimizer factory, accumulate_grad_batches, P from the torch optimizer's post-step state of a parameter)
CASES = {
    "sgd-momentum": (
        lambda m: torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.9, weight_decay=0.01),
        1,
        lambda state, group, p: torch.ones_like(p),  # the identity, momentum or not
    ),
    "adamw-accumulation": (
        lambda m: torch.optim.AdamW(m.parameters(), lr=0.05, weight_decay=0.1, betas=(0.8, 0.95)),
        2,
        lambda state, group, p: _adam_p(state, group),
    ),
    "adam-amsgrad": (
        lambda m: torch.optim.Adam(m.parameters(), lr=0.05, amsgrad=True, weight_decay=0.01),
        1,
        lambda state, group, p: _adam_p(state, group, "max_exp_avg_sq"),
    ),
    "rmsprop-centered": (
        lambda m: torch.optim.RMSprop(m.parameters(), lr=0.01, centered=True, momentum=0.5),
        1,
        lambda state, group, p: _rmsprop_p(state, group),
    ),
    "adagrad": (
        lambda m: torch.optim.Adagrad(m.parameters(), lr=0.1, lr_decay=0.05),
        2,
        lambda state, group, p: _adagrad_p(state, group),
    ),
    "nadam": (
        lambda m: torch.optim.NAdam(m.parameters(), lr=0.05, weight_decay=0.01),
        1,
        lambda state, group, p: _adam_p(state, group),
    ),
    "radam-both-branches": (  # β2 = 0.9: steps 1-5 unrectified, 6-8 rectified
        lambda m: torch.optim.RAdam(m.parameters(), lr=0.05, betas=(0.9, 0.9), decoupled_weight_decay=True),
        1,
        _radam_p,
    ),
    "adamax": (
        lambda m: torch.optim.Adamax(m.parameters(), lr=0.05),
        1,
        lambda state, group, p: 1 / state["exp_inf"],
    ),
}


def _sample_gradient(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    loss = F.cross_entropy(net(x[None]), y[None])
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(net.parameters()))])


def _clip_norm(v: torch.Tensor, max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_``'s map of a flat gradient."""
    return v * torch.clamp(max_norm / (v.norm() + 1e-6), max=1.0)


def _by_hand(case: str, x: torch.Tensor, y: torch.Tensor, schedule, clip: float | None = None) -> torch.Tensor:
    """s_j of the run, re-run in a plain torch loop (the run Lightning made: same init, batches, weights); with
    ``clip``, the step's gradient is norm-clipped and g_j enters through the clip's derivative at the step gradient."""
    make_optimizer, accumulate, preconditioner = CASES[case]
    net = _mlp()
    opt = make_optimizer(net)
    scores = torch.zeros(N, dtype=torch.float64)
    batches = [b for epoch in schedule for b in epoch]
    for start in range(0, len(batches), accumulate):
        micro = batches[start : start + accumulate]
        weight = 1 / accumulate  # Lightning divides the loss by accumulate_grad_batches
        grads = {(m, j): _sample_gradient(net, x[j], y[j]) for m, b in enumerate(micro) for j in b}  # at θ_t
        opt.zero_grad()
        for b in micro:
            (F.cross_entropy(net(x[b]), y[b]) * weight).backward()
        moved = grads
        if clip is not None:  # J_clip(g) g_j, by forward-mode autodiff of the clip at the step's gradient
            step_grad = torch.cat([q.grad.reshape(-1) for q in net.parameters()])
            moved = {k: torch.func.jvp(lambda v: _clip_norm(v, clip), (step_grad,), (g,))[1] for k, g in grads.items()}
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        opt.step()
        group = opt.param_groups[0]
        p = torch.cat([preconditioner(opt.state[q], group, q).reshape(-1) for q in net.parameters()])
        for (m, j), g in grads.items():
            scores[j] += group["lr"] * weight / len(micro[m]) * float((g * p * moved[(m, j)]).sum())
    return scores


def _fit(case: str, tracker: InfluenceTracker, x, y, schedule, **trainer_kwargs) -> TinyClassifier:
    make_optimizer, accumulate, _ = CASES[case]
    module = TinyClassifier(_mlp(), make_optimizer)
    trainer = lightning_trainer(
        len(schedule), callbacks=[tracker], accumulate_grad_batches=accumulate, **trainer_kwargs
    )
    trainer.fit(module, fixed_loader(x, y, schedule))
    return module


def _record_only(tmp_path, **kwargs) -> InfluenceTracker:
    defaults = dict(track=(), record_trajectory=True, estimator="first-order", checkpoint_every_n_steps=3)
    return InfluenceTracker(**{**defaults, "dirpath": tmp_path, **kwargs})


@pytest.mark.parametrize("case", list(CASES))
def test_in_run_self_influence_equals_a_hand_computation(case, tmp_path):
    x, y = _data()
    schedule = _schedule()
    tracker = _record_only(tmp_path)
    _fit(case, tracker, x, y, schedule)
    result = tracker.self_influence()
    assert isinstance(result, InfluenceResult) and torch.equal(result.sample_ids, torch.arange(N))
    assert result.definition == "in-run" and result.estimator == "in-run"
    want = _by_hand(case, x, y, schedule)
    torch.testing.assert_close(result.scores, want, **ATOL)
    assert float(result.scores[UNSEEN]) == 0.0  # never trained on: exactly 0
    assert bool((result.scores[:UNSEEN] > 0).all())  # ⟨g, P g⟩ > 0 without a clip: helpful to its own loss


@pytest.mark.parametrize("case", ["sgd-momentum", "adamw-accumulation"])
def test_a_clipped_step_counts_the_clipped_move(case, tmp_path):
    x, y = _data()
    schedule = _schedule()
    tracker = _record_only(tmp_path)
    _fit(case, tracker, x, y, schedule, gradient_clip_val=0.3)
    want = _by_hand(case, x, y, schedule, clip=0.3)
    assert not torch.allclose(want, _by_hand(case, x, y, schedule))  # the clip was active
    torch.testing.assert_close(tracker.self_influence().scores, want, **ATOL)


def test_the_answer_is_replayed_once_per_fit_and_loads_from_the_trajectory(tmp_path):
    x, y = _data()
    schedule = _schedule()
    tracker = _record_only(tmp_path, checkpoint_every_n_steps=2)
    _fit("adamw-accumulation", tracker, x, y, schedule)
    assert tracker.replays == 0
    first = tracker.self_influence(chunk_size=3)  # rows per per-sample-gradient call: the same numbers
    assert tracker.replays == 1
    first.scores.zero_()  # the caller's copy: the cache is untouched
    again = tracker.self_influence()
    assert tracker.replays == 1 and bool(again.scores.abs().sum() > 0)
    torch.testing.assert_close(again.scores, _by_hand("adamw-accumulation", x, y, schedule), **ATOL)
    assert "definition='in-run'" in again.summary()

    loaded = load_trajectory(tracker.trajectory_path).self_influence(
        TinyClassifier(_mlp(), CASES["adamw-accumulation"][0]), fixed_loader(x, y, schedule).dataset, progress=False
    )
    assert torch.equal(loaded.sample_ids, again.sample_ids) and loaded.definition == "in-run"
    torch.testing.assert_close(loaded.scores, again.scores, rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:InfluenceTracker. 1 tracked sample")
def test_forward_tracked_samples_keep_the_counterfactual_definition(tmp_path):
    x, y = _data()
    tracker = _record_only(tmp_path, track=[0, 3, UNSEEN])
    _fit("sgd-momentum", tracker, x, y, _schedule())
    forward = tracker.self_influence()
    assert forward.sample_ids.tolist() == [0, 3, UNSEEN] and forward.definition == "counterfactual"
    in_run = tracker.self_influence(all_samples=True)
    assert in_run.definition == "in-run" and in_run.sample_ids.numel() == N and tracker.replays == 1
    tracker.self_influence(all_samples=True)
    assert tracker.replays == 1


def test_a_saved_result_keeps_its_definition(tmp_path):
    result = InfluenceResult(torch.arange(3), torch.tensor([0.1, 0.0, 2.0]), estimator="in-run", definition="in-run")
    result.save(tmp_path / "r.pt")
    back = InfluenceResult.load(tmp_path / "r.pt")
    assert back.definition == "in-run" and back.most_helpful(1).definition == "in-run"
    old = {k: v for k, v in torch.load(tmp_path / "r.pt", weights_only=True).items() if k != "definition"}
    torch.save(old, tmp_path / "old.pt")  # a file written before the field existed
    assert InfluenceResult.load(tmp_path / "old.pt").definition is None


def test_flipped_labels_get_the_largest_self_influence(tmp_path):
    gen = torch.Generator().manual_seed(0)
    n = 48
    y_clean = torch.arange(n) % 2
    x = torch.randn(n, 2, generator=gen, dtype=torch.float64) * 0.7 + (2 * y_clean[:, None] - 1).double() * 1.5
    flipped = torch.tensor([3, 10, 25, 40])
    y = y_clean.clone()
    y[flipped] = 1 - y[flipped]
    gen = torch.Generator().manual_seed(1)
    schedule = [
        [p[i : i + 8] for i in range(0, n, 8)] for p in (torch.randperm(n, generator=gen).tolist() for _ in range(8))
    ]

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    tracker = _record_only(tmp_path, checkpoint_every_n_steps=20)
    module = TinyClassifier(copy.deepcopy(net), lambda m: torch.optim.Adam(m.parameters(), lr=0.05))
    lightning_trainer(len(schedule), callbacks=[tracker]).fit(module, fixed_loader(x, y, schedule))
    result = tracker.self_influence()
    top = set(result.most_helpful(len(flipped)).sample_ids.tolist())
    assert len(top & set(flipped.tolist())) >= 3, (top, flipped)
    ranks = result.scores.argsort().argsort().double()  # AUROC of the flipped against the clean samples
    auroc = (ranks[flipped].mean() - (len(flipped) - 1) / 2) / (n - len(flipped))
    assert float(auroc) > 0.9 and math.isfinite(float(auroc))
