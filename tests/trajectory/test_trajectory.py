"""The on-disk trajectory: writing, tolerant loading, resuming, segments and fingerprints."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_influence.optimizers import GroupStep
from lightning_influence.trajectory import fingerprint as fp
from lightning_influence.trajectory.fingerprint import fingerprint_tensor
from lightning_influence.trajectory.reader import (
    DEFAULT_CHECKPOINT_EVERY,
    StepEntry,
    TrajectoryWriter,
    default_checkpoint_every,
    fingerprint,
    fingerprints_match,
    load_trajectory,
)

META = {
    "layout": {"names": ["w", "b"], "shapes": [[3, 2], [3]], "groups": [[0, 6], [6, 9]]},
    "optimizer": "adamw",
    "dtype": "float32",
    "num_samples": 12,
    "checkpoint_every_n_steps": 4,
    "fingerprint": {"seed": 11, "size": 4},
    "world_size": 1,
}
P = 9


def _entry(step: int, epoch: int = 0) -> StepEntry:
    """A step whose floats need all 17 digits of float64 to round-trip."""
    lr = 0.1 / 3 + step * 1e-17
    group = dataclasses.asdict(GroupStep(region=slice(0, P), lr=lr, weight_decay=1e-2, step=step + 1))
    group.pop("region")
    theta = torch.linspace(-1.0, 1.0, P, dtype=torch.float64) * (1.0 + step / 7)
    return StepEntry(
        step=step,
        epoch=epoch,
        groups=[group, {**group, "lr": 1 / 3}],
        micro_batches=[([step % 12, (step + 5) % 12], 0.5), ([(step + 1) % 12], 1 / 3)],
        clip={"kind": "norm", "max_norm": 1.0, "other_sq_norm": math.pi} if step % 2 else None,
        fingerprint={"theta": fingerprint(theta, 11), "grad": fingerprint(theta.flip(0), 11)},
    )


def _state(step: int) -> tuple[torch.Tensor, dict, dict]:
    theta = torch.arange(P, dtype=torch.float32) + step
    return theta, {"exp_avg": theta * 0.5, "exp_avg_sq": theta.square(), "missing": None}, {"bn.mean": theta[:3] * 2}


def _batch(step: int) -> list:
    return [(torch.full((2, 3), float(step)), torch.tensor([step, step + 1])), {"x": torch.ones(1) * step, "n": step}]


def _record(path: Path, steps: range, checkpoint_every: int = 4, final: bool = True, **kwargs) -> TrajectoryWriter:
    """Write steps (a checkpoint every ``checkpoint_every`` steps, a batch at every step) and close."""
    writer = TrajectoryWriter(path, META, **kwargs)
    for t in steps:
        if t % checkpoint_every == 0:
            writer.write_checkpoint(t, *_state(t))
        writer.write_step(_entry(t, epoch=t // 5), batch=_batch(t))
    if final:
        writer.write_final(steps[-1] + 1, _state(steps[-1] + 1)[0], _state(steps[-1] + 1)[2])
    writer.close()
    return writer


def _assert_tree_equal(a, b) -> None:
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_tree_equal(x, y)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_tree_equal(a[key], b[key])
    else:
        assert a == b


def test_round_trip(tmp_path):
    folder = tmp_path / "influence" / "trajectory"
    _record(folder, range(10))
    for where in (folder, tmp_path / "influence"):
        traj = load_trajectory(where)
        assert traj.meta == META and traj.resumes == [] and traj.complete
        assert traj.steps == [_entry(t, epoch=t // 5) for t in range(10)]  # float64 round-trips exactly
        assert traj.checkpoint_steps == [0, 4, 8] and traj.final_step == 10
    for t in traj.checkpoint_steps:
        ckpt = traj.checkpoint(t)
        theta, opt_state, frozen = _state(t)
        assert ckpt["step"] == t
        _assert_tree_equal([ckpt["theta"], ckpt["optimizer_state"], ckpt["frozen"]], [theta, opt_state, frozen])
    for t in range(10):
        _assert_tree_equal(traj.batches(t), _batch(t))
    assert traj.batches(99) is None
    final = traj.final()
    _assert_tree_equal([final["step"], final["theta"], final["frozen"]], [10, _state(10)[0], _state(10)[2]])
    with pytest.raises(FileNotFoundError, match="no checkpoint of step 3"):
        traj.checkpoint(3)
    traj.check_contiguous(allow_gaps=False)
    header = json.loads((folder / "meta.json").read_text())
    assert header["format"] == "lightning-influence/trajectory" and header["version"] == 1


def test_files_are_plain_tensors_with_their_own_storage(tmp_path):
    big = torch.randn(1_000_000)
    writer = TrajectoryWriter(tmp_path, META)
    writer.write_checkpoint(0, big[:P], {"exp_avg": big[P : 2 * P]}, {"frozen": big[:2]})
    writer.close()
    file = tmp_path / "checkpoints" / "step_0.pt"
    assert file.stat().st_size < 20_000  # a view would otherwise drag its 4 MB storage along
    ckpt = torch.load(file, weights_only=True)
    assert torch.equal(ckpt["theta"], big[:P])
    assert not [name for name in os.listdir(tmp_path / "checkpoints") if name.endswith(".tmp")]
    with pytest.raises(TypeError, match="weights_only"), TrajectoryWriter(tmp_path / "other", META) as other:
        other.write_step(_entry(0), batch=[object()])
    assert not (tmp_path / "other" / "end.json").exists()  # a failed run claims no end


def test_truncated_last_line_is_dropped_with_a_warning(tmp_path):
    _record(tmp_path, range(3), final=False)
    steps_file = tmp_path / "steps.jsonl"
    line = steps_file.read_text().splitlines()[-1]
    with open(steps_file, "a") as f:
        f.write(line[: len(line) // 2])  # a crash mid-write
    with pytest.warns(UserWarning, match="truncated last step line"):
        traj = load_trajectory(tmp_path)
    assert [e.step for e in traj.steps] == [0, 1, 2] and traj.final_step is None
    lines = steps_file.read_text().splitlines()
    steps_file.write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match="line 2: not valid JSON"):
        load_trajectory(tmp_path)


def test_resume_keeps_the_past_and_drops_the_future(tmp_path):
    _record(tmp_path, range(10))
    with open(tmp_path / "steps.jsonl", "a") as f:
        f.write('{"format": "lightning-influence/traj')  # the crash that interrupted the run
    with pytest.warns(UserWarning, match="truncated"):
        writer = TrajectoryWriter(tmp_path, {**META, "checkpoint_every_n_steps": 3}, resume_from_step=6)
    assert writer.last_step == 5
    traj = load_trajectory(tmp_path)
    assert [e.step for e in traj.steps] == [0, 1, 2, 3, 4, 5]
    assert traj.checkpoint_steps == [0, 4] and traj.final_step is None and not traj.complete
    assert sorted(os.listdir(tmp_path / "batches")) == sorted(f"step_{t}.pt" for t in range(6))
    with pytest.raises(ValueError, match="strictly increase"):
        writer.write_step(_entry(5))
    writer.write_checkpoint(6, *_state(6))
    for t in range(6, 12):
        writer.write_step(_entry(t, epoch=t // 5), batch=_batch(t))
    writer.write_final(12, *_state(12)[::2])
    writer.close()
    traj = load_trajectory(tmp_path)
    assert traj.steps == [_entry(t, epoch=t // 5) for t in range(12)]
    assert traj.checkpoint_steps == [0, 4, 6] and traj.final_step == 12 and traj.resumes == [6]
    assert traj.meta["checkpoint_every_n_steps"] == 3
    assert [(start, [e.step for e in entries]) for start, entries in traj.segments()] == [
        (0, [0, 1, 2, 3]),
        (4, [4, 5]),
        (6, [6, 7, 8, 9, 10, 11]),
    ]


def test_resume_with_another_run_raises(tmp_path):
    _record(tmp_path, range(5))
    other = {**META, "optimizer": "sgd", "num_samples": 13}
    with pytest.raises(ValueError, match="num_samples: recorded 12, now 13.*optimizer: recorded 'adamw'"):
        TrajectoryWriter(tmp_path, other, resume_from_step=4)
    assert [e.step for e in load_trajectory(tmp_path).steps] == list(range(5))  # nothing was touched


def test_a_new_run_replaces_an_old_trajectory(tmp_path):
    _record(tmp_path, range(5))
    with pytest.warns(UserWarning, match="replaces the trajectory"):
        writer = TrajectoryWriter(tmp_path, META)
    writer.close()
    traj = load_trajectory(tmp_path)
    assert traj.steps == [] and traj.checkpoint_steps == [] and traj.final_step is None and traj.segments() == []
    fresh = TrajectoryWriter(tmp_path / "fresh", META, resume_from_step=7)  # nothing recorded: a new trajectory
    fresh.close()
    assert load_trajectory(tmp_path / "fresh").resumes == []


def test_segments_group_steps_by_checkpoint(tmp_path):
    writer = TrajectoryWriter(tmp_path, META)
    for t in [0, 1, 2, 4, 5, 6, 9]:  # 3, 7 and 8 were skipped
        if t in (0, 5):
            writer.write_checkpoint(t, *_state(t))
        writer.write_step(_entry(t))
    writer.write_checkpoint(10, *_state(10))  # a checkpoint without steps after it is harmless
    writer.close()
    traj = load_trajectory(tmp_path)
    segments = [(start, [e.step for e in entries]) for start, entries in traj.segments()]
    assert segments == [(0, [0, 1, 2, 4]), (5, [5, 6, 9])]
    traj.check_contiguous()
    with pytest.raises(ValueError, match="segment of checkpoint 0"):
        traj.check_contiguous(allow_gaps=False)
    (tmp_path / "checkpoints" / "step_0.pt").unlink()
    traj = load_trajectory(tmp_path)
    with pytest.raises(ValueError, match="step 0 has no checkpoint at or before it"):
        traj.segments()
    with pytest.raises(ValueError, match="first step 0 has no checkpoint"):
        traj.check_contiguous()


_M1, _M2 = 0x7FEB352D, 0x846CA68B


def _mix(x: int) -> int:
    """The module docstring's mix32, in plain Python integers (an independent reference)."""
    x ^= x >> 16
    x = (x * _M1) % 2**32
    x ^= x >> 15
    x = (x * _M2) % 2**32
    return x ^ (x >> 16)


def _direct(vector: torch.Tensor, seed: int, size: int) -> torch.Tensor:
    """The documented definition with the whole ``[size, p]`` sign matrix."""
    rows = []
    for r in range(size):
        key = _mix(seed ^ _mix(r // 32))
        rows.append([1.0 if (_mix(i ^ key) >> (r % 32)) & 1 else -1.0 for i in range(vector.numel())])
    return torch.tensor(rows, dtype=torch.float64) @ vector.double()


def test_fingerprint_matches_its_definition_for_any_chunk_size():
    v = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    expected = _direct(v, seed=12345, size=40)
    for chunk in (1, 7, 64, 999, 1000, 4096, None):
        got = torch.tensor(fingerprint(v, 12345, size=40, chunk_size=chunk), dtype=torch.float64)
        torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-12)
    assert fingerprint(v, 12345) == fingerprint(v.double(), 12345) == fingerprint(v.reshape(10, 100), 12345)
    assert fingerprint(v, 12345) != fingerprint(v, 12346)


def test_a_stride_fingerprints_the_sampled_elements():
    from lightning_influence.trajectory.fingerprint import FINGERPRINT_ELEMENTS, fingerprint_stride

    v = torch.randn(1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = _direct(v[::3].clone(), seed=7, size=4)
    got = torch.tensor(fingerprint(v, 7, stride=3), dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-12)
    assert [fingerprint_stride(n) for n in (1, FINGERPRINT_ELEMENTS, FINGERPRINT_ELEMENTS + 1, 351_010)] == [1, 1, 2, 6]
    with pytest.raises(ValueError, match="stride"):
        fingerprint(v, 7, stride=0)


def test_a_long_vector_s_recording_samples_its_fingerprints_and_still_catches_another_batch(tmp_path):
    """p > 65,536: the recording's fingerprints read every k-th element (meta["fingerprint"]["stride"]); the replay
    reproduces them, and a training set changed since still stops it at the first step."""
    from torch import nn
    from torch.utils.data import TensorDataset

    from lightning_influence import IndexedDataset, InfluenceTracker, ReplayMismatchError
    from lightning_influence.testing import TinyClassifier, fixed_loader, lightning_trainer

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 300, generator=gen, dtype=torch.float64), torch.randint(0, 3, (8,), generator=gen)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(300, 250), nn.Tanh(), nn.Linear(250, 3)).double()  # 76,003 parameters
    module = TinyClassifier(net, lambda n: torch.optim.Adam(n.parameters(), lr=1e-3))
    tracker = InfluenceTracker(track=(), record_trajectory=True, dirpath=str(tmp_path))
    lightning_trainer(1, callbacks=[tracker]).fit(module, fixed_loader(x, y, [[[0, 1, 2, 3], [4, 5, 6, 7]]]))
    trajectory = load_trajectory(tmp_path)
    assert trajectory.meta["fingerprint"]["stride"] == 2
    query = (x[:2], y[:2])
    result = trajectory.influence(module, IndexedDataset(TensorDataset(x, y)), query, progress=False)
    assert result.sample_ids.numel() == 8 and bool(result.scores.abs().max() > 0)
    other = IndexedDataset(TensorDataset(x.flip(0), y))
    with pytest.raises(ReplayMismatchError, match="at optimizer step 0"):
        trajectory.influence(module, other, query, progress=False)


@pytest.fixture
def fresh_cache(monkeypatch):
    monkeypatch.setattr(fp, "_SIGN_CACHE", {})
    return fp


@pytest.mark.parametrize("size", [1, 2, 4, 7, 8])
def test_the_classes_follow_the_definition_cached_or_not(fresh_cache, monkeypatch, size):
    v = torch.randn(1500, generator=torch.Generator().manual_seed(size))
    expected = _direct(v, seed=777, size=size)
    for chunk in (None, 1, 64, 1000, 1500, 4096):
        got = fingerprint_tensor(v, 777, size, chunk)
        assert got.dtype == torch.float64 and got.shape == (size,)
        torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-12)
    assert fingerprint(v, 777, size) == fingerprint_tensor(v, 777, size).tolist()
    assert fresh_cache._SIGN_CACHE and next(iter(fresh_cache._SIGN_CACHE.values())).dtype == torch.uint8
    monkeypatch.setattr(fp, "_SIGN_CACHE_BYTES", 0)  # too long to cache: hashed chunk by chunk
    torch.testing.assert_close(fingerprint_tensor(v, 777, size, 100), expected, rtol=1e-13, atol=1e-12)


@pytest.mark.parametrize("dense", [True, False])
def test_the_signs_paths_follow_the_definition(fresh_cache, monkeypatch, dense):
    """The accelerators' paths (float64 signs, or int8 beyond 64 MiB), taken on the CPU here."""
    monkeypatch.setattr(fp, "_uses_classes", lambda size, device: False)
    if not dense:
        monkeypatch.setattr(fp, "_DENSE_SIGNS_BYTES", 0)
    v = torch.randn(1200, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    expected = _direct(v, seed=3, size=4)
    for chunk in (None, 7, 1200):
        torch.testing.assert_close(fingerprint_tensor(v, 3, 4, chunk), expected, rtol=1e-13, atol=1e-12)
    cached = next(iter(fresh_cache._SIGN_CACHE.values()))
    assert cached.dtype == (torch.float64 if dense else torch.int8) and cached.shape == (4, 1200)


def test_a_fingerprint_is_the_same_on_any_number_of_threads():
    v = torch.randn(300_000, generator=torch.Generator().manual_seed(9))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fingerprint(v, 20250101)
        torch.set_num_threads(max(2, threads))
        assert fingerprint(v, 20250101) == one  # sequential sums per class: bit for bit
    finally:
        torch.set_num_threads(threads)


def test_fingerprint_is_sensitive_to_tiny_changes():
    v = torch.randn(100_000, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    recorded = fingerprint(v, 3)
    assert fingerprints_match(recorded, fingerprint(v, 3), rtol=0.0)
    changed = fingerprint(v * (1 + 1e-6), 3)
    assert not fingerprints_match(recorded, changed, rtol=1e-7) and fingerprints_match(recorded, changed, rtol=1e-5)
    noise = torch.randn(v.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    moved = fingerprint(v + 1e-6 * noise * v.norm() / noise.norm(), 3)  # ‖Δv‖ = 1e-6 ‖v‖, direction random
    assert not fingerprints_match(recorded, moved, rtol=1e-7) and fingerprints_match(recorded, moved, rtol=1e-5)
    one = v.clone()
    one[77_777] *= 1 + 1e-6
    assert fingerprint(one, 3) != recorded
    assert not fingerprints_match([1.0, 2.0], [1.0], rtol=1.0) and fingerprints_match([], [], rtol=0.0)
    assert not fingerprints_match([float("nan"), 1.0], [float("nan"), 1.0], rtol=1.0)


def test_default_checkpoint_every():
    assert [default_checkpoint_every(t) for t in (1, 2, 4, 5, 100, 101, 10_000)] == [1, 2, 2, 3, 10, 11, 100]
    assert default_checkpoint_every(None) == default_checkpoint_every(0) == DEFAULT_CHECKPOINT_EVERY


def test_a_fresh_process_reads_the_trajectory(tmp_path):
    _record(tmp_path / "trajectory", range(6))
    v = torch.randn(5000, generator=torch.Generator().manual_seed(4))
    torch.save(v, tmp_path / "v.pt")
    script = (
        "import json, sys, torch\n"
        "from lightning_influence.trajectory.reader import fingerprint, load_trajectory\n"
        "t = load_trajectory(sys.argv[1])\n"
        "print(json.dumps({'steps': [e.step for e in t.steps], 'lr': t.steps[3].groups[0]['lr'],\n"
        "    'ids': t.steps[3].micro_batches[0][0], 'checkpoints': t.checkpoint_steps, 'final': t.final_step,\n"
        "    'theta4': t.checkpoint(4)['theta'].tolist(), 'batch5': t.batches(5)[0][1].tolist(),\n"
        "    'print': fingerprint(torch.load(sys.argv[1] + '/v.pt', weights_only=True), 99)}))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=300, check=False
    )
    assert run.returncode == 0, run.stderr
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen["steps"] == list(range(6)) and seen["checkpoints"] == [0, 4] and seen["final"] == 6
    assert seen["lr"] == _entry(3).groups[0]["lr"] and seen["ids"] == _entry(3).micro_batches[0][0]
    assert seen["theta4"] == _state(4)[0].tolist() and seen["batch5"] == [5, 6]
    assert seen["print"] == fingerprint(v, 99)  # bit for bit in another process
