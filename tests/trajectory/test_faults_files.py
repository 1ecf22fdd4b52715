"""Faults of files and runs, each refused at the earliest moment by an error that names the problem, the file or step,
and the fix (issue 24): an unfinished trajectory (a crashed run, a run still writing in this or another process), a
full disk while recording, truncated and overwritten trajectory files, a replay given a shorter or an iterable training
set, two live fits sharing one artifact folder, and NaN in the training loss with record-only tracking. Small float64
problems through the public API; a second process holds the locks where one is needed."""

from __future__ import annotations

import errno
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, Subset, TensorDataset

from lightning_influence import IndexedDataset, InfluenceTracker, load_trajectory
from lightning_influence.errors import (
    DamagedFileError,
    FolderInUseError,
    InfluenceConfigurationError,
    InfluenceError,
    NonFiniteInfluenceError,
    ReplayInputError,
    TrajectoryWriteError,
    UnfinishedTrajectoryError,
)
from lightning_influence.testing import (
    TinyClassifier,
    fixed_loader,
    lightning_trainer,
    random_classification,
    random_schedule,
)
from lightning_influence.trajectory import format as trajectory_format
from lightning_influence.trajectory.reader import StepEntry, TrajectoryWriter
from lightning_influence.trajectory.replay import TrajectoryReplay

N, D, C = 12, 3, 2
SCHEDULE = random_schedule(N, 4, 2, seed=1)  # 3 steps an epoch, 6 in all


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, 4), nn.Tanh(), nn.Linear(4, C)).double()


def _module(cls=TinyClassifier) -> TinyClassifier:
    return cls(_net(), lambda m: torch.optim.AdamW(m.parameters(), lr=0.05, weight_decay=0.1))


def _data():
    return random_classification(N, D, C, seed=2)


def _tracker(dirpath, **kwargs) -> InfluenceTracker:
    defaults = dict(track=(), record_trajectory=True, checkpoint_every_n_steps=2, dirpath=dirpath)
    return InfluenceTracker(**{**defaults, **kwargs})


def _fit(tracker, module=None, x=None, schedule=SCHEDULE, **trainer):
    data_x, y, _ = _data()
    module = module if module is not None else _module()
    lightning_trainer(len(schedule), callbacks=[tracker], **trainer).fit(
        module, fixed_loader(data_x if x is None else x, y, schedule)
    )
    return module


def _dataset(x=None):
    data_x, y, _ = _data()
    return IndexedDataset(TensorDataset(data_x if x is None else x, y))


def _open_files(folder) -> list[str]:
    """The files under ``folder`` this process holds open."""
    fds = "/proc/self/fd"
    if not os.path.isdir(fds):
        return []
    out = []
    for fd in os.listdir(fds):
        try:
            target = os.readlink(os.path.join(fds, fd))
        except OSError:
            continue
        if target.startswith(str(folder)):
            out.append(target)
    return out


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """One finished recording (no batches stored), copied by each test that damages it."""
    folder = tmp_path_factory.mktemp("recorded")
    _fit(_tracker(folder))
    return folder


def _copy(recorded, tmp_path):
    shutil.copytree(recorded, tmp_path / "run")
    return tmp_path / "run"


def _replay(folder, dataset=None):
    _, _, query = _data()
    return load_trajectory(folder).influence(
        _module(), _dataset() if dataset is None else dataset, (*query, torch.arange(len(query[1]))), progress=False
    )


# -- 1. unfinished trajectories ---------------------------------------------------------------------------------------


class _CrashAt(TinyClassifier):
    def training_step(self, batch, batch_idx):
        if (self.current_epoch, batch_idx) == (1, 1):
            raise RuntimeError("simulated crash")
        return super().training_step(batch, batch_idx)


def test_a_crashed_run_is_refused_by_the_replay_and_leaves_nothing_open(recorded, tmp_path):
    tracker = _tracker(tmp_path)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(tracker, _module(_CrashAt))
    trajectory = load_trajectory(tmp_path)  # it loads, for inspection
    assert not trajectory.complete and trajectory.final_step is None
    assert [e.step for e in trajectory.steps] == [0, 1, 2, 3]
    assert not _open_files(tmp_path) and sorted(p.name for p in tmp_path.rglob("*.lock")) == []
    message = (
        r"trajectory: the trajectory is unfinished: its writer did not close it \(no end.json nor final.pt; the last"
        r" recorded step is 3\).*Resume the fit from its last checkpoint \(trainer.fit\(..., ckpt_path=...\)\)"
    )
    with pytest.raises(UnfinishedTrajectoryError, match=message):
        _replay(tmp_path)
    with pytest.raises(UnfinishedTrajectoryError, match="unfinished"):
        TrajectoryReplay(tmp_path, _module(), _dataset())
    assert torch.isfinite(_replay(recorded).scores).all()  # a finished one replays


def test_the_in_process_replay_waits_for_the_writer_and_a_running_one_is_refused(tmp_path, monkeypatch):
    close = TrajectoryWriter.close

    def slow_close(self):  # the writing thread is still busy when fit() returns control to the hooks
        import time

        time.sleep(0.3)
        close(self)

    monkeypatch.setattr(TrajectoryWriter, "close", slow_close)
    seen = {}

    class _Peek(TinyClassifier):
        def on_train_epoch_end(self):
            if self.current_epoch == 0:  # the trajectory of the run in progress, read in this very process
                trajectory = load_trajectory(tmp_path)
                try:
                    TrajectoryReplay(trajectory, _module(), _dataset())
                except UnfinishedTrajectoryError as err:
                    seen["error"] = str(err)

    _, _, query = _data()
    tracker = _tracker(tmp_path, track=None, estimator="first-order", queries={"val": query})
    _fit(tracker, _module(_Peek))
    assert "the trajectory is unfinished" in seen["error"] and "still running in this process" in seen["error"]
    torch.testing.assert_close(
        tracker.influence("val", all_samples=True).scores, tracker.influence("val").scores, rtol=1e-8, atol=1e-12
    )


_HOLDER = """
import sys, torch
from pathlib import Path
from lightning_influence.io.files import FolderLock
from lightning_influence.trajectory.reader import StepEntry, TrajectoryWriter
folder = Path(sys.argv[1])
FolderLock(folder / "fit.lock", "an artifact folder").acquire("")
writer = TrajectoryWriter(folder / "trajectory", {"num_samples": 12})
writer.write_checkpoint(0, torch.zeros(3), {}, {})
writer.write_step(StepEntry(0, 0, [{"lr": 0.1}], [([0, 1], 1.0)], None, {"theta": [0.0], "grad": [0.0]}))
print("ready", flush=True)
sys.stdin.read()
"""


def test_a_folder_another_process_writes_is_refused_until_that_process_is_gone(tmp_path):
    folder = tmp_path / "influence"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_HOLDER), str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == b"ready"
        pid = holder.pid
        with pytest.raises(FolderInUseError, match=rf"the trajectory is still being written \(a run of process {pid}"):
            load_trajectory(folder)
        message = (
            rf"{re.escape(str(folder))} is in use: a run of process {pid} on .* writes it \(.*fit.lock exists\). Two"
            r" runs must not share an artifact folder.*InfluenceTracker\(dirpath=...\), or another"
            r" Trainer\(default_root_dir=...\)"
        )
        with pytest.raises(FolderInUseError, match=message):
            _fit(_tracker(folder))
    finally:
        holder.send_signal(signal.SIGKILL)  # kill -9: the locks stay behind, stale
        holder.wait()
    assert (folder / "fit.lock").exists() and (folder / "trajectory" / "writing.lock").exists()
    trajectory = load_trajectory(folder)
    assert not trajectory.complete
    with pytest.raises(UnfinishedTrajectoryError, match="unfinished"):
        TrajectoryReplay(trajectory, _module(), _dataset())
    with pytest.warns(UserWarning, match="taking over a stale lock"):
        _fit(_tracker(folder))  # a new run takes the stale locks over (and replaces the trajectory)
    assert load_trajectory(folder).complete and not list(folder.rglob("*.lock"))


# -- 2. a full disk -------------------------------------------------------------------------------------------------


class _FullDisk(io.RawIOBase):
    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_names_the_file_the_step_and_the_cause_and_closes_every_handle(tmp_path, monkeypatch):
    real = trajectory_format.atomic_write

    def filling(path, write):  # the disk fills up at the checkpoint of step 4: torch.save's own failure
        if path.name == "step_4.pt":
            write(_FullDisk())
        real(path, write)

    monkeypatch.setattr(trajectory_format, "atomic_write", filling)
    message = (
        r"Recording the trajectory failed at optimizer step 4: writing .*checkpoints/step_4.pt failed: No space left on"
        r" device \(errno 28, ENOSPC\). The trajectory in .* is left unfinished and cannot be replayed. Free space on"
        r" that disk \(or record into another folder: InfluenceTracker\(dirpath=...\)\), then resume the fit"
    )
    with pytest.raises(TrajectoryWriteError, match=message) as caught:
        _fit(_tracker(tmp_path))
    assert isinstance(caught.value, OSError) and caught.value.errno == errno.ENOSPC
    assert not _open_files(tmp_path) and not list(tmp_path.rglob("*.lock")) and not list(tmp_path.rglob("*.tmp"))
    with pytest.raises(UnfinishedTrajectoryError, match="unfinished"):
        _replay(tmp_path)
    monkeypatch.setattr(trajectory_format, "atomic_write", real)
    with pytest.warns(UserWarning, match="replaces the trajectory"):
        _fit(_tracker(tmp_path))  # the folder is free again
    assert load_trajectory(tmp_path).complete


def test_a_failed_step_line_closes_the_writer_and_every_later_write_names_it(tmp_path):
    writer = TrajectoryWriter(tmp_path, {"num_samples": 4})
    writer.write_checkpoint(0, torch.zeros(3), {}, {})

    class _Full:
        closed = False

        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def flush(self):
            pass

        def fileno(self):
            return real.fileno()

        def close(self):
            real.close()
            self.closed = True

    real, writer._steps = writer._steps, _Full()
    entry = StepEntry(0, 0, [{"lr": 0.1}], [([0, 1], 1.0)], None, {"theta": [0.0], "grad": [0.0]})
    with pytest.raises(TrajectoryWriteError, match=r"at optimizer step 0: writing .*steps.jsonl failed: No space left"):
        writer.write_step(entry)
    assert real.closed and not (tmp_path / "writing.lock").exists() and not (tmp_path / "end.json").exists()
    with pytest.raises(TrajectoryWriteError, match=r"stopped at a failure: .*steps.jsonl failed: No space left"):
        writer.close()


# -- 3. damaged files -------------------------------------------------------------------------------------------------

DAMAGED = r"the file is damaged \(\d+ bytes, {}\).*Record the run again, or resume the fit from a Lightning checkpoint"


@pytest.mark.parametrize("damage", ["truncated", "garbage", "final"])
def test_a_damaged_trajectory_file_is_named_with_the_fix(recorded, tmp_path, damage):
    folder = _copy(recorded, tmp_path) / "trajectory"
    file = folder / ("final.pt" if damage == "final" else "checkpoints/step_2.pt")
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2] if damage == "truncated" else os.urandom(len(data)))
    reason = r"truncated \(PytorchStreamReader failed reading zip archive: failed finding central directory\)"
    reason = reason if damage == "truncated" else r"not a whole torch.save file \(\w+\)"
    with pytest.raises(DamagedFileError, match=re.escape(f"{file}: ") + DAMAGED.format(reason)) as caught:
        _replay(folder)
    assert "weights_only" not in str(caught.value) and caught.value.__cause__ is None
    assert isinstance(caught.value, InfluenceError) and isinstance(caught.value, ValueError)


# -- 4. and 5. a training set that cannot give the recorded samples ---------------------------------------------------


def test_a_shorter_training_set_is_refused_before_the_replay_naming_both_sizes(recorded, tmp_path):
    shorter = Subset(_dataset(), range(8))
    message = (
        r"the training set holds 8 samples, but the recorded run had num_samples=12 and used sample id 11 \(in a step"
        r" whose batches were not recorded\).*Pass the dataset the run trained on"
    )
    with pytest.raises(ReplayInputError, match=message):
        _replay(recorded, shorter)


class _Stream(IterableDataset):
    def __init__(self, schedule):
        self.schedule = schedule
        x, y, _ = _data()
        self.x, self.y = x, y

    def __iter__(self):
        for epoch in self.schedule[:1]:
            for ids in epoch:
                for i in ids:
                    yield {"x": self.x[i], "y": self.y[i], "sample_id": i}


def test_an_iterable_training_set_needs_recorded_batches(recorded, tmp_path):
    class _Dicts(TinyClassifier):
        def per_sample_loss(self, batch):
            return nn.functional.cross_entropy(self.net(batch["x"]), batch["y"], reduction="none")

    loader = DataLoader(_Stream(SCHEDULE), batch_size=4)
    trainer = lightning_trainer(1, callbacks=[_tracker(tmp_path, num_samples=N)])
    message = r"record_trajectory=True with an IterableDataset \(_Stream\).*Pass record_batches=True"
    with pytest.raises(InfluenceConfigurationError, match=message):
        trainer.fit(_module(_Dicts), loader)
    replay = r"were not recorded, and the training set \(_Stream\) is an IterableDataset.*record_batches=True"
    with pytest.raises(ReplayInputError, match=replay):
        _replay(recorded, _Stream(SCHEDULE))


# -- 6. two fits, one folder (in one process; another process: above) -----------------------------------------------


def test_two_live_fits_never_share_an_artifact_folder_and_a_continued_fit_still_works(tmp_path):
    first, second = _tracker(tmp_path), _tracker(tmp_path, name="other")
    x, y, _ = _data()
    trainer = lightning_trainer(1, callbacks=[first, second])
    message = rf"{re.escape(str(tmp_path))} is in use: a run of process {os.getpid()} .*dirpath="
    with pytest.raises(FolderInUseError, match=message):
        trainer.fit(_module(), fixed_loader(x, y, SCHEDULE[:1]))
    assert not list(tmp_path.rglob("*.lock"))  # the failed fit let go of the folder
    module = _module()
    trainer = lightning_trainer(1, callbacks=[first])
    trainer.fit(module, fixed_loader(x, y, SCHEDULE[:1]))
    trainer.fit_loop.max_epochs = 2  # the same Trainer goes on training: a continued fit in the same folder
    trainer.fit(module, fixed_loader(x, y, SCHEDULE))
    trajectory = load_trajectory(tmp_path)
    assert trajectory.complete and [e.step for e in trajectory.steps] == list(range(6))
    assert not list(tmp_path.rglob("*.lock"))


# -- 7. NaN in the training loss, record-only -------------------------------------------------------------------------


def test_nan_in_the_training_loss_names_the_step_not_weight_averaging(tmp_path):
    x = _data()[0].clone()
    x[SCHEDULE[0][1][0]] = float("nan")  # a sample of the second step (step 1)
    message = (
        r"The tracked parameters are not finite after optimizer step 1 \(\d+ of \d+ values are NaN or inf\): the"
        r" training loss or its gradient was not finite at step 1.*lower the learning rate or clip gradients"
    )
    with pytest.raises(NonFiniteInfluenceError, match=message) as caught:
        _fit(_tracker(tmp_path), x=x)
    assert "weight-averaging" not in str(caught.value)
    assert not _open_files(tmp_path) and not list(tmp_path.rglob("*.lock"))
