"""What recording the trajectory adds to training (issue 22: recording at ≤ 5 % of training on steps of ≥ 20 ms).

The setup: a 0.35M-parameter CNN on synthetic 3×32×32 images (10 classes, made in code: no download), AdamW,
batch 100, float32, ``torch.set_num_threads(2)``, a quiet Lightning ``Trainer`` (``logger=False``,
``enable_checkpointing=False``, no progress bar, no model summary). Two fits of the same ``--steps`` steps from the
same seed alternate ``--pairs`` times:

- *plain*: no tracker;
- *recording*: ``InfluenceTracker(track=(), record_trajectory=True, queries={"val": ...})`` into a fresh temporary
  folder (checkpoints every ⌈√T⌉ steps, steps.jsonl with fingerprints, the background writer thread).

Each fit is timed whole (``trainer.fit`` wall time, so the tracker's start, its writer thread, the final state
and the end-of-fit window are counted) and per step (a callback stamps every ``on_train_batch_start``); the table
gives ms/step of the whole fit (wall / steps), min and median over the pairs, and the overhead of recording in
% of plain training (min against min, median against median).

The breakdown (``--breakdown``, on by default) times the pieces of the recording path in isolation, on this
model's real θ, gradient and AdamW state: flattening θ and the gradient, the fingerprints, the flat optimizer
state copies of a checkpoint, the checkpoint's ``torch.save`` + fsync, one ``steps.jsonl`` line, the query at
the end-of-fit window; and profiles one recording fit with cProfile (the tracker's own functions by cumulative
time, the writer thread's share).

Process CPU time (user + system, every thread) per step is printed next to the wall time: on a machine shared with
other jobs it is the steadier measure of the work recording adds. There, run with ``OMP_WAIT_POLICY=PASSIVE``: with
libgomp's default (spin after each parallel region), two spinning intra-op threads on two busy cores make the
*plain* fit several times slower than the recording one (whose pauses let them sleep), which says nothing about
recording.

Run:  python benchmarks/recording_cost.py           (200 steps, 4 pairs, about 1-2 min on 2 idle CPU cores)
      python benchmarks/recording_cost.py --quick   (60 steps, 3 pairs, about 20 s)
      OMP_WAIT_POLICY=PASSIVE python benchmarks/recording_cost.py   (on a loaded machine)
"""

from __future__ import annotations

import argparse
import cProfile
import io
import logging
import os
import platform
import pstats
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import IndexedDataset, InfluenceTracker

BATCH = 100
CLASSES = 10


# ----------------------------------------------------------------------------- data and model
def synthetic_images(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images ``[3, 32, 32]`` whose class is a fixed random linear read-out of a smoothed noise image."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.avg_pool2d(torch.randn(n, 3, 64, 64, generator=gen), 2)
    w = torch.randn(3 * 32 * 32, CLASSES, generator=gen)
    y = (x.reshape(n, -1) @ w).argmax(1)
    return x, y


def make_cnn() -> nn.Module:
    """Two convolutions and two linear layers: 351 010 parameters, 328 K of them in the first linear layer."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, 168),
        nn.ReLU(),
        nn.Linear(168, CLASSES),
    )


class ImageClassifier(pl.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def per_sample_loss(self, batch) -> torch.Tensor:
        return nn.functional.cross_entropy(self.net(batch[0]), batch[1], reduction="none")

    def training_step(self, batch, batch_idx):
        return self.per_sample_loss(batch).mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=1e-2)


class StepTimer(pl.Callback):
    """Wall time between consecutive ``on_train_batch_start`` hooks (one whole training step)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.stamps.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module) -> None:
        self.stamps.append(time.perf_counter())

    def median_ms(self, warmup: int) -> float:
        s = self.stamps
        return 1e3 * statistics.median([b - a for a, b in zip(s[:-1], s[1:])][warmup:])


def trainer(steps: int, callbacks: list) -> pl.Trainer:
    return pl.Trainer(
        max_steps=steps,
        max_epochs=-1,
        accelerator="cpu",
        devices=1,
        precision="32-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )


def one_fit(data, steps: int, record: bool, seed: int = 0, profile: cProfile.Profile | None = None):
    """One fit from ``seed``; ``(wall seconds, median step ms, model, tracker)``."""
    x, y, val = data
    torch.manual_seed(seed)
    model = ImageClassifier(make_cnn())
    loader = DataLoader(
        IndexedDataset(TensorDataset(x, y)),
        batch_size=BATCH,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )
    timer, tracker = StepTimer(), None
    callbacks: list = [timer]
    with tempfile.TemporaryDirectory() as tmp:
        if record:
            tracker = InfluenceTracker(track=(), record_trajectory=True, queries={"val": val}, dirpath=tmp)
            callbacks.insert(0, tracker)
        t = trainer(steps, callbacks)
        if profile is not None:
            profile.enable()
        start = time.perf_counter()
        t.fit(model, loader)
        wall = time.perf_counter() - start
        if profile is not None:
            profile.disable()
        if tracker is not None:  # the trajectory's size, before the folder goes
            folder = Path(tracker.trajectory_path)
            size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
            tracker.trajectory_bytes = size  # type: ignore[attr-defined]
    return wall, timer.median_ms(warmup=5), model, tracker


# ----------------------------------------------------------------------------- breakdown in isolation
def best_ms(fn, reps: int = 30, blocks: int = 3) -> float:
    """ms per call: the smallest of ``blocks`` medians of ``reps // blocks`` calls."""
    fn()
    best = float("inf")
    for _ in range(blocks):
        times = []
        for _ in range(max(1, reps // blocks)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        best = min(best, statistics.median(times))
    return 1e3 * best


def breakdown(data, steps: int) -> list[tuple[str, float, str]]:
    """``(piece, ms, how often)`` of the recording path on this model's real tensors."""
    from lightning_influence.autodiff.parameters import select_parameters
    from lightning_influence.optimizers import flat_optimizer_state
    from lightning_influence.trajectory.fingerprint import default_checkpoint_every, fingerprint
    from lightning_influence.trajectory.format import StepEntry, atomic_torch_save, encode_step
    from lightning_influence.trajectory.recorder import FINGERPRINT_SEED, FINGERPRINT_SIZE

    x, y, _ = data
    model = ImageClassifier(make_cnn())
    opt = model.configure_optimizers()
    model.training_step((x[:BATCH], y[:BATCH]), 0).backward()
    opt.step()
    opt.zero_grad()
    model.training_step((x[:BATCH], y[:BATCH]), 0).backward()
    params = select_parameters(model, opt, None)
    theta, grad = params.theta(), params.grad(1)
    assert grad is not None
    every = default_checkpoint_every(steps)
    rows: list[tuple[str, float, str]] = []
    rows.append(("flatten θ (TrackedParameters.theta)", best_ms(params.theta), "per step"))
    rows.append(("flatten the gradient (TrackedParameters.grad)", best_ms(lambda: params.grad(1)), "per step"))
    fingerprint(theta, FINGERPRINT_SEED, FINGERPRINT_SIZE)  # the signs, hashed once per run
    ms = best_ms(lambda: fingerprint(theta, FINGERPRINT_SEED, FINGERPRINT_SIZE))
    rows.append(("fingerprint of θ_t or of the gradient (each)", ms, "2 per step"))
    ms = best_ms(lambda: flat_optimizer_state(opt, params.flat), reps=12)
    rows.append(("flat AdamW state copy (checkpoint)", ms, f"every {every} steps"))
    state = flat_optimizer_state(opt, params.flat)
    document = {"theta": theta.clone(), "optimizer_state": {k: v.clone() for k, v in state.items() if v is not None}}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "step_0.pt"
        ms = best_ms(lambda: atomic_torch_save(path, document), reps=12)
        rows.append(("checkpoint torch.save + fsync (writer thread)", ms, f"every {every} steps"))
        entry = StepEntry(
            0, 0, [{"lr": 1e-3, "weight_decay": 1e-2}], [(list(range(BATCH)), 1.0)], None,
            {"theta": [0.1] * 4, "grad": [0.2] * 4},
        )  # fmt: skip
        import json

        with open(Path(tmp) / "steps.jsonl", "a", encoding="utf-8") as f:

            def line() -> None:
                f.write(json.dumps(encode_step(entry), separators=(",", ":")) + "\n")
                f.flush()

            rows.append(("steps.jsonl line: encode + write + flush (writer thread)", best_ms(line), "per step"))

            def synced() -> None:
                line()
                os.fsync(f.fileno())

            rows.append(("steps.jsonl line + fsync", best_ms(synced, reps=12), "(if per step)"))
    return rows


class PieceTimers:
    """Wall time (and, on the writer thread, CPU time) spent in the tracker's functions during one fit, by piece.

    Each piece wraps a method of a class; nested pieces count in both (the table says "of which")."""

    def __init__(self) -> None:
        from lightning_influence.callbacks.tracker import InfluenceTracker as Tracker
        from lightning_influence.core.booking import EstimatorBooking, FiniteStatesCheck, SelfCheckBooking
        from lightning_influence.core.fit import TrackedFit
        from lightning_influence.trajectory import recorder as recorder_module
        from lightning_influence.trajectory.recorder import TrajectoryRecorder
        from lightning_influence.trajectory.writer import TrajectoryWriter

        hooks = [h for h in vars(Tracker) if h.startswith("on_") or h in ("setup", "teardown", "state_dict")]
        self.pieces: list[tuple[str, object, str]] = [
            *((f"tracker hook {h}", Tracker, h) for h in hooks),
            ("  TrackedFit.add_micro_batch (sample ids)", TrackedFit, "add_micro_batch"),
            ("  TrackedFit.read_step (θ_t, gradient, groups, StepRecord)", TrackedFit, "read_step"),
            ("  TrackedFit.complete_step (θ_t+1, watch, booking)", TrackedFit, "complete_step"),
            ("    TrackedFit._record (post-step optimizer state)", TrackedFit, "_record"),
            ("    EstimatorBooking.book (track=(): nothing)", EstimatorBooking, "book"),
            ("    SelfCheckBooking.book (first steps)", SelfCheckBooking, "book"),
            ("    FiniteStatesCheck.book", FiniteStatesCheck, "book"),
            ("    TrajectoryRecorder.book", TrajectoryRecorder, "book"),
            ("  TrackedFit.close_windows (query at the window)", TrackedFit, "close_windows"),
            ("  TrackedFit.finish (end of fit)", TrackedFit, "finish"),
            *(
                (f"writer thread: TrajectoryRecorder.{name} (the step line)", TrajectoryRecorder, name)
                for name in ("_write_step",)
                if hasattr(TrajectoryRecorder, name)
            ),
            *(
                ("fingerprints of θ_t and the gradient (either thread)", recorder_module, name)
                for name in ("fingerprint", "fingerprint_tensor")
                if hasattr(recorder_module, name)
            ),
            ("writer thread: TrajectoryWriter.write_step", TrajectoryWriter, "write_step"),
            ("writer thread: TrajectoryWriter.write_checkpoint", TrajectoryWriter, "write_checkpoint"),
            ("writer thread: TrajectoryWriter.write_final + close", TrajectoryWriter, "write_final"),
        ]
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._saved: list[tuple[object, str, object]] = []

    def __enter__(self) -> PieceTimers:
        for label, owner, name in self.pieces:
            original = getattr(owner, name)
            self._saved.append((owner, name, original))
            setattr(owner, name, self._timed(label, original))
        return self

    def __exit__(self, *_: object) -> None:
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)
        self._saved.clear()

    def _timed(self, label: str, fn):
        def timed(*args, **kwargs):
            w, c = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.wall[label] = self.wall.get(label, 0.0) + time.perf_counter() - w
                self.cpu[label] = self.cpu.get(label, 0.0) + time.thread_time() - c
                self.calls[label] = self.calls.get(label, 0) + 1

        return timed

    def table(self, steps: int, plain_ms: float) -> str:
        hooks = sum(v for k, v in self.wall.items() if k.startswith("tracker hook"))
        rows = [
            "| piece | calls | ms in the fit | ms/step | % of a plain step | thread CPU ms |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        rows.append(
            f"| all tracker hooks (training thread) | | {1e3 * hooks:.1f} | {1e3 * hooks / steps:.3f} |"
            f" {100 * 1e3 * hooks / steps / plain_ms:.2f} | |"
        )
        for label, _, _ in self.pieces:
            if label not in self.wall or (label.startswith("tracker hook") and self.wall[label] < 1e-3):
                continue
            ms = 1e3 * self.wall[label]
            rows.append(
                f"| {label.strip()} | {self.calls[label]} | {ms:.1f} | {ms / steps:.3f} |"
                f" {100 * ms / steps / plain_ms:.2f} | {1e3 * self.cpu[label]:.1f} |"
            )
        return "\n".join(rows)


def tracker_profile(data, steps: int, top: int) -> str:
    """cProfile of one recording fit (the training thread), the tracker's own functions by cumulative time."""
    prof = cProfile.Profile()
    wall, _, _, _ = one_fit(data, steps, True, profile=prof)
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out).sort_stats("cumulative")
    stats.print_stats(r"lightning_influence", top)
    text = out.getvalue()
    keep = [ln for ln in text.splitlines() if "lightning_influence" in ln or "ncalls" in ln]
    return f"cProfile of one recording fit ({steps} steps, {wall:.2f} s with the profiler on):\n" + "\n".join(keep)


# ----------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="60 steps, 3 pairs, no profile")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per fit (default 200; quick 60)")
    parser.add_argument("--pairs", type=int, default=None, help="alternating plain/recording pairs (default 4)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-breakdown", action="store_true")
    parser.add_argument("--profile-top", type=int, default=0, help="rows of a cProfile table of one fit (0: none)")
    args = parser.parse_args()
    steps = args.steps or (60 if args.quick else 200)
    pairs = args.pairs or (3 if args.quick else 4)
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning_influence").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    x, y = synthetic_images(max(2000, steps * BATCH // 2))
    xv, yv = synthetic_images(256, seed=1)
    data = (x, y, (xv, yv))
    p = sum(q.numel() for q in make_cnn().parameters())
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} threads,"
        f" {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f},"
        f" OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}"
    )
    print(f"CNN with {p} parameters, AdamW, batch {BATCH}, {steps} steps, {len(x)} samples\n")

    one_fit(data, 10, False)  # warm-up: imports, allocator, kernels
    one_fit(data, 10, True)
    plain: list[tuple[float, float, float]] = []
    rec: list[tuple[float, float, float]] = []
    size = 0
    for _ in range(pairs):
        for record, runs in ((False, plain), (True, rec)):
            cpu = time.process_time()
            wall, med, _, tracker = one_fit(data, steps, record)
            runs.append((1e3 * wall / steps, med, 1e3 * (time.process_time() - cpu) / steps))
            size = tracker.trajectory_bytes if tracker is not None else size  # type: ignore[attr-defined]

    def row(name: str, runs: list[tuple[float, float, float]]) -> str:
        whole, median_step, cpu = ([r[i] for r in runs] for i in range(3))
        return (
            f"| {name} | {min(whole):.2f} | {statistics.median(whole):.2f} | {min(median_step):.2f} |"
            f" {min(cpu):.2f} | {' '.join(f'{w:.1f}' for w in whole)} |"
        )

    print(
        "| fit | ms/step, whole fit (min) | (median) | median step ms (min) | process CPU ms/step (min) |"
        " each run, ms/step |"
    )
    print("|---|---:|---:|---:|---:|---|")
    print(row("plain", plain))
    print(row("recording", rec))

    def pct(i: int, f) -> float:
        return 100 * (f(r[i] for r in rec) / f(r[i] for r in plain) - 1)

    print(
        f"\nrecording overhead, whole fit: {pct(0, min):+.1f} % (min/min), {pct(0, statistics.median):+.1f} %"
        f" (median/median); median step: {pct(1, min):+.1f} %; process CPU: {pct(2, min):+.1f} % (min/min)"
    )
    print(f"trajectory on disk: {size / 2**20:.1f} MiB")

    if not args.no_breakdown:
        plain_ms = min(r[0] for r in plain)
        with PieceTimers() as timers:
            wall, _, _, _ = one_fit(data, steps, True)
        print(
            f"\nWhere a recording fit's time goes ({steps} steps, {1e3 * wall / steps:.2f} ms/step this run; "
            f"% of the plain fit's {plain_ms:.2f} ms/step):\n"
        )
        print(timers.table(steps, plain_ms))
        print("\n| piece (in isolation, this model's tensors) | ms | how often |")
        print("|---|---:|---|")
        for name, ms, often in breakdown(data, steps):
            print(f"| {name} | {ms:.3f} | {often} |")
    if args.profile_top:
        print()
        print(tracker_profile(data, steps, args.profile_top))


if __name__ == "__main__":
    main()
