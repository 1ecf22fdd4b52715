"""Every training sample by the adjoint replay of a recorded trajectory ([concepts.md: Every sample at once]), through
Lightning, float64.

- duality: ``influence(q, all_samples=True)`` and ``windows(q, all_samples=True)`` equal the forward
  ``"first-order"`` engine's numbers for the same run to 1e-8 relative, for every optimizer and setup;
- the scores are the derivative of two real retrainings (finite differences);
- a run resumed mid-recording replays to the uninterrupted run's numbers;
- a replay that cannot reproduce a recorded step raises; a trajectory loaded in a new process gives the
  same numbers; recording alone (``track=()``) keeps no forward state.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_influence import InfluenceTracker
from lightning_influence.testing import (
    TinyClassifier,
    fixed_loader,
    lightning_trainer,
    random_classification,
    random_schedule,
    removal_derivative,
)
from lightning_influence.trajectory.replay import ReplayMismatchError

N, D, C = 20, 4, 3
DUALITY = dict(rtol=1e-8, atol=1e-12)


def _data():
    return random_classification(N, D, C, seed=4)


def _mlp() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(D, 5), nn.Tanh(), nn.Linear(5, C)).double()


OPTIMIZERS = {
    "sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.3),
    "momentum": lambda m: torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.9, dampening=0.1, weight_decay=0.01),
    "nesterov": lambda m: torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.8, nesterov=True),
    "adam": lambda m: torch.optim.Adam(m.parameters(), lr=0.03, weight_decay=0.01),
    "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=0.03, weight_decay=0.1, betas=(0.8, 0.95)),
    "two-groups": lambda m: torch.optim.AdamW(
        [{"params": m[0].parameters(), "lr": 0.05}, {"params": m[2].parameters(), "weight_decay": 0.0}], lr=0.02
    ),
}


def _step_lr(o):
    return torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.7)


SETUPS = {
    **{name: dict(opt=name) for name in OPTIMIZERS},
    "adamw-scheduler": dict(opt="adamw", sched=_step_lr),
    "clip-norm": dict(opt="momentum", trainer=dict(gradient_clip_val=0.05)),
    "clip-value": dict(opt="adamw", trainer=dict(gradient_clip_val=0.01, gradient_clip_algorithm="value")),
    "accumulation": dict(opt="adamw", trainer=dict(accumulate_grad_batches=2)),
}


def _run(setup: dict, tracker: InfluenceTracker, schedule, callbacks=(), ckpt_path=None, module_cls=TinyClassifier):
    x, y, _ = _data()
    module = module_cls(_mlp(), OPTIMIZERS[setup["opt"]], setup.get("sched"))
    kwargs = dict(setup.get("trainer", {}))
    if callbacks:
        kwargs["enable_checkpointing"] = True
    trainer = lightning_trainer(len(schedule), callbacks=[tracker, *callbacks], **kwargs)
    trainer.fit(module, fixed_loader(x, y, schedule), ckpt_path=ckpt_path)
    return trainer, module


def _tracker(tmp_path, **kwargs) -> InfluenceTracker:
    _, _, query = _data()
    defaults = dict(
        estimator="first-order",
        queries={"val": query},
        window_every_n_steps=3,
        record_trajectory=True,
        checkpoint_every_n_steps=4,
        dirpath=tmp_path,
    )
    return InfluenceTracker(**{**defaults, **kwargs})


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", list(SETUPS))
def test_all_samples_equal_the_forward_first_order_scores(name, tmp_path):
    schedule = random_schedule(N, 4, 2, seed=3)  # 5 steps per epoch, 10 in all (5 under accumulation)
    tracker = _tracker(tmp_path)
    _run(SETUPS[name], tracker, schedule)
    forward, replayed = tracker.influence("val"), tracker.influence("val", all_samples=True)
    assert torch.equal(replayed.sample_ids, torch.arange(N)) and replayed.estimator == "first-order"
    print(f"{name}: duality relative error {_relative(replayed.scores, forward.scores):.1e}")
    torch.testing.assert_close(replayed.scores, forward.scores, **DUALITY)
    windows, forward_windows = tracker.windows("val", all_samples=True), tracker.windows("val")
    assert [(w.start_step, w.end_step) for w in windows] == [(w.start_step, w.end_step) for w in forward_windows]
    for got, want in zip(windows, forward_windows):
        torch.testing.assert_close(got.scores, want.scores, **DUALITY)
    x, y, query = _data()
    per = tracker.influence((x[:3], y[:3], torch.arange(3)), per_example=True, all_samples=True)
    want = tracker.influence((x[:3], y[:3], torch.arange(3)), per_example=True)
    torch.testing.assert_close(per.per_example, want.per_example, **DUALITY)


def test_all_samples_match_finite_differences_of_retraining(tmp_path):
    x, y, query = _data()
    schedule = random_schedule(N, 4, 2, seed=3)
    tracker = _tracker(tmp_path, track=())  # recording alone
    _run(dict(opt="adamw"), tracker, schedule)
    assert tracker.engine.num_tracked == 0 and tracker.tracked_ids.numel() == 0
    scores = tracker.influence(query, all_samples=True).scores
    for j in (0, 7, 13):
        expected = removal_derivative(_mlp(), OPTIMIZERS["adamw"], x, y, schedule, query, j, None, 1e-4)
        assert abs(float(scores[j]) - expected) <= 1e-3 * abs(expected), (j, float(scores[j]), expected)


class _CrashAt(TinyClassifier):
    def training_step(self, batch, batch_idx):
        if (self.current_epoch, batch_idx) == (2, 2):
            raise RuntimeError("simulated crash")
        return super().training_step(batch, batch_idx)


def test_a_run_resumed_mid_recording_replays_like_the_uninterrupted_one(tmp_path):
    schedule = random_schedule(N, 4, 3, seed=6)
    reference = _tracker(tmp_path / "reference")
    _run(dict(opt="adamw"), reference, schedule)

    epoch_end = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_epochs=1)
    crashed = _tracker(tmp_path / "run")
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(dict(opt="adamw"), crashed, schedule, callbacks=[epoch_end], module_cls=_CrashAt)
    resumed = _tracker(tmp_path / "run")
    _run(dict(opt="adamw"), resumed, schedule, callbacks=[epoch_end], ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    got, want = resumed.influence("val", all_samples=True), reference.influence("val", all_samples=True)
    torch.testing.assert_close(got.scores, want.scores, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(got.scores, resumed.influence("val").scores, **DUALITY)


def test_a_replay_that_cannot_reproduce_a_step_raises(tmp_path):
    x, y, _ = _data()
    tracker = _tracker(tmp_path)
    module = TinyClassifier(_mlp(), OPTIMIZERS["adamw"])
    loader = fixed_loader(x, y, random_schedule(N, 4, 2, seed=3))
    lightning_trainer(2, callbacks=[tracker]).fit(module, loader)
    x[7] += 0.5  # the dataset changed after training (the loader's TensorDataset holds these tensors)
    with pytest.raises(ReplayMismatchError, match=r"step \d+.*record_batches=True"):
        tracker.influence("val", all_samples=True)


def test_record_batches_replays_a_dataset_that_changed(tmp_path):
    x, y, _ = _data()
    tracker = _tracker(tmp_path, record_batches=True)
    module = TinyClassifier(_mlp(), OPTIMIZERS["adamw"])
    lightning_trainer(2, callbacks=[tracker]).fit(module, fixed_loader(x, y, random_schedule(N, 4, 2, seed=3)))
    expected = tracker.influence("val").scores
    x[7] += 0.5
    torch.testing.assert_close(tracker.influence("val", all_samples=True).scores, expected, **DUALITY)


def test_a_trajectory_loaded_in_a_new_process_gives_the_same_numbers(tmp_path):
    x, y, query = _data()
    tracker = _tracker(tmp_path)
    _run(dict(opt="adamw"), tracker, random_schedule(N, 4, 2, seed=3))
    expected = tracker.influence("val", all_samples=True).scores
    torch.save({"x": x, "y": y, "query": query}, tmp_path / "data.pt")
    script = textwrap.dedent(
        f"""
        import json, torch
        from torch import nn
        from torch.utils.data import TensorDataset
        from lightning_influence import IndexedDataset, load_trajectory
        from lightning_influence.testing import TinyClassifier
        data = torch.load({str(tmp_path / "data.pt")!r})
        net = nn.Sequential(nn.Linear({D}, 5), nn.Tanh(), nn.Linear(5, {C})).double()  # other weights: replaced
        module = TinyClassifier(net, None)
        result = load_trajectory({str(tmp_path)!r}).influence(
            module, IndexedDataset(TensorDataset(data["x"], data["y"])), data["query"], progress=False
        )
        print(json.dumps(result.scores.tolist()))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    got = torch.tensor(json.loads(out.stdout.strip().splitlines()[-1]), dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-15)


def test_all_samples_needs_a_recorded_trajectory(tmp_path):
    tracker = InfluenceTracker(queries={"val": _data()[2]}, write_artifacts=False)
    _run(dict(opt="sgd"), tracker, random_schedule(N, 4, 1, seed=3))
    assert tracker.trajectory_path is None
    with pytest.raises(RuntimeError, match="record_trajectory=True"):
        tracker.influence("val", all_samples=True)


def test_recording_with_a_parameter_subset_records_every_parameter(tmp_path):
    """params= limits the forward states only: the trajectory holds every trainable parameter, so the replay
    gives the first-order scores of the full model (equal to a full-parameter forward tracker on the run)."""
    x, y, query = _data()
    subset = _tracker(tmp_path, params=["net.2"], queries={"val": query})
    full = InfluenceTracker(estimator="first-order", queries={"val": query}, write_artifacts=False)
    module = TinyClassifier(_mlp(), OPTIMIZERS["adamw"])
    trainer = lightning_trainer(2, callbacks=[subset, full], gradient_clip_val=0.05)
    trainer.fit(module, fixed_loader(x, y, random_schedule(N, 4, 2, seed=3)))
    assert subset.engine.theta.shape[1] == 5 * C + C  # the forward states: the head only
    replayed = subset.influence("val", all_samples=True).scores
    torch.testing.assert_close(replayed, full.influence("val").scores, **DUALITY)


def test_recording_alone_costs_no_state(tmp_path):
    tracker = _tracker(tmp_path, track=(), estimator="acc")
    trainer, _ = _run(dict(opt="adamw"), tracker, random_schedule(N, 4, 1, seed=3))
    assert tracker.engine.state_dict() == {} and copy.copy(tracker.trajectory_path).endswith("trajectory")
    assert tracker.steps_booked == trainer.global_step == 5
