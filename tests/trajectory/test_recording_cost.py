"""What the cheaper recording path must keep (issue 22; the fingerprints' paths against their definition are in
``test_trajectory.py``): the writing thread works with one intra-op thread at a lower priority without changing
anyone else's, the writer defers the fsyncs of per-step files to the next checkpoint, and tensors are saved without a
second copy."""

from __future__ import annotations

import os
import sys
import threading

import torch

from lightning_influence.io import files
from lightning_influence.trajectory.format import StepEntry, storable
from lightning_influence.trajectory.reader import load_trajectory
from lightning_influence.trajectory.recorder import TrajectoryRecorder
from lightning_influence.trajectory.writer import TrajectoryWriter


def test_storable_keeps_owned_compact_cpu_tensors_and_copies_the_rest():
    fresh = torch.arange(6.0)
    assert storable(fresh, "x", copy=False).data_ptr() == fresh.data_ptr()
    assert storable(fresh, "x").data_ptr() != fresh.data_ptr()  # the default still copies
    view = torch.arange(12.0)[2:8]
    kept = storable({"a": [view]}, "x", copy=False)["a"][0]
    assert kept.data_ptr() != view.data_ptr() and kept.untyped_storage().nbytes() == 6 * 4
    assert torch.equal(kept, view)
    transposed = torch.arange(6.0).reshape(2, 3).t()
    assert storable(transposed, "x", copy=False).is_contiguous()


def test_atomic_write_without_sync_then_sync_files(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(files.os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    files.atomic_write(tmp_path / "a.bin", lambda f: f.write(b"abc"), sync=False)
    assert (tmp_path / "a.bin").read_bytes() == b"abc" and not synced
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    files.sync_files([tmp_path / "a.bin", tmp_path / "gone.bin"])  # a file cut back since is skipped
    assert len(synced) == 1


META = {
    "layout": {"names": ["w"], "shapes": [[2]], "group_slices": [[0, 2]]},
    "optimizer": {"kind": "adamw", "momentum": False},
    "dtype": "float32",
    "num_samples": 12,
    "checkpoint_every_n_steps": 3,
    "fingerprint": {"seed": 11, "size": 4},
    "world_size": 1,
}


def _entry(t: int) -> StepEntry:
    prints = {"theta": [float(t)] * 4, "grad": [0.5] * 4}
    return StepEntry(t, 0, [{"lr": 0.1}], [([t, t + 1], 1.0)], None, prints)


def test_the_writer_fsyncs_per_step_files_together_at_the_next_checkpoint(tmp_path, monkeypatch):
    synced: list[list] = []
    monkeypatch.setattr(
        "lightning_influence.trajectory.writer.sync_files", lambda paths: synced.append(sorted(p.name for p in paths))
    )
    meta = dict(META)
    with TrajectoryWriter(tmp_path, meta) as writer:
        writer.write_checkpoint(0, torch.zeros(2), {}, {})
        for t in range(3):
            writer.write_step(_entry(t), batch=[(torch.tensor([t]),)])
        assert synced == [[]] and len(writer._unsynced) == 3
        theta = torch.ones(2)
        writer.write_checkpoint(3, theta, {"exp_avg": torch.zeros(2)}, {})
        assert synced[-1] == ["step_0.pt", "step_1.pt", "step_2.pt"] and not writer._unsynced
        writer.write_step(_entry(3), batch=[(torch.tensor([3]),)])
        writer.write_final(4, theta, {})
        assert synced[-1] == ["step_3.pt"]
    trajectory = load_trajectory(tmp_path)
    assert [e.step for e in trajectory.steps] == [0, 1, 2, 3] and trajectory.batches(2)[0][0].tolist() == [2]
    assert torch.equal(trajectory.checkpoint(3)["theta"], theta)


def test_the_writing_thread_runs_one_intra_op_thread_at_a_lower_priority(tmp_path):
    threads = torch.get_num_threads()
    meta = dict(META)
    recorder = TrajectoryRecorder(tmp_path, meta, checkpoint_every=2)
    recorder.start(None)
    try:
        assert recorder._io is not None

        def inside() -> tuple[int, int | None]:
            tid = threading.get_native_id()
            nice = os.getpriority(os.PRIO_PROCESS, tid) if sys.platform.startswith("linux") else None
            return torch.get_num_threads(), nice

        inner, nice = recorder._io.submit(inside).result()
        assert inner == 1 and torch.get_num_threads() == threads
        if nice is not None:
            assert nice >= min(19, os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) + 10) or nice == 19
        later: list[int] = []
        started = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        started.start()
        started.join()
        assert later == [threads]  # threads started later keep the default
    finally:
        recorder.abort()
