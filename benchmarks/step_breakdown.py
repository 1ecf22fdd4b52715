"""Where the tracker's time goes inside a real training step, per hook and per piece (issue 11).

``benchmarks/overhead.py`` measures the whole step with and without the tracker, and times the pieces of a
step alone. Alone, a piece runs with warm CPU caches; inside a step the model's forward and backward have
just evicted the tracker's code and data, so a small piece can cost several times more there (e.g. a
32-id check: ~6 µs alone, 30–90 µs inside a step). This script times the pieces where they really run: it
trains with the tracker and wraps, for the duration of the run, the tracker's three per-step hooks and the
functions they call, accumulating each one's wall time (``time.perf_counter``) over the steps after
``--warmup``. The wrappers themselves cost about 1 µs per call.

Rows of the table (µs per step, mean over the timed steps):

- ``hooks``: the three hooks together (``on_train_batch_start``, ``on_before_optimizer_step``,
  ``on_train_batch_end``), i.e. everything the tracker adds to the step;
- ``floor in step``: the step's gradient graph and its HVP (``FunctionalLoss.linearize`` + the ``StepHvp`` calls),
  the work that overhead.py's floor times alone;
- ``source``: the tracked samples' own gradients and HVPs; ``optimizer map``: the states' AdamW/SGD update;
- ``read θ, grad, optimizer``: flat copies of θ (twice: before and after the step), of the gradient and of
  Adam's moments, and the param groups' hyper-parameters;
- ``ids``: the batch's id checks and its tracked rows; ``finite check``: the NaN/inf check of the states;
- ``progress bar``: ``LightningModule.log`` of ``tracker_ms`` (one call per 50 booked steps; the cost of one call
  is printed under the table);
- ``rest``: ``hooks`` minus the rows above (bookkeeping, the Ctrl+C guard, Python glue).

``beyond the floor`` = ``hooks`` − ``floor in step``: what the tracker costs beyond the method's own HVP.

Under the table: one ``LightningModule.log`` call, and the aten operators dispatched per step, counted with
``torch.profiler`` over 20 steps of a separate, untimed run, bare and tracked, and for one call of the floor as
the tracker applies it (an operator called by another one is not counted again). At small k the tracker's cost
is mostly this dispatch count; on a GPU each dispatch is at least one kernel launch.

Run:  python benchmarks/step_breakdown.py                 (logreg, MLP, CNN at k = 1; about 15 s)
      python benchmarks/step_breakdown.py --k 256 --steps 200
      python benchmarks/step_breakdown.py --k 2048 --steps 200 --models logreg
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import logging
import platform
import time
import warnings

import lightning.pytorch as pl
import torch
from overhead import digits, fit, make_net, make_optimizer, synthetic  # benchmarks/ is the script's directory

from lightning_influence import InfluenceTracker, sample_ids
from lightning_influence.autodiff.functional import FunctionalLoss
from lightning_influence.autodiff.hvp_plan import StepHvp
from lightning_influence.autodiff.parameters import TrackedParameters
from lightning_influence.core import fit as fit_module
from lightning_influence.estimators.engine import InfluenceEngine
from lightning_influence.optimizers import adam, sgd

# (owner, attribute, row); a function reached through a module is patched where the caller looks it up
PIECES = [
    (InfluenceTracker, "on_train_batch_start", "hooks"),
    (InfluenceTracker, "on_before_optimizer_step", "hooks"),
    (InfluenceTracker, "on_train_batch_end", "hooks"),
    (FunctionalLoss, "linearize", "floor in step"),
    (StepHvp, "__call__", "floor in step"),
    (FunctionalLoss, "sample_gradients_and_hvps", "source"),
    (FunctionalLoss, "sample_gradients", "source"),
    (adam.AdamJacobian, "advance", "optimizer map"),
    (sgd.SGDJacobian, "advance", "optimizer map"),
    (TrackedParameters, "theta", "read θ, grad, optimizer"),
    (TrackedParameters, "grad", "read θ, grad, optimizer"),
    (fit_module, "flat_optimizer_state", "read θ, grad, optimizer"),
    (fit_module, "read_step_groups", "read θ, grad, optimizer"),
    (fit_module, "validate_sample_ids", "ids"),
    (sample_ids.RowIndex, "rows", "ids"),
    (InfluenceEngine, "check_finite", "finite check"),
    (pl.LightningModule, "log", "progress bar"),
]
ROWS = list(dict.fromkeys(row for _, _, row in PIECES))


class Clock:
    """Accumulates wrapped functions' seconds per row while ``on`` (outer calls only: no row counts twice)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.calls: dict[str, int] = collections.defaultdict(int)
        self.on = False
        self._depth: dict[str, int] = collections.defaultdict(int)

    def wrap(self, fn, row: str):
        def timed(*args, **kwargs):
            if not self.on or self._depth[row]:
                return fn(*args, **kwargs)
            self._depth[row] += 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[row] += time.perf_counter() - start
                self.calls[row] += 1
                self._depth[row] -= 1

        return timed


@contextlib.contextmanager
def patched(clock: Clock):
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in PIECES]
    for (owner, name, row), (_, _, fn) in zip(PIECES, saved):
        setattr(owner, name, clock.wrap(fn, row))
    try:
        yield
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


class StartTiming(pl.Callback):
    """Turns the clock on at the first timed step (placed before the tracker, so its hooks are timed whole)."""

    def __init__(self, clock: Clock, warmup: int) -> None:
        self.clock, self.warmup = clock, warmup

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.clock.on = trainer.global_step >= self.warmup


class OpCounter(pl.Callback):
    """Profiles the steps ``[start, stop)`` (``torch.profiler``) and counts the aten operators called from outside
    another aten operator: the operator dispatches per step, each one or more kernel launches on a GPU."""

    def __init__(self, start: int, stop: int) -> None:
        self.start, self.stop, self.dispatches = start, stop, 0
        self._profile: torch.profiler.profile | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.start:
            self._profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self._profile.__enter__()
        elif trainer.global_step == self.stop and self._profile is not None:
            self._profile.__exit__(None, None, None)
            self.dispatches = top_level_aten(self._profile)


def top_level_aten(profile: torch.profiler.profile) -> int:
    """Aten operators called from outside another aten operator (one dispatch each)."""
    return sum(
        e.name.startswith("aten::") and not (e.cpu_parent and e.cpu_parent.name.startswith("aten::"))
        for e in profile.events()
    )


def problem(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """overhead.py's data for ``kind``: synthetic data for logistic regression, the digits for the MLP and CNN."""
    return synthetic(4096, 64, 10) if kind == "logreg" else digits()


def dispatches_per_step(kind: str, k: int, opt_name: str, warmup: int) -> tuple[float, float, int]:
    """Aten operators dispatched per training step, bare and with the tracker (20 profiled steps each), and by
    the floor alone: the step's gradient graph and its HVP, as the tracker applies it, on one batch."""
    x, y = problem(kind)
    counts = []
    for tracker in (None, InfluenceTracker(track=tracked(x, k), write_artifacts=False)):
        torch.manual_seed(0)
        counter = OpCounter(warmup, warmup + 20)
        fit(make_net(kind, x.shape[1], int(y.max()) + 1), make_optimizer(opt_name), x, y, warmup + 21, tracker, 0,
            extra_callbacks=[counter])  # fmt: skip
        counts.append(counter.dispatches / 20)
    engine, ids = tracker.engine, torch.arange(32)
    loss, choice = engine.loss, engine.hvp_choice
    named = dict(loss.module.named_parameters())
    theta = loss.layout.flatten([named[n].detach() for n in loss.layout.names])

    def floor() -> None:
        hvp = loss.linearize(theta, [(x[ids], y[ids], ids)], method=choice.method)[1]
        for start in range(0, k, choice.rows):
            hvp(engine.theta[start : start + choice.rows])

    with torch.enable_grad():
        floor()  # the first call may take other paths (caches)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            floor()
    return counts[0], counts[1], top_level_aten(profile)


def tracked(x: torch.Tensor, k: int) -> torch.Tensor:
    return torch.randperm(len(x), generator=torch.Generator().manual_seed(1))[:k].sort().values


def one_case(kind: str, k: int, opt_name: str, steps: int, warmup: int) -> dict[str, float]:
    x, y = problem(kind)
    torch.manual_seed(0)
    net = make_net(kind, x.shape[1], int(y.max()) + 1)
    track = tracked(x, k)
    clock = Clock()
    tracker = InfluenceTracker(track=track, write_artifacts=False)  # nothing to write: no query, no window
    with patched(clock):
        fit(net, make_optimizer(opt_name), x, y, steps, tracker, 0, extra_callbacks=[StartTiming(clock, warmup)])
    per_step = {row: clock.seconds[row] / (steps - warmup) * 1e6 for row in ROWS}
    named = sum(v for row, v in per_step.items() if row not in ("hooks", "floor in step"))
    beyond = per_step["hooks"] - per_step["floor in step"]
    choice = tracker.engine.hvp_choice
    log_call = clock.seconds["progress bar"] / max(clock.calls["progress bar"], 1) * 1e6
    bare_ops, tracked_ops, floor_ops = dispatches_per_step(kind, k, opt_name, warmup)
    return {
        "ops": f"{bare_ops:.0f} / {tracked_ops - bare_ops:.0f} / {floor_ops}",
        **per_step,
        "beyond the floor": beyond,
        "rest": beyond - named,
        "hvp": f"{choice.method} ×{choice.rows}",
        "log call": log_call,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--k", type=int, default=1, help="tracked samples")
    ap.add_argument("--steps", type=int, default=400, help="training steps per run")
    ap.add_argument("--warmup", type=int, default=20, help="steps not timed (the first ones are self-checked)")
    ap.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd"))
    ap.add_argument("--models", nargs="+", default=["logreg", "mlp", "cnn"], choices=("logreg", "mlp", "cnn"))
    args = ap.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    kinds = args.models
    results = {kind: one_case(kind, args.k, args.optimizer, args.steps, args.warmup) for kind in kinds}
    machine = platform.processor() or platform.machine()
    print(f"# {machine}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"# k = {args.k}, {args.optimizer}, {args.steps} steps ({args.warmup} not timed), µs per step\n")
    print("| piece | " + " | ".join(f"{kind} ({results[kind]['hvp']})" for kind in kinds) + " |")
    print("|---|" + "---:|" * len(kinds))
    for row in [*ROWS[:2], "beyond the floor", *ROWS[2:], "rest"]:
        print(f"| {row} | " + " | ".join(f"{results[kind][row]:.0f}" for kind in kinds) + " |")
    calls = ", ".join(f"{kind} {results[kind]['log call']:.0f}" for kind in kinds)
    print(f"\n# one LightningModule.log call of tracker_ms (µs): {calls}")
    ops = ", ".join(f"{kind} {results[kind]['ops']}" for kind in kinds)
    print(f"# aten operators dispatched per step, bare training step / added by the tracker / the floor: {ops}")


if __name__ == "__main__":
    main()
