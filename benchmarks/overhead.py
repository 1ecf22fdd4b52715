"""Per-step cost of ``InfluenceTracker`` against bare training and against the HVP floor.

For each model and number of tracked samples k, the script trains the same model twice with a
Lightning ``Trainer`` (float32, batch 32, same seed, same batches): once bare and once with an
``InfluenceTracker`` (default estimator ``"acc"``). A timing callback stamps ``time.perf_counter()``
at every ``on_train_batch_start``; the difference between consecutive stamps is the wall time of
one whole training step (data loading, forward, backward, optimizer, every callback hook), so
Lightning's own per-step overhead is the same in both runs and cancels in the difference. After
warm-up steps (which also skip the tracker's first self-checked steps) the median is taken; bare and
tracked runs alternate ``--repeats`` times and the smallest median of each is reported (this
discounts bursts of other load on a shared machine).

The *floor* is the cheapest way to do the core of the tracker's job: the step's gradient graph and its
Hessian-vector product with the k state rows at the same parameters and batch, i.e.
``FunctionalLoss.linearize(theta, batch, method=m)`` followed by ``hvp`` over ``V: [k, p]``, the cheapest of
the ways the tracker can choose from (``"vmap"``: a ``torch.func`` graph, the rows in vmapped calls of 8, 32, 128,
512 or all k rows; ``"loop"``: an autograd graph, row by row, timed up to k = 256).
``overhead / floor`` says how much the tracker spends beyond that (goal: ≤ 1.3 at larger k).
The remaining columns time pieces of one tracker step in isolation, at the trained parameters,
with the tracker's real states and one batch holding the expected number of tracked samples
(round(k·B/n)): the whole ``InfluenceEngine.step``
(``engine step`` = HVP + source + optimizer map), the per-sample gradients and single-sample HVPs
of the tracked samples in that batch (``source``), the optimizer map (``opt map``) and the NaN/inf
check over all state blocks (``finite``). They are indicative: in isolation the allocator reuses
memory more kindly than inside a real step.

Run:  python benchmarks/overhead.py            (full, about 1-2 minutes on 2 idle CPU cores)
      python benchmarks/overhead.py --quick    (fewer steps and cases, about 20 s)
"""

from __future__ import annotations

import argparse
import copy
import logging
import platform
import statistics
import tempfile
import time
import warnings

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import IndexedDataset, InfluenceTracker
from lightning_influence.estimators.engine import MicroBatch
from lightning_influence.optimizers import OptimizerStep, read_group_step
from lightning_influence.testing import TinyClassifier, lightning_trainer

BATCH = 32


# ----------------------------------------------------------------------------- data and models
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8x8 digits (1797 images, no download), scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.data / 16.0, dtype=torch.float32), torch.tensor(d.target, dtype=torch.long)


def synthetic(n: int, d: int, c: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    w = torch.randn(d, c, generator=gen)
    y = (x @ w + 0.5 * torch.randn(n, c, generator=gen)).argmax(1)
    return x, y


def make_net(kind: str, d: int, c: int) -> nn.Module:
    if kind == "logreg":
        return nn.Linear(d, c)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(d, 32), nn.Tanh(), nn.Linear(32, c))
    if kind == "cnn":  # 8x8 single-channel images given as 64 features
        return nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(8 * 4 * 4, c),
        )
    raise ValueError(kind)


def make_optimizer(name: str):
    if name == "adamw":
        return lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=1e-2)
    if name == "sgd":
        return lambda m: torch.optim.SGD(m.parameters(), lr=0.05)
    raise ValueError(name)


# ----------------------------------------------------------------------------- timing helpers
class StepTimer(pl.Callback):
    """Wall time between consecutive ``on_train_batch_start`` hooks = one whole training step."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.stamps.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module) -> None:
        self.stamps.append(time.perf_counter())

    def step_times(self, warmup: int) -> list[float]:
        s = self.stamps
        return [b - a for a, b in zip(s[:-1], s[1:])][warmup:]


def median_time(fn, reps: int, warmup: int = 2, blocks: int = 3) -> float:
    """Seconds per call: the smallest of ``blocks`` medians of ``reps // blocks`` timed calls
    (the minimum over blocks discounts bursts of other load on the machine)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(blocks):
        times = []
        for _ in range(max(1, reps // blocks)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        best = min(best, statistics.median(times))
    return best


def hvp_floor(loss, theta: torch.Tensor, batch, states: torch.Tensor, reps: int) -> float:
    """Seconds of the floor: the step's gradient graph and its HVP with all k rows of ``states: Tensor[k, p]``, the
    cheapest of the ways the tracker can choose from: vmap over chunks of 8, 32, 128, 512 or all k rows, and the
    loop (timed up to k = 256; beyond that it is far slower than vmap on these models)."""
    k = states.shape[0]

    def floor(method: str, rows: int):
        _, hvp, _ = loss.linearize(theta, [batch], method=method)
        for start in range(0, k, rows):
            hvp(states[start : start + rows])

    with torch.enable_grad():
        widths = sorted({min(k, w) for w in (8, 32, 128, 512, k)})
        candidates = [median_time(lambda w=w: floor("vmap", w), reps) for w in widths]
        if k <= 256:
            candidates.append(median_time(lambda: floor("loop", k), reps))
    return min(candidates)


def fit(net, opt_factory, x, y, steps: int, tracker: InfluenceTracker | None, seed: int, extra_callbacks=()):
    torch.manual_seed(seed)
    loader = DataLoader(
        IndexedDataset(TensorDataset(x, y)),
        batch_size=BATCH,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )
    timer = StepTimer()
    model = TinyClassifier(net, opt_factory)
    callbacks = [*extra_callbacks, *([] if tracker is None else [tracker]), timer]
    trainer = lightning_trainer(10**6, precision="32-true", max_steps=steps, callbacks=callbacks)
    trainer.fit(model, loader)
    return model, trainer, timer


def one_case(kind, x, y, k, opt_name, steps, warmup, reps, repeats, seed=0):
    d, c = x.shape[1], int(y.max()) + 1
    torch.manual_seed(seed)
    init = make_net(kind, d, c)
    opt_factory = make_optimizer(opt_name)
    track = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed + 1))[:k].sort().values

    # Bare and tracked runs alternate; the minimum over repeats of each run's median step time is
    # kept, which discounts other load on the machine.
    t_bare = t_track = float("inf")
    for _ in range(repeats):
        _, _, bare = fit(copy.deepcopy(init), opt_factory, x, y, steps, None, seed)
        tracker = InfluenceTracker(track=track)
        model, trainer, tracked = fit(copy.deepcopy(init), opt_factory, x, y, steps, tracker, seed)
        t_bare = min(t_bare, statistics.median(bare.step_times(warmup)))
        t_track = min(t_track, statistics.median(tracked.step_times(warmup)))

    # ---- the pieces of one tracker step, in isolation, at the trained parameters
    engine = tracker.engine
    loss = engine.loss
    layout = loss.layout
    named = dict(model.named_parameters())
    params = [named[n] for n in layout.names]
    theta = layout.flatten([p.detach() for p in params]).clone()
    # a batch holding the expected number of tracked samples, round(k·B/n)
    gen = torch.Generator().manual_seed(seed + 12345)
    m = min(BATCH, round(k * BATCH / len(x)))
    is_tracked = torch.zeros(len(x), dtype=torch.bool)
    is_tracked[track] = True
    tracked_ids, untracked_ids = is_tracked.nonzero().flatten(), (~is_tracked).nonzero().flatten()
    idx = torch.cat(
        [
            tracked_ids[torch.randperm(len(tracked_ids), generator=gen)[:m]],
            untracked_ids[torch.randperm(len(untracked_ids), generator=gen)[: BATCH - m]],
        ]
    )
    idx = idx[torch.randperm(BATCH, generator=gen)]
    batch = (x[idx], y[idx], idx)
    states = {b: s.clone() for b, s in engine.states.items()}
    V = states["theta"]

    t_floor = hvp_floor(loss, theta, batch, V, reps)
    with torch.enable_grad():
        # tracked samples of this batch (a typical count: k·B/n on average)
        row_of = torch.full((len(x),), -1, dtype=torch.long)
        row_of[track] = torch.arange(k)
        rows = row_of[idx]
        present = rows >= 0
        state_rows, batch_rows = rows[present], present.nonzero().flatten()
        if state_rows.numel():
            t_source = median_time(
                lambda: loss.sample_gradients_and_hvps(theta, batch, batch_rows, BATCH, V[state_rows]), reps
            )
        else:
            t_source = 0.0
        grad = torch.func.grad(loss.batch_loss)(theta, batch).detach()

    opt = trainer.optimizers[0]
    groups = []
    for group, region in zip(opt.param_groups, layout.group_slices):
        st = opt.state.get(group["params"][0], {})
        groups.append(read_group_step(group, region, int(st.get("step", 0)), st.get("momentum_buffer") is None))
    step = OptimizerStep(groups, theta, grad)
    if opt_name == "adamw":
        step = step.with_post_state(
            {key: layout.flatten([opt.state[p][key] for p in params]).clone() for key in ("exp_avg", "exp_avg_sq")}
        )
    jac = engine.jacobian
    delta_g = torch.randn_like(V) * 1e-4
    work = {b: s.clone() for b, s in states.items()}
    dg = delta_g.clone()

    def opt_map():
        # fresh copies each call would time the copy too; advancing in place repeatedly is fine for timing
        jac.advance(work, dg, step, exact=True)

    t_map = median_time(opt_map, reps)
    t_finite = median_time(lambda: engine.check_finite(0, tracker.tracked_ids), reps)

    # one whole engine step (HVP + source + optimizer map), advancing the tracker's own states
    with torch.enable_grad():
        t_engine = median_time(lambda: engine.step([MicroBatch(batch, BATCH, state_rows, batch_rows)], step), reps)
    p = layout.numel
    return dict(
        model=kind,
        opt=opt_name,
        k=k,
        p=p,
        m=int(state_rows.numel()),
        bare=t_bare * 1e3,
        tracked=t_track * 1e3,
        overhead=(t_track - t_bare) * 1e3,
        floor=t_floor * 1e3,
        source=t_source * 1e3,
        opt_map=t_map * 1e3,
        engine=t_engine * 1e3,
        finite=t_finite * 1e3,
    )


def window_costs(x, y, steps: int, warmup: int) -> list[tuple[str, float]]:
    """Median step time (ms) of the digits MLP with a window closed after every step (k=32, one query), with no
    logger, with TensorBoard (figures every 10 windows: the default), and with TensorBoard and a figure per window."""
    from lightning.pytorch.loggers import TensorBoardLogger

    torch.manual_seed(0)
    init = make_net("mlp", x.shape[1], int(y.max()) + 1)
    query = (x[:64], y[:64])
    out = []
    for label, logger, figures in (
        ("no logger", False, 10),
        ("TensorBoard, figure every 10 windows", True, 10),
        ("TensorBoard, figure every window", True, 1),
    ):
        tracker = InfluenceTracker(
            track=list(range(32)), queries={"q": query}, window_every_n_steps=1, log_figure_every_n_windows=figures
        )
        timer = StepTimer()
        board = TensorBoardLogger(tempfile.mkdtemp(), name="tb") if logger else False
        model = TinyClassifier(copy.deepcopy(init), make_optimizer("adamw"))
        trainer = lightning_trainer(
            10**6, precision="32-true", max_steps=steps, callbacks=[tracker, timer], logger=board
        )
        trainer.fit(model, DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=BATCH, shuffle=True))
        out.append((label, statistics.median(timer.step_times(warmup)) * 1e3))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps and cases (smoke run)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per run (default 200, quick 40)")
    ap.add_argument("--warmup", type=int, default=10, help="steps excluded from the median")
    ap.add_argument("--reps", type=int, default=None, help="repetitions of the isolated timings")
    ap.add_argument(
        "--repeats", type=int, default=None, help="alternating bare/tracked runs per case (default 2, quick 1)"
    )
    ap.add_argument("--logreg-dim", type=int, default=64, help="input dimension of the synthetic logistic regression")
    args = ap.parse_args()
    steps = args.steps or (40 if args.quick else 200)
    reps = args.reps or (10 if args.quick else 30)
    repeats = args.repeats or (1 if args.quick else 2)

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    xs, ys = synthetic(4096, args.logreg_dim, 10)
    xd, yd = digits()
    cases = []
    ks_logreg = [1, 32, 256, 2048]
    ks_small = [1, 32, 256]
    if args.quick:
        ks_logreg, ks_small = [1, 256, 2048], [1, 256]
    for k in ks_logreg:
        cases.append(("logreg", xs, ys, k, "adamw"))
    cases.append(("logreg", xs, ys, 256, "sgd"))
    for kind in ("mlp", "cnn"):
        for k in ks_small:
            cases.append((kind, xd, yd, k, "adamw"))

    t_start = time.perf_counter()
    rows = []
    for kind, x, y, k, opt_name in cases:
        r = one_case(kind, x, y, k, opt_name, steps, args.warmup, reps, repeats)
        rows.append(r)
        print(
            f"# done {kind}/{opt_name} k={k}: bare {r['bare']:.2f} ms, tracked {r['tracked']:.2f} ms,"
            f" floor {r['floor']:.2f} ms",
            flush=True,
        )

    print()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()},"
        f" float32, batch {BATCH}, {steps} steps per run (median after {args.warmup} warm-up steps),"
        f" estimator='acc'; logistic regression on synthetic data (n=4096, d={args.logreg_dim}, 10 classes),"
        " MLP 64-32-10 (tanh) and CNN (conv 1→8 3x3, relu, maxpool 2, linear 128→10) on 8x8 digits."
    )
    print()
    print(
        "| model | optimizer | k | p | tracked rows in batch | bare step (ms) | step with tracker (ms)"
        " | tracker overhead (ms)"
        " | HVP floor (ms) | overhead / floor | engine step (ms) | source (ms) | opt map (ms) | finite check (ms) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = r["overhead"] / r["floor"] if r["floor"] > 0 else float("nan")
        print(
            f"| {r['model']} | {r['opt']} | {r['k']} | {r['p']} | {r['m']} | {r['bare']:.2f} | {r['tracked']:.2f} |"
            f" {r['overhead']:.2f} | {r['floor']:.2f} | {ratio:.2f} | {r['engine']:.2f} | {r['source']:.2f} |"
            f" {r['opt_map']:.2f} |"
            f" {r['finite']:.2f} |"
        )
    print()
    print("Per-window cost: the digits MLP (k=32, adamw) with a window closed after every optimizer step:")
    print()
    print("| setup | median step (ms) |")
    print("|---|---:|")
    for label, ms in window_costs(xd, yd, steps, args.warmup):
        print(f"| {label} | {ms:.2f} |")
    print()
    print(f"total time: {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
