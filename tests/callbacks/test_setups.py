"""Training setups beyond one optimizer step per batch, checked against ground truth.

- gradient accumulation and gradient clipping: the "first-order" estimate equals the derivative of
  the query loss with respect to the removed sample's weight, measured by central finite differences
  of two float64 re-trainings (``testing.retrain(accumulate=, clip_norm=, clip_value=)``) with
  w_j = 1 ± ε (docs/benchmarks.md, the pattern of tests/estimators/test_exactness.py);
- bf16 mixed precision: the scores follow the float32 run's; GradScaler skips (16-mixed): a step
  whose gradients are not finite is not booked;
- checkpoint resume: an interrupted and resumed run ends with the very scores, windows and artifact
  files of an uninterrupted one;
- tracked ids that no step consumed: a warning, ``unseen_ids``, score 0.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torchmetrics.functional import spearman_corrcoef

from lightning_influence import InfluenceTracker
from lightning_influence.callbacks.tracker import InfluenceConfigurationError
from lightning_influence.testing import (
    TinyClassifier,
    fixed_loader,
    lightning_trainer,
    random_classification,
    random_schedule,
    removal_derivative,
    retrain,
)

N, D, C = 24, 4, 3
EPS = 1e-4
PROBES = (0, 5, 17)


def _data(dtype: torch.dtype = torch.float64):
    return random_classification(N, D, C, dtype=dtype)


def _mlp(dtype: torch.dtype = torch.float64, hidden: int = 8) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(D, hidden), nn.Tanh(), nn.Linear(hidden, C)).to(dtype)


def _uneven_schedule(epochs: int, sizes=(5, 5, 5, 5, 4), seed: int = 0) -> list[list[list[int]]]:
    """Every sample once per epoch, in ``len(sizes)`` batches of unequal sizes."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(epochs):
        perm, batches, start = torch.randperm(N, generator=gen).tolist(), [], 0
        for size in sizes:
            batches.append(perm[start : start + size])
            start += size
        out.append(batches)
    return out


def _momentum(m: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.9, weight_decay=0.01)


def _adamw(m: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(m.parameters(), lr=0.03, weight_decay=0.1, betas=(0.8, 0.95))


def _step_lr(o: torch.optim.Optimizer):
    return torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.6)


OPTIMIZERS = {"momentum": (_momentum, None), "adamw-step-lr": (_adamw, _step_lr)}


def _fit(
    net, make_opt, make_sched, x, y, schedule, trackers, module_cls=TinyClassifier, ckpt_path=None, **trainer_kwargs
):
    module = module_cls(copy.deepcopy(net), make_opt, make_sched)
    trainer = lightning_trainer(len(schedule), callbacks=list(trackers), **trainer_kwargs)
    trainer.fit(module, fixed_loader(x, y, schedule), ckpt_path=ckpt_path)
    return trainer, module


def _assert_matches_finite_differences(tracker, net, make_opt, make_sched, x, y, schedule, query, **retrain_kwargs):
    scores = tracker.influence(query).scores
    errors = []
    for j in PROBES:
        expected = removal_derivative(net, make_opt, x, y, schedule, query, j, make_sched, EPS, **retrain_kwargs)
        errors.append(abs(float(scores[j]) - expected) / abs(expected))
        assert abs(float(scores[j]) - expected) <= 1e-3 * abs(expected), (j, float(scores[j]), expected)
    print(f"max relative error vs finite differences: {max(errors):.1e}")


def _assert_same_parameters(module, reference):
    for a, b in zip(module.net.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------- accumulation
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("accumulate", [2, 3])
def test_gradient_accumulation_matches_finite_differences(accumulate, optimizer):
    """5 batches per epoch: groups of 2+2+1 or 3+2 micro-batches, each divided by N (also the short
    last group), one optimizer (and scheduler) step per group."""
    x, y, query = _data()
    schedule = _uneven_schedule(2, seed=accumulate)
    assert len(schedule[0]) % accumulate != 0
    net = _mlp()
    make_opt, make_sched = OPTIMIZERS[optimizer]
    tracker = InfluenceTracker(estimator="first-order", self_check_steps=100)
    trainer, module = _fit(net, make_opt, make_sched, x, y, schedule, [tracker], accumulate_grad_batches=accumulate)
    assert trainer.global_step == 2 * math.ceil(5 / accumulate) == tracker.steps_booked
    # the reference run is the Lightning run, then the estimate is its derivative
    _assert_same_parameters(module, retrain(net, make_opt, x, y, schedule, None, make_sched, accumulate=accumulate))
    _assert_matches_finite_differences(tracker, net, make_opt, make_sched, x, y, schedule, query, accumulate=accumulate)


# ---------------------------------------------------------------------------------------------- clipping
CLIPS = {"norm": ("clip_norm", 0.15), "value": ("clip_value", 0.04)}


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("algorithm", list(CLIPS))
def test_gradient_clipping_matches_finite_differences(algorithm, optimizer):
    x, y, query = _data()
    schedule = random_schedule(N, 6, 3, seed=7)
    net = _mlp()
    make_opt, make_sched = OPTIMIZERS[optimizer]
    key, threshold = CLIPS[algorithm]
    grads: list[torch.Tensor] = []
    reference = retrain(net, make_opt, x, y, schedule, None, make_sched, grad_log=grads, **{key: threshold})
    # the threshold really clips: on most steps the norm (or some entry) exceeds it
    big = [float(g.norm() if algorithm == "norm" else g.abs().max()) > threshold for g in grads]
    assert sum(big) >= 0.75 * len(grads), big
    if algorithm == "value":
        frac = float(torch.stack([(g.abs() > threshold).double().mean() for g in grads]).mean())
        assert frac >= 0.2, frac  # a good share of the entries is clamped, not just one
    tracker = InfluenceTracker(estimator="first-order", self_check_steps=100)
    _, module = _fit(
        net,
        make_opt,
        make_sched,
        x,
        y,
        schedule,
        [tracker],
        gradient_clip_val=threshold,
        gradient_clip_algorithm=algorithm,
    )
    _assert_same_parameters(module, reference)
    _assert_matches_finite_differences(tracker, net, make_opt, make_sched, x, y, schedule, query, **{key: threshold})


@pytest.mark.parametrize("estimator", ["acc", "first-order"])
def test_norm_clipping_with_untracked_trainable_parameters(estimator):
    """params= tracks the head; the body is trained but untracked, so its gradient enters the global
    norm as a constant. No exact ground truth then: the self-check of every step must pass (it
    predicts the clipped update from the norm over all parameters) and the scores be finite."""
    x, y, query = _data()
    schedule = random_schedule(N, 6, 2, seed=8)
    tracker = InfluenceTracker(estimator=estimator, params=["net.2"], self_check_steps=100)
    _fit(_mlp(), _adamw, None, x, y, schedule, [tracker], gradient_clip_val=0.15, gradient_clip_algorithm="norm")
    assert tracker.steps_booked == 8
    scores = tracker.influence(query).scores
    assert torch.isfinite(scores).all() and scores.abs().sum() > 0


def _adamw_head_only(net: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(net[2].parameters(), lr=0.05, weight_decay=0.01)


def test_norm_clipping_counts_only_the_optimizers_parameters():
    """The body has requires_grad=True and receives gradients, but the optimizer holds only the head:
    Lightning's clip norm runs over the optimizer's parameters, so the body must not enter it (else the
    predicted clipped update is off and the self-check stops the run)."""
    x, y, query = _data()
    schedule = random_schedule(N, 6, 2, seed=8)
    tracker = InfluenceTracker(estimator="acc", self_check_steps=100)
    _fit(
        _mlp(),
        _adamw_head_only,
        None,
        x,
        y,
        schedule,
        [tracker],
        gradient_clip_val=0.05,
        gradient_clip_algorithm="norm",
    )
    assert tracker.steps_booked == 8
    assert torch.isfinite(tracker.influence(query).scores).all()


# ---------------------------------------------------------------------------------------------- mixed precision
def test_bf16_mixed_follows_the_float32_run():
    x, y, query = _data(torch.float32)
    schedule = random_schedule(N, 6, 3, seed=9)
    net = _mlp(torch.float32, hidden=16)
    scores = {}
    for precision in ("32-true", "bf16-mixed"):
        tracker = InfluenceTracker(estimator="acc")
        _, module = _fit(net, _adamw, _step_lr, x, y, schedule, [tracker], precision=precision)
        assert next(module.parameters()).dtype == torch.float32
        assert all(s.dtype == torch.float32 for s in tracker.engine.states.values())
        scores[precision] = tracker.influence(query).scores
    ref, mixed = scores["32-true"], scores["bf16-mixed"]
    spearman = float(spearman_corrcoef(mixed, ref))
    rel_rmse = float((mixed - ref).norm() / ref.norm())
    print(f"bf16-mixed vs 32-true: spearman {spearman:.4f}, relative RMSE {rel_rmse:.3e}")
    assert spearman >= 0.98  # measured 1.000
    assert rel_rmse <= 0.03  # measured 2.6e-3


class _InfGradientAt(Callback):
    """Makes one gradient entry inf after the backward pass of the micro-batch of optimizer step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_after_backward(self, trainer, pl_module) -> None:
        if trainer.global_step == self.step:
            next(pl_module.parameters()).grad.view(-1)[0] = float("inf")


def test_grad_scaler_skipped_step_is_not_booked():
    """16-mixed with a GradScaler on the CPU: an inf gradient at step 2 makes the scaler skip the
    optimizer step; the tracker books the run exactly as one whose schedule lacks that batch."""
    x, y, query = _data(torch.float32)
    schedule = random_schedule(N, 4, 1, seed=10)  # one epoch of 6 batches
    net = _mlp(torch.float32)

    def run(sched, *extra):
        tracker = InfluenceTracker(estimator="first-order")
        plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
        trainer, module = _fit(net, _adamw, None, x, y, sched, [tracker, *extra], precision=None, plugins=[plugin])
        return tracker, trainer, module

    skipped, trainer, module = run(schedule, _InfGradientAt(2))
    assert trainer.global_step == 6 and skipped.steps_booked == 5  # Lightning counts the skipped step, the tracker not
    without = [list(schedule[0])]
    dropped = without[0].pop(2)
    reference, _, ref_module = run(without)
    assert reference.steps_booked == 5
    # the skip left the model where the shorter schedule leads (the scaler's scale differs by a power of 2)
    for a, b in zip(module.parameters(), ref_module.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # the skipped batch's samples were consumed by no step: influence 0, listed as unseen
    assert sorted(skipped.unseen_ids.tolist()) == sorted(reference.unseen_ids.tolist()) == sorted(dropped)
    got, expected = skipped.influence(query).scores, reference.influence(query).scores
    assert (got[dropped] == 0).all()
    print(f"GradScaler skip vs shorter schedule: max |diff| {float((got - expected).abs().max()):.1e}")
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)  # measured: identical


# ---------------------------------------------------------------------------------------------- resume
class _CrashAt(TinyClassifier):
    """Raises in ``training_step`` at batch ``crash_at = (epoch, batch_idx)``, like a preempted job."""

    crash_at: tuple[int, int] | None = None

    def training_step(self, batch, batch_idx):
        if (self.current_epoch, batch_idx) == self.crash_at:
            raise RuntimeError("simulated crash")
        return super().training_step(batch, batch_idx)


def _crash(at: tuple[int, int]) -> type[TinyClassifier]:
    return type("CrashingClassifier", (_CrashAt,), {"crash_at": at})


def _fit_ckpt(net, make_opt, make_sched, x, y, schedule, trackers, ckpt_dir, module_cls=TinyClassifier, ckpt_path=None):
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_epochs=1)
    return _fit(
        net,
        make_opt,
        make_sched,
        x,
        y,
        schedule,
        [*trackers, checkpoint],
        module_cls,
        ckpt_path,
        enable_checkpointing=True,
    )


def _records(dirpath) -> list[dict]:
    with open(dirpath / "windows.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _assert_same_tracker(resumed: InfluenceTracker, reference: InfluenceTracker, query, tol: float = 1e-10) -> None:
    """Same scores, same windows (count, boundaries, scores), same artifact files, same step count."""
    close = dict(rtol=tol, atol=tol * 1e-3)
    assert resumed.steps_booked == reference.steps_booked
    assert torch.equal(resumed.samples_seen, reference.samples_seen)
    for block, state in reference.engine.states.items():
        torch.testing.assert_close(resumed.engine.states[block], state, **close)
    torch.testing.assert_close(resumed.influence(query).scores, reference.influence(query).scores, **close)
    for name in reference.queries:
        torch.testing.assert_close(resumed.influence(name).scores, reference.influence(name).scores, **close)
        got, expected = resumed.windows(name), reference.windows(name)
        assert [(w.index, w.start_step, w.end_step, w.epoch) for w in got] == [
            (w.index, w.start_step, w.end_step, w.epoch) for w in expected
        ]
        for a, b in zip(got, expected):
            assert torch.equal(a.sample_ids, b.sample_ids)
            torch.testing.assert_close(a.scores, b.scores, **close)
    got, expected = _records(resumed.dirpath), _records(reference.dirpath)
    assert [{k: v for k, v in r.items() if k != "scores"} for r in got] == [
        {k: v for k, v in r.items() if k != "scores"} for r in expected
    ]
    for a, b in zip(got, expected):
        torch.testing.assert_close(torch.tensor(a["scores"]), torch.tensor(b["scores"]), **close)
    with open(resumed.dirpath / "final_scores.json") as f, open(reference.dirpath / "final_scores.json") as g:
        final, final_ref = json.load(f)["queries"], json.load(g)["queries"]
    for name in reference.queries:
        torch.testing.assert_close(
            torch.tensor(final[name]["scores"]), torch.tensor(final_ref[name]["scores"]), **close
        )


RESUME_CONFIGS = {
    # windows [0,3], [3,6] known to the checkpoint; [6,9] was written after it, before the crash at step 10:
    # the resumed run must drop it from windows.jsonl and write it again
    "windows-every-3-steps": [dict(estimator="acc", window_every_n_steps=3)],
    # two trackers, different configs (unique state keys), both restored; windows every epoch: the
    # checkpoint of epoch 1 (step 8) knows [0,4], [4,8]
    "two-trackers": [
        dict(estimator="acc", window_every_n_epochs=1),
        dict(estimator="first-order", track=[1, 2, 3, 20], window_every_n_steps=3, hvp_chunk_size=2),
    ],
}


@pytest.mark.parametrize("config", list(RESUME_CONFIGS))
def test_resume_after_a_crash_equals_an_uninterrupted_run(config, tmp_path):
    x, y, query = _data()
    schedule = random_schedule(N, 6, 3, seed=11)  # 4 steps per epoch, 12 in all
    net = _mlp()

    def trackers(run: str) -> list[InfluenceTracker]:
        return [
            InfluenceTracker(queries={"val": query}, dirpath=tmp_path / f"{run}{i}", **kwargs)
            for i, kwargs in enumerate(RESUME_CONFIGS[config])
        ]

    reference = trackers("uninterrupted")
    _, ref_module = _fit(net, _adamw, _step_lr, x, y, schedule, reference)

    crashed = trackers("resumed")
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit_ckpt(net, _adamw, _step_lr, x, y, schedule, crashed, tmp_path / "ckpt", _crash((2, 2)))
    assert crashed[0].steps_booked == 10  # steps 8 and 9 of epoch 2 were booked after the checkpoint
    if config == "windows-every-3-steps":
        assert [r["end_step"] for r in _records(crashed[0].dirpath)] == [3, 6, 9]

    resumed = trackers("resumed")  # a new process: new trackers, model and Trainer, same configuration
    trainer, module = _fit_ckpt(
        net, _adamw, _step_lr, x, y, schedule, resumed, tmp_path / "ckpt", ckpt_path=tmp_path / "ckpt" / "last.ckpt"
    )
    assert trainer.global_step == 12
    for a, b in zip(module.parameters(), ref_module.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    for got, expected in zip(resumed, reference):
        _assert_same_tracker(got, expected, query)


def test_resume_with_a_different_track_is_refused(tmp_path):
    x, y, query = _data()
    schedule = random_schedule(N, 6, 2, seed=12)
    net = _mlp()
    ckpt = tmp_path / "ckpt"
    _fit_ckpt(net, _momentum, None, x, y, schedule[:1], [InfluenceTracker(track=[0, 1, 2])], ckpt)
    with pytest.raises(InfluenceConfigurationError, match="checkpoint"):
        _fit_ckpt(
            net, _momentum, None, x, y, schedule, [InfluenceTracker(track=[0, 1])], ckpt, ckpt_path=ckpt / "last.ckpt"
        )


# ---------------------------------------------------------------------------------------------- unseen ids


@pytest.mark.parametrize(
    "estimator, optimizer",
    [
        ("first-order", "adamw-step-lr"),
        ("acc", "momentum"),
        pytest.param("acc", "adamw-step-lr"),
    ],
)
@pytest.mark.parametrize("how", ["limit_train_batches", "schedule-misses-ids"])
def test_tracked_ids_that_no_step_consumed(how, estimator, optimizer):
    x, y, query = _data()
    make_opt, make_sched = OPTIMIZERS[optimizer]
    if how == "limit_train_batches":  # 6 batches of 4 per epoch, only the first 3 are used
        schedule, kwargs = random_schedule(N, 4, 2, seed=13), dict(limit_train_batches=3)
        used = {i for epoch in schedule for batch in epoch[:3] for i in batch}
    else:  # batches of 5 with drop_last: 4 samples left out
        schedule, kwargs = random_schedule(N, 5, 1, seed=13), {}
        used = {i for epoch in schedule for batch in epoch for i in batch}
    unseen = sorted(set(range(N)) - used)
    assert unseen
    tracker = InfluenceTracker(estimator=estimator, track=list(range(N - 1, -1, -1)))  # ids in reverse order
    with pytest.warns(UserWarning, match=r"never appeared in an optimizer step"):
        _fit(_mlp(), make_opt, make_sched, x, y, schedule, [tracker], **kwargs)
    assert sorted(tracker.unseen_ids.tolist()) == unseen
    result = tracker.influence(query)
    is_unseen = torch.isin(result.sample_ids, torch.tensor(unseen))
    assert (result.scores[~is_unseen] != 0).all()
    assert (result.scores[is_unseen] == 0).all(), result.scores[is_unseen]
