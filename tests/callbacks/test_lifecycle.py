"""The tracker's lifecycle never leaks state (float64, against a fresh tracker on the identical run or
against the uninterrupted run):

- state restored outside a fit (``trainer.validate(ckpt_path=...)``, ``Tuner.lr_find``) is not applied to
  the next fit;
- a fit with nothing to train leaves the earlier results intact;
- Ctrl+C in the middle of booking a step: the step is booked completely, the checkpoint saved on the
  exception resumes to the uninterrupted run; any other failure mid-booking makes that checkpoint refuse to
  resume; a checkpoint whose booked step count differs from its ``global_step`` is refused;
- with epoch windows, a checkpoint saved at the last batch of an epoch keeps that window on resume;
- a second ``fit`` continuing training numbers its windows from the real steps and appends them;
- the constructor's ``num_samples`` is never overwritten; version-1 checkpoint states still load.
"""

from __future__ import annotations

import copy
import json
import os
import signal

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint
from lightning.pytorch.tuner import Tuner
from torch import nn

from lightning_influence import InfluenceConfigurationError, InfluenceTracker
from lightning_influence.core.interrupts import InterruptGuard
from lightning_influence.testing import TinyClassifier, fixed_loader, lightning_trainer, random_classification

N, D, C = 24, 4, 3
TIGHT = dict(rtol=1e-12, atol=1e-15)


def _data():
    return random_classification(N, D, C)


def _net() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(D, 6), nn.Tanh(), nn.Linear(6, C)).double()


def _sgd(m: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(m.parameters(), lr=0.2)


def _adamw(m: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(m.parameters(), lr=0.03, weight_decay=0.1)


def _schedule(epochs: int) -> list[list[list[int]]]:
    """4 batches of 6 per epoch, a different fixed order every epoch."""
    gen = torch.Generator().manual_seed(5)
    return [
        [p[i : i + 6] for i in range(0, N, 6)]
        for p in (torch.randperm(N, generator=gen).tolist() for _ in range(epochs))
    ]


class Evaluated(TinyClassifier):
    """TinyClassifier with a validation step, for ``trainer.validate(ckpt_path=...)``."""

    def validation_step(self, batch, batch_idx):
        return self.per_sample_loss(batch).mean()


def _fit(tracker, schedule, make_opt=_sgd, module_cls=TinyClassifier, callbacks=(), ckpt_path=None, **kwargs):
    x, y, _ = _data()
    module = module_cls(_net(), make_opt)
    trainer = lightning_trainer(len(schedule), callbacks=[tracker, *callbacks], **kwargs)
    trainer.fit(module, fixed_loader(x, y, schedule), ckpt_path=ckpt_path)
    return trainer, module


def _assert_same(got: InfluenceTracker, expected: InfluenceTracker, query) -> None:
    assert got.steps_booked == expected.steps_booked
    torch.testing.assert_close(got.influence(query).scores, expected.influence(query).scores, **TIGHT)
    for name in expected.queries:
        a, b = got.windows(name), expected.windows(name)
        assert [(w.start_step, w.end_step) for w in a] == [(w.start_step, w.end_step) for w in b]
        for wa, wb in zip(a, b):
            torch.testing.assert_close(wa.scores, wb.scores, **TIGHT)


def _records(dirpath) -> list[dict]:
    with open(os.path.join(dirpath, "windows.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ------------------------------------------------------------------------- restored outside a fit
def test_state_restored_by_validate_is_not_applied_to_the_next_fit(tmp_path):
    _, _, query = _data()
    tracker = InfluenceTracker(queries={"val": query}, write_artifacts=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer, module = _fit(tracker, _schedule(2), module_cls=Evaluated, callbacks=[ckpt], enable_checkpointing=True)
    x, y, _ = _data()
    trainer.validate(module, fixed_loader(x, y, _schedule(1)), ckpt_path=tmp_path / "last.ckpt", verbose=False)

    _fit(tracker, _schedule(3), module_cls=Evaluated)  # a new Trainer and model: a fresh 12-step fit
    reference = InfluenceTracker(queries={"val": query}, write_artifacts=False)
    _fit(reference, _schedule(3), module_cls=Evaluated)
    assert tracker.steps_booked == reference.steps_booked == 12
    _assert_same(tracker, reference, query)


def test_lr_find_trial_steps_are_not_booked(tmp_path):
    _, _, query = _data()
    x, y, _ = _data()
    tracker = InfluenceTracker(queries={"val": query}, write_artifacts=False)
    module = TinyClassifier(_net(), _sgd)
    trainer = lightning_trainer(3, callbacks=[tracker], default_root_dir=tmp_path)
    loader = fixed_loader(x, y, _schedule(3))
    Tuner(trainer).lr_find(module, train_dataloaders=loader, num_training=5, update_attr=False)
    trainer.fit(module, loader)

    reference = InfluenceTracker(queries={"val": query}, write_artifacts=False)
    _fit(reference, _schedule(3))
    assert tracker.steps_booked == reference.steps_booked == 12
    _assert_same(tracker, reference, query)


# ------------------------------------------------------------------------- nothing to train
def test_a_fit_with_nothing_to_train_keeps_the_results(tmp_path):
    x, y, query = _data()
    tracker = InfluenceTracker(queries={"val": query}, window_every_n_epochs=1, dirpath=tmp_path)
    trainer, module = _fit(tracker, _schedule(2))
    before = tracker.influence(query).scores.clone()
    windows = [w.scores.clone() for w in tracker.windows("val")]
    trainer.fit(module, fixed_loader(x, y, _schedule(2)))  # max_epochs already reached: a re-run notebook cell
    torch.testing.assert_close(tracker.influence(query).scores, before, rtol=0, atol=0)
    assert len(tracker.windows("val")) == len(windows) == 2
    assert all(torch.equal(a.scores, b) for a, b in zip(tracker.windows("val"), windows))
    assert len(_records(tmp_path)) == 2


# ------------------------------------------------------------------------- interrupted bookings
class _InterruptDuringBooking:
    """Patches the optimizer model's ``advance`` to act on the second chunk of optimizer step ``at``."""

    def __init__(self, tracker: InfluenceTracker, at: int, action) -> None:
        self.tracker, self.at, self.action, self.calls = tracker, at, action, 0

    def install(self, trainer) -> None:
        jacobian = self.tracker.engine.jacobian
        original = jacobian.advance

        def advance(states, delta_g, step, exact):
            original(states, delta_g, step, exact)
            if self.tracker.global_step == self.at:
                self.calls += 1
                if self.calls == 2:
                    self.action()

        jacobian.advance = advance


class _Installer(ModelCheckpoint.__mro__[-2]):  # a plain Callback
    def __init__(self, patch):
        self.patch = patch

    def on_train_start(self, trainer, pl_module):
        self.patch.install(trainer)


def _interrupted_run(tmp_path, action, estimator="acc"):
    _, _, query = _data()
    tracker = InfluenceTracker(
        estimator=estimator, queries={"val": query}, window_every_n_steps=3, hvp_chunk_size=8, dirpath=tmp_path / "a"
    )
    patch = _InterruptDuringBooking(tracker, at=5, action=action)
    saver = OnExceptionCheckpoint(dirpath=tmp_path, filename="on_exception")
    return tracker, [_Installer(patch), saver]


def test_ctrl_c_while_booking_completes_the_step_and_resumes(tmp_path):
    """SIGINT arrives in the middle of booking step 5: the step is booked whole, so the checkpoint saved on the
    exception holds exactly the state of an uninterrupted tracker stopped after step 5. (The resumed model then
    follows Lightning's mid-epoch restart, not the uninterrupted run, so the resume is checked for its windows.)"""
    _, _, query = _data()
    reference = InfluenceTracker(queries={"val": query}, window_every_n_steps=3, dirpath=tmp_path / "ref")
    _fit(reference, _schedule(3), _adamw, max_steps=6)

    tracker, callbacks = _interrupted_run(tmp_path, lambda: os.kill(os.getpid(), signal.SIGINT))
    with pytest.raises((SystemExit, KeyboardInterrupt)):  # Lightning turns Ctrl+C into exit(1)
        _fit(tracker, _schedule(3), _adamw, callbacks=callbacks, enable_checkpointing=True)
    assert tracker.steps_booked == 6 and tracker.global_step == 6  # the interrupted step was booked whole
    saved = torch.load(tmp_path / "on_exception.ckpt", weights_only=False)
    state, expected = saved["callbacks"][tracker.state_key], reference.state_dict()
    assert saved["global_step"] == state["global_step"] == 6 and state["steps_booked"] == 6
    for block, value in expected["estimator"]["states"].items():
        torch.testing.assert_close(state["estimator"]["states"][block], value, **TIGHT)

    resumed = InfluenceTracker(queries={"val": query}, window_every_n_steps=3, dirpath=tmp_path / "a")
    _fit(resumed, _schedule(3), _adamw, ckpt_path=tmp_path / "on_exception.ckpt")
    assert resumed.steps_booked == 12
    windows = resumed.windows("val")
    assert [(w.start_step, w.end_step) for w in windows] == [(0, 3), (3, 6), (6, 9), (9, 12)]
    for got, want in zip(windows[:2], reference.windows("val")):  # (3, 6) closed on resume, at θ_6
        torch.testing.assert_close(got.scores, want.scores, **TIGHT)
    assert [(r["start_step"], r["end_step"]) for r in _records(tmp_path / "a")] == [(0, 3), (3, 6), (6, 9), (9, 12)]


def test_the_interrupt_guard_holds_sigint_during_a_booking_and_passes_it_on_between_bookings():
    received, order = [], []

    def handler(signum, frame):
        received.append(signum)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        guard = InterruptGuard()
        with guard.booking():
            os.kill(os.getpid(), signal.SIGINT)
            order.append("booked")  # the signal waits for the end of the block
        assert order == ["booked"] and received == [signal.SIGINT]
        os.kill(os.getpid(), signal.SIGINT)  # between bookings: straight to the handler ours replaced
        assert received == [signal.SIGINT, signal.SIGINT]
        assert signal.getsignal(signal.SIGINT) is not handler  # ours stays installed between bookings
        guard.release()
        assert signal.getsignal(signal.SIGINT) is handler
        os.kill(os.getpid(), signal.SIGINT)
        assert received == [signal.SIGINT] * 3
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_fit_leaves_the_sigint_handler_as_it_found_it(tmp_path):
    before = signal.getsignal(signal.SIGINT)
    _fit(InfluenceTracker(), _schedule(1), _adamw)
    assert signal.getsignal(signal.SIGINT) is before
    with pytest.raises(KeyboardInterrupt):  # Ctrl+C after the fit: Python's default again
        os.kill(os.getpid(), signal.SIGINT)


def test_a_failure_while_booking_makes_its_checkpoint_refuse_to_resume(tmp_path):
    def fail():
        raise RuntimeError("simulated failure inside the tracker")

    tracker, callbacks = _interrupted_run(tmp_path, fail)
    with pytest.raises(RuntimeError, match="simulated failure"):
        _fit(tracker, _schedule(3), _adamw, callbacks=callbacks, enable_checkpointing=True)
    resumed = InfluenceTracker(queries={"val": _data()[2]}, window_every_n_steps=3, dirpath=tmp_path / "a")
    with pytest.raises(InfluenceConfigurationError, match=r"cannot be trusted: booking optimizer step 5 failed"):
        _fit(resumed, _schedule(3), _adamw, ckpt_path=tmp_path / "on_exception.ckpt")
    with pytest.raises(RuntimeError, match="the last fit failed: booking optimizer step 5"):
        tracker.influence("val")


def test_a_checkpoint_whose_tracker_is_behind_the_model_is_refused(tmp_path):
    tracker = InfluenceTracker()
    _fit(
        tracker, _schedule(1), callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)], enable_checkpointing=True
    )
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
    state = checkpoint["callbacks"][tracker.state_key]
    state["global_step"] -= 1
    torch.save(checkpoint, tmp_path / "edited.ckpt")
    with pytest.raises(
        InfluenceConfigurationError, match=r"booked the optimizer steps up to 3, but the model is at step 4"
    ):
        _fit(InfluenceTracker(), _schedule(2), ckpt_path=tmp_path / "edited.ckpt")


def test_a_version_1_checkpoint_state_still_resumes(tmp_path):
    _, _, query = _data()
    reference = InfluenceTracker(queries={"val": query}, write_artifacts=False)
    _fit(reference, _schedule(2), _adamw)

    first = InfluenceTracker(queries={"val": query}, write_artifacts=False)
    _fit(
        first,
        _schedule(1),
        _adamw,
        callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)],
        enable_checkpointing=True,
    )
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
    v2 = checkpoint["callbacks"][first.state_key]
    checkpoint["callbacks"][first.state_key] = {
        "version": 1,
        "tracked_ids": v2["tracked_ids"],
        "steps_done": v2["steps_booked"],
        "seen": v2["seen"],
        "engine": {"states": v2["estimator"]["states"], "tracin_scores": {}},
        "windows": {k: v for k, v in v2["windows"].items() if k != "start_step"},
    }
    torch.save(checkpoint, tmp_path / "v1.ckpt")
    resumed = InfluenceTracker(queries={"val": query}, write_artifacts=False)
    _fit(resumed, _schedule(2), _adamw, ckpt_path=tmp_path / "v1.ckpt")
    _assert_same(resumed, reference, query)


# ------------------------------------------------------------------------- windows across resumes and fits
def test_epoch_window_survives_a_checkpoint_at_the_epochs_last_batch(tmp_path):
    _, _, query = _data()
    reference = InfluenceTracker(queries={"val": query}, window_every_n_epochs=1, dirpath=tmp_path / "ref")
    _fit(reference, _schedule(3))

    class CrashAt(TinyClassifier):
        def training_step(self, batch, batch_idx):
            if (self.current_epoch, batch_idx) == (2, 1):
                raise RuntimeError("simulated crash")
            return super().training_step(batch, batch_idx)

    every_4 = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=4)  # at the epochs' last batch
    crashed = InfluenceTracker(queries={"val": query}, window_every_n_epochs=1, dirpath=tmp_path / "run")
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(crashed, _schedule(3), module_cls=CrashAt, callbacks=[every_4], enable_checkpointing=True)
    resumed = InfluenceTracker(queries={"val": query}, window_every_n_epochs=1, dirpath=tmp_path / "run")
    _fit(resumed, _schedule(3), ckpt_path=tmp_path / "last.ckpt")
    assert [(w.start_step, w.end_step) for w in resumed.windows("val")] == [(0, 4), (4, 8), (8, 12)]
    _assert_same(resumed, reference, query)
    assert [(r["start_step"], r["end_step"]) for r in _records(tmp_path / "run")] == [(0, 4), (4, 8), (8, 12)]


def test_a_continued_fit_numbers_and_appends_its_windows(tmp_path):
    """Plain SGD keeps no optimizer state, so two fits of 2 + 2 epochs on one Trainer are the 4-epoch run."""
    x, y, query = _data()
    reference = InfluenceTracker(queries={"val": query}, window_every_n_epochs=1, dirpath=tmp_path / "ref")
    _fit(reference, _schedule(4))

    tracker = InfluenceTracker(queries={"val": query}, window_every_n_epochs=1, dirpath=tmp_path / "run")
    module = TinyClassifier(_net(), _sgd)
    trainer = lightning_trainer(2, callbacks=[tracker])
    loader = fixed_loader(x, y, _schedule(4))
    trainer.fit(module, loader)
    trainer.fit_loop.max_epochs = 4
    trainer.fit(module, loader)
    assert trainer.global_step == 16
    assert [(w.start_step, w.end_step) for w in tracker.windows("val")] == [(0, 4), (4, 8), (8, 12), (12, 16)]
    _assert_same(tracker, reference, query)
    assert [(r["start_step"], r["end_step"]) for r in _records(tmp_path / "run")] == [(0, 4), (4, 8), (8, 12), (12, 16)]


def test_a_fresh_fit_in_the_same_folder_moves_the_old_windows_aside(tmp_path):
    _, _, query = _data()
    for _ in range(2):
        _fit(InfluenceTracker(queries={"val": query}, window_every_n_epochs=1, dirpath=tmp_path), _schedule(2))
    assert len(_records(tmp_path)) == 2
    with open(tmp_path / "windows.1.jsonl", encoding="utf-8") as f:
        assert len(f.readlines()) == 2


def test_constructor_arguments_are_never_overwritten():
    x, y, _ = _data()
    tracker = InfluenceTracker()
    _fit(tracker, _schedule(1))
    assert tracker.num_samples is None and tracker.tracked_ids.numel() == N
    bigger_x, bigger_y = torch.cat([x, x[:6]]), torch.cat([y, y[:6]])
    module = TinyClassifier(_net(), _sgd)
    schedule = [[list(range(i, i + 6)) for i in range(0, N + 6, 6)]]
    lightning_trainer(1, callbacks=[tracker]).fit(module, fixed_loader(bigger_x, bigger_y, schedule))
    assert tracker.num_samples is None and tracker.tracked_ids.numel() == N + 6
    assert copy.copy(tracker.config) == tracker.config


def test_states_kept_out_of_checkpoints_resume_exactly_from_the_last_one(tmp_path):
    _, _, query = _data()
    reference = InfluenceTracker(queries={"val": query}, write_artifacts=False)
    _fit(reference, _schedule(3), _adamw)

    def tracker():
        return InfluenceTracker(
            queries={"val": query}, write_artifacts=False, states_in_checkpoint=False, dirpath=tmp_path / "a"
        )

    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_epochs=1, save_top_k=-1)
    first = tracker()
    _fit(first, _schedule(2), _adamw, callbacks=[saver], enable_checkpointing=True)  # epochs 0 and 1
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["callbacks"][first.state_key]
    assert "estimator" not in saved and saved["side_file"].endswith("states.pt")  # the states stay out
    resumed = tracker()
    _fit(resumed, _schedule(3), _adamw, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    _assert_same(resumed, reference, query)
    older = sorted((tmp_path / "ckpt").glob("epoch=0*.ckpt"))[0]
    with pytest.raises(InfluenceConfigurationError, match="only the last checkpoint keeps its states"):
        _fit(tracker(), _schedule(3), _adamw, ckpt_path=older)
