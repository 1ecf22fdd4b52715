"""``estimator="exact"`` is the counterfactual run itself ([concepts.md: The exact counterfactual]): its scores equal
exact leave-one-out retraining (same batches, w_j = 0, float64) to 1e-8 relative, for every optimizer and setup, and so
do its windows at their boundaries; a sample never seen scores exactly 0."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_influence import InfluenceTracker
from lightning_influence.testing import (
    TinyClassifier,
    fixed_loader,
    leave_one_out,
    lightning_trainer,
    random_classification,
    random_schedule,
)

N, D, C = 16, 4, 3
IDS = list(range(N))
EXACT = dict(rtol=1e-8, atol=1e-13)


def _data():
    return random_classification(N, D, C, seed=8)


def _mlp() -> nn.Module:
    torch.manual_seed(4)
    return nn.Sequential(nn.Linear(D, 5), nn.Tanh(), nn.Linear(5, C)).double()


OPTIMIZERS = {
    "sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.5),
    "momentum": lambda m: torch.optim.SGD(m.parameters(), lr=0.3, momentum=0.9, dampening=0.1, weight_decay=0.01),
    "nesterov": lambda m: torch.optim.SGD(m.parameters(), lr=0.3, momentum=0.8, nesterov=True),
    "adam": lambda m: torch.optim.Adam(m.parameters(), lr=0.05, weight_decay=0.01),
    "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=0.05, weight_decay=0.1, betas=(0.8, 0.95)),
    "two-groups": lambda m: torch.optim.AdamW(
        [{"params": m[0].parameters(), "lr": 0.08}, {"params": m[2].parameters(), "weight_decay": 0.0}], lr=0.03
    ),
}


def _step_lr(o):
    return torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.7)


SETUPS = {
    **{name: dict(opt=name) for name in OPTIMIZERS},
    "adamw-scheduler": dict(opt="adamw", sched=_step_lr),
    "clip-norm": dict(opt="momentum", trainer=dict(gradient_clip_val=0.05), retrain=dict(clip_norm=0.05)),
    "clip-value": dict(
        opt="adamw",
        trainer=dict(gradient_clip_val=0.01, gradient_clip_algorithm="value"),
        retrain=dict(clip_value=0.01),
    ),
    "accumulation": dict(opt="adamw", trainer=dict(accumulate_grad_batches=2), retrain=dict(accumulate=2)),
}


def _fit(setup: dict, tracker: InfluenceTracker, schedule):
    x, y, _ = _data()
    module = TinyClassifier(_mlp(), OPTIMIZERS[setup["opt"]], setup.get("sched"))
    trainer = lightning_trainer(len(schedule), callbacks=[tracker], **setup.get("trainer", {}))
    trainer.fit(module, fixed_loader(x, y, schedule))


@pytest.mark.parametrize("name", list(SETUPS))
def test_exact_scores_equal_leave_one_out_retraining(name):
    setup = SETUPS[name]
    x, y, query = _data()
    schedule = random_schedule(N, 4, 2, seed=5)  # 4 steps per epoch
    tracker = InfluenceTracker(
        estimator="exact", queries={"val": query}, window_every_n_epochs=1, write_artifacts=False
    )
    _fit(setup, tracker, schedule)
    kwargs = setup.get("retrain", {})
    loo = leave_one_out(_mlp(), OPTIMIZERS[setup["opt"]], x, y, schedule, query, IDS, setup.get("sched"), **kwargs)
    scores = tracker.influence("val").scores
    print(f"{name}: max relative error vs retraining {float((scores - loo).abs().max() / loo.abs().max()):.1e}")
    torch.testing.assert_close(scores, loo, **EXACT)
    # windows: I(s) at the epoch boundary equals retraining the first epoch; the last window completes the run
    first = leave_one_out(
        _mlp(), OPTIMIZERS[setup["opt"]], x, y, schedule[:1], query, IDS, setup.get("sched"), **kwargs
    )
    windows = tracker.windows("val")
    torch.testing.assert_close(windows[0].scores, first, **EXACT)
    torch.testing.assert_close(windows[1].scores, loo - first, **EXACT)


def test_exact_per_example_and_a_sample_never_seen():
    x, y, query = _data()
    schedule = [[b for b in epoch if 3 not in b] for epoch in random_schedule(N, 4, 2, seed=5)]
    tracker = InfluenceTracker(estimator="exact", track=[1, 3, 7])
    _fit(dict(opt="adamw"), tracker, schedule)
    result = tracker.influence(query, per_example=True)
    assert result.scores[1] == 0 and (result.per_example[1] == 0).all()
    loo = leave_one_out(_mlp(), OPTIMIZERS["adamw"], x, y, schedule, query, [1, 7])
    torch.testing.assert_close(result.scores[[0, 2]], loo, **EXACT)
    # per example: the loss change of each query example at the counterfactual parameters
    assert result.per_example.shape == (3, len(query[0]))
    torch.testing.assert_close(result.per_example.mean(dim=1), result.scores, rtol=1e-12, atol=1e-15)


# ------------------------------------------------------------------------------------------------ the audit
def _audited(estimator: str = "acc", **kwargs) -> InfluenceTracker:
    _, _, query = _data()
    return InfluenceTracker(
        estimator=estimator, queries={"val": query}, window_every_n_epochs=1, audit=6, audit_seed=3, **kwargs
    )


def test_the_audit_compares_the_main_estimator_with_exact_retraining(tmp_path):
    from lightning_influence import load_audit
    from lightning_influence.results.audit import audit_report

    x, y, query = _data()
    schedule = random_schedule(N, 4, 2, seed=5)
    tracker = _audited(dirpath=tmp_path)
    _fit(dict(opt="adamw"), tracker, schedule)
    report = tracker.audit("val")
    ids = report.sample_ids.tolist()
    assert len(ids) == 6 and ids == sorted(ids)
    # the audit's exact side is leave-one-out retraining; its estimated side the main estimator's scores
    loo = leave_one_out(_mlp(), OPTIMIZERS["adamw"], x, y, schedule, query, ids)
    torch.testing.assert_close(report.exact_scores, loo, **EXACT)
    torch.testing.assert_close(report.estimated_scores, tracker.influence("val").scores[ids], rtol=0, atol=0)
    # its figures are those of an offline comparison of the same numbers
    offline = audit_report("val", report.sample_ids, loo, tracker.influence("val").scores[ids], "acc")
    for field in ("spearman", "pearson", "relative_error", "sign_agreement"):
        assert getattr(report, field) == pytest.approx(getattr(offline, field), rel=1e-6, abs=1e-9), field
    # per window: exact window scores against the main estimator's window scores, also in audit.jsonl
    first = leave_one_out(_mlp(), OPTIMIZERS["adamw"], x, y, schedule[:1], query, ids)
    windows = tracker.audit_windows("val")
    assert [(r.start_step, r.end_step) for r in windows] == [(0, 4), (4, 8)]
    torch.testing.assert_close(windows[0].exact_scores, first, **EXACT)
    torch.testing.assert_close(windows[1].exact_scores, loo - first, **EXACT)
    torch.testing.assert_close(windows[1].estimated_scores, tracker.windows("val")[1].scores[ids], rtol=0, atol=0)
    saved = load_audit(tmp_path)
    assert [(r.start_step, r.end_step) for r in saved] == [(0, 4), (4, 8)]
    torch.testing.assert_close(saved[1].exact_scores, windows[1].exact_scores, rtol=0, atol=0)


def test_a_poor_audit_warns_at_the_end_of_fit():
    schedule = random_schedule(N, 4, 2, seed=5)
    with pytest.warns(UserWarning, match=r"agrees poorly with the exact counterfactual.*What usually helps"):
        _fit(dict(opt="momentum"), _audited("tracin", write_artifacts=False), schedule)


def test_audit_arguments_are_checked():
    with pytest.raises(ValueError, match="already exact"):
        InfluenceTracker(estimator="exact", audit=3)
    with pytest.raises(ValueError, match="not both"):
        InfluenceTracker(audit=3, audit_ids=[1, 2])
    tracker = InfluenceTracker(track=[0, 1, 2], audit_ids=[2, 9])
    with pytest.raises(ValueError, match=r"audit_ids \[9\] are not tracked"):
        _fit(dict(opt="sgd"), tracker, random_schedule(N, 4, 1, seed=5))
    with pytest.raises(RuntimeError, match="No audit runs"):
        plain = InfluenceTracker()
        _fit(dict(opt="sgd"), plain, random_schedule(N, 4, 1, seed=5))
        plain.audit(_data()[2])


def test_a_resumed_run_keeps_its_audit(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    schedule = random_schedule(N, 4, 3, seed=5)
    reference = _audited(write_artifacts=False)
    _fit(dict(opt="adamw"), reference, schedule)

    class CrashAt(TinyClassifier):
        def training_step(self, batch, batch_idx):
            if (self.current_epoch, batch_idx) == (2, 1):
                raise RuntimeError("simulated crash")
            return super().training_step(batch, batch_idx)

    x, y, _ = _data()
    for module_cls, ckpt_path in ((CrashAt, None), (TinyClassifier, tmp_path / "last.ckpt")):
        tracker = _audited(write_artifacts=False)
        saver = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_epochs=1)
        trainer = lightning_trainer(3, callbacks=[tracker, saver], enable_checkpointing=True)
        try:
            trainer.fit(module_cls(_mlp(), OPTIMIZERS["adamw"]), fixed_loader(x, y, schedule), ckpt_path=ckpt_path)
        except RuntimeError as err:
            assert "simulated crash" in str(err)
    got, want = tracker.audit_windows("val"), reference.audit_windows("val")
    assert (
        [(r.start_step, r.end_step) for r in got]
        == [(r.start_step, r.end_step) for r in want]
        == [(0, 4), (4, 8), (8, 12)]
    )
    for a, b in zip(got, want):
        torch.testing.assert_close(a.exact_scores, b.exact_scores, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(a.estimated_scores, b.estimated_scores, rtol=1e-10, atol=1e-14)
