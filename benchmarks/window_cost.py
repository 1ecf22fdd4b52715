"""What a closed time window costs with TensorBoard, piece by piece (issue 24: "a window at every step costs 7× the
step time").

The digits MLP (scikit-learn's bundled 8×8 images, given to the model as ``[1, 8, 8]`` images so the default sample
previews apply; ``Flatten → 32 tanh → 10``, AdamW, batch 32, float32) is trained three times with the same seed and
batches, every run with a ``TensorBoardLogger``:

- ``bare``: no tracker;
- ``tracker, no windows``: an ``InfluenceTracker`` with 240 tracked samples and one query (64 held-out digits), no
  window schedule (so no window closes during training);
- ``tracker, a window every step``: the same with ``window_every_n_steps=1`` and ``windows.jsonl`` written.

A timing callback stamps ``time.perf_counter()`` at every ``on_train_batch_start`` (overhead.py's ``StepTimer``); a
step's time is the difference between consecutive stamps, so everything the tracker and its sinks do at the end of a
step counts. The first ``--warmup`` steps (self-checked by the tracker) are not timed; the mean over the timed steps
is used (not the median: a figure drawn every 10th window is part of the cost). Each case is run ``--repeats`` times
with the same seed, so step i does the same work in every run; step i's smallest time over the runs is kept (other
load on a shared machine only adds time), and likewise each timed piece's smallest total.

The per-window cost is ``a window every step`` − ``no windows``. Its pieces are timed inside the run, with
``step_breakdown.py``'s wrapping pattern: the window sinks' entry points and the functions they call are wrapped for
the duration of the run, and each wrapper accumulates its wall time while a sink is running (outer calls only):

- ``scalars``: ``window_summary`` and the loggers' ``log_metrics`` of the four scalars;
- ``histogram``: ``SummaryWriter.add_histogram``;
- ``top-samples tables``: ``top_samples_table`` (the markdown text) and ``SummaryWriter.add_text``;
- ``custom scalars layout``: ``SummaryWriter.add_custom_scalars``;
- ``sample previews``: ``preview_images`` and ``SummaryWriter.add_images``;
- ``figure``: ``window_figure_image`` (matplotlib) and ``SummaryWriter.add_image``;
- ``windows.jsonl``: ``SnapshotWriter.window`` (JSON, write, flush, fsync);
- ``window history``: the recorder's ``window_matrix`` and ``windows`` (the window matrix so far) asked by the sinks;
- ``sinks, rest``: the sinks' time not in a row above;
- ``closing the window less its sinks``: ``TrackedFit.close_windows`` less the sinks: the query gradient at θ_t, the
  estimator's totals and the snapshot;
- ``elsewhere in the step``: the per-window cost less ``close_windows`` (e.g. TensorBoard's event-writer thread
  serialising and writing the events, which competes for the CPU; garbage collection).

Under the table: the end of fit (``LoggerSink.final``: the whole run's previews and the last figure), once per run.

Run:  python benchmarks/window_cost.py               (about 25 s on 2 CPU cores)
      python benchmarks/window_cost.py --steps 105 --repeats 2
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import logging
import platform
import statistics
import tempfile
import time
import warnings

import torch
from lightning.pytorch.loggers import TensorBoardLogger
from overhead import BATCH, StepTimer, digits, make_optimizer  # benchmarks/ is the script's directory
from step_breakdown import Clock
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.tensorboard import SummaryWriter

from lightning_influence import IndexedDataset, InfluenceTracker
from lightning_influence.core import fit as fit_module
from lightning_influence.io.artifacts import SnapshotWriter
from lightning_influence.reporting import window_sink, windows
from lightning_influence.results.windows import WindowRecorder
from lightning_influence.testing import TinyClassifier, lightning_trainer

K = 240  # tracked samples

# Entry points: a piece counts only while one of these runs (Lightning also calls log_metrics, for the loss).
SINKS = [(window_sink.LoggerSink, "window"), (SnapshotWriter, "window"), (window_sink.LoggerSink, "final")]
CLOSE = (fit_module.TrackedFit, "close_windows")  # timed whole, around the sinks
ENTRIES = [*(f"{owner.__name__}.{name}" for owner, name in SINKS), "close_windows"]

# (owner, attribute, row); a function reached through a module is patched where its caller looks it up. An owner or
# attribute that a version of the package lacks is skipped.
PIECES = [
    (windows, "window_summary", "scalars"),
    (TensorBoardLogger, "log_metrics", "scalars"),
    (SummaryWriter, "add_histogram", "histogram"),
    (windows, "top_samples_table", "top-samples tables"),
    (window_sink, "top_samples_table", "top-samples tables"),
    (SummaryWriter, "add_text", "top-samples tables"),
    (SummaryWriter, "add_custom_scalars", "custom scalars layout"),
    (window_sink, "preview_images", "sample previews"),
    (SummaryWriter, "add_images", "sample previews"),
    (windows, "window_figure_image", "figure"),
    (window_sink, "window_figure_image", "figure"),
    (SummaryWriter, "add_image", "figure"),
    (SnapshotWriter, "window", "windows.jsonl"),
    (WindowRecorder, "window_matrix", "window history"),
    (WindowRecorder, "windows", "window history"),
]
ROWS = list(dict.fromkeys(row for _, _, row in PIECES))


class SinkClock(Clock):
    """A :class:`step_breakdown.Clock` that counts only while a window sink runs, its time split by entry point."""

    def __init__(self) -> None:
        super().__init__()
        self.sink_seconds: dict[str, float] = collections.defaultdict(float)
        self.sink_calls: dict[str, int] = collections.defaultdict(int)
        self._inside = 0

    def entry(self, fn, name: str, pieces: bool = True):
        def timed(*args, **kwargs):
            if self._inside:
                return fn(*args, **kwargs)
            self._inside += 1
            self.on = pieces
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sink_seconds[name] += time.perf_counter() - start
                self.sink_calls[name] += 1
                self._inside -= 1
                self.on = False

        return timed


@contextlib.contextmanager
def patched(clock: SinkClock):
    saved = []
    for owner, name, row in PIECES:
        if hasattr(owner, name):
            fn = getattr(owner, name)
            saved.append((owner, name, fn))
            setattr(owner, name, clock.wrap(fn, row))
    for owner, name in SINKS:
        fn = getattr(owner, name)
        saved.append((owner, name, fn))
        setattr(owner, name, clock.entry(fn, f"{owner.__name__}.{name}", pieces=name == "window"))
    owner, name = CLOSE
    fn = getattr(owner, name)
    saved.append((owner, name, fn))

    def close(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            clock.sink_seconds["close_windows"] += time.perf_counter() - start

    setattr(owner, name, close)
    try:
        yield
    finally:
        for owner, name, fn in reversed(saved):
            setattr(owner, name, fn)


def images() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = digits()
    return x.reshape(-1, 1, 8, 8), y


def run(case: str, steps: int, warmup: int, seed: int = 0):
    """One fit of ``case``; its timed step times (s), its clock and its tracker."""
    x, y = images()
    train_x, train_y, query = x[:1600], y[:1600], (x[1600:1664], y[1600:1664])
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    tracker = None
    if case != "bare":
        tracked = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(1))[:K].sort().values
        every = 1 if case == "windows" else None
        tracker = InfluenceTracker(track=tracked, queries={"q": query}, window_every_n_steps=every)
    timer, clock = StepTimer(), SinkClock()
    folder = tempfile.mkdtemp(prefix="window_cost_")
    loader = DataLoader(
        IndexedDataset(TensorDataset(train_x, train_y)), batch_size=BATCH, shuffle=True, drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip
    trainer = lightning_trainer(
        10**6, precision="32-true", max_steps=steps, logger=TensorBoardLogger(folder, name="tb"),
        callbacks=[*([tracker] if tracker else []), timer], default_root_dir=folder,
    )  # fmt: skip
    model = TinyClassifier(copy.deepcopy(net), make_optimizer("adamw"))
    with patched(clock):
        trainer.fit(model, loader)
    times = timer.step_times(warmup)[:-1]  # the last interval ends after the end of fit (LoggerSink.final)
    return times, clock, tracker


def best(case: str, steps: int, warmup: int, repeats: int) -> tuple[list[float], dict[str, float], int]:
    """``case`` run ``repeats`` times: each timed step's smallest time over the runs (the runs do the same work step by
    step, and other load on a shared machine only adds time); each row's and entry point's smallest total; the
    number of windows closed per run."""
    runs = [run(case, steps, warmup) for _ in range(repeats)]
    times = [min(step) for step in zip(*(r[0] for r in runs))]
    clocks = [r[1] for r in runs]
    rows = {key: min(c.seconds[key] for c in clocks) for key in ROWS}
    rows.update({key: min(c.sink_seconds[key] for c in clocks) for key in ENTRIES})
    return times, rows, clocks[0].sink_calls["LoggerSink.window"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=45, help="training steps per run (one window each)")
    ap.add_argument("--warmup", type=int, default=5, help="first steps not timed")
    ap.add_argument("--repeats", type=int, default=5, help="runs of each case; each step's smallest time is kept")
    args = ap.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    bare = best("bare", args.steps, args.warmup, args.repeats)
    quiet = best("no windows", args.steps, args.warmup, args.repeats)
    windowed = best("windows", args.steps, args.warmup, args.repeats)
    t_bare, t_quiet, t_win = (statistics.fmean(r[0]) * 1e3 for r in (bare, quiet, windowed))
    timed = len(windowed[0])
    seconds, windows_closed = windowed[1], windowed[2]  # every window of a run, the untimed ones included
    per_window = t_win - t_quiet

    def ms(row_seconds: float) -> float:
        return row_seconds / max(windows_closed, 1) * 1e3

    final = seconds["LoggerSink.final"] * 1e3
    sink_total = ms(seconds["LoggerSink.window"] + seconds["SnapshotWriter.window"])
    pieces = {row: ms(seconds[row]) for row in ROWS}
    machine = platform.processor() or platform.machine()
    print(f"# {machine}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(
        f"# digits MLP, k = {K} tracked, one query of 64, AdamW, batch {BATCH}, TensorBoardLogger; {args.steps} steps "
        f"({args.warmup} not timed), a window at every step; mean ms per step, each step's best of "
        f"{args.repeats} runs\n"
    )
    print("| | ms |")
    print("|---|---:|")
    print(f"| bare step | {t_bare:.2f} |")
    print(f"| tracker step, no windows | {t_quiet:.2f} |")
    print(f"| tracker step, a window every step | {t_win:.2f} |")
    print(f"| **per window** (difference) | **{per_window:.2f}** ({per_window / t_bare:.1f}× the bare step) |")
    print("\nPer window, by piece (ms, mean over the run's windows):\n")
    print("| piece | ms per window |")
    print("|---|---:|")
    for row in ROWS:
        print(f"| {row} | {pieces[row]:.3f} |")
    print(f"| sinks, rest | {sink_total - sum(pieces.values()):.3f} |")
    print(f"| sinks in all | {sink_total:.3f} |")
    close = ms(seconds["close_windows"])
    print(f"| closing the window less its sinks (query gradient, totals, snapshot) | {close - sink_total:.3f} |")
    print(f"| elsewhere in the step (the difference less `close_windows`) | {per_window - close:.3f} |")
    print(f"\n# end of fit (LoggerSink.final, once): {final:.1f} ms; {windows_closed} windows, {timed} timed steps")


if __name__ == "__main__":
    main()
