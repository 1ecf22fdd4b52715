"""The cost of all-sample influence: recording overhead on training, and one replayed query ([concepts.md: Every sample
at once]).

For each model (float32, one training run of a few epochs):

1. **Recording overhead**: the median time per training step with and without
   ``InfluenceTracker(track=(), record_trajectory=True)`` (step lines, fingerprints and checkpoint
   writes included), the runs alternating to discount other load. Goal ≤ 5%.
2. **One all-sample query**: the wall time of ``tracker.influence("val", all_samples=True)`` (every
   training sample scored on the validation loss) as a multiple of the plain training time of the same
   run, measured in the same process. Goal ≤ 3×. Split into the replay proper (fetching samples,
   gradient, fingerprints, the optimizer's update) and the adjoint sweep's one forward-over-reverse pass
   per step, which gives the Hessian-vector products and all in-batch JVP dot products together (timed
   around ``FunctionalLoss.hvp_and_directional``).
3. **Peak memory** of the replay: the replay runs again in a child process, which reports its peak
   resident memory above what it held before replaying (model, data and imports loaded).

Models: the digits MLP (scikit-learn's digits), a CNN on synthetic 3×32×32 images, a small transformer
classifier on synthetic token sequences (attention written out, no fused kernel).

Run:  python benchmarks/all_samples.py           (about 3 minutes on 2 CPU cores)
      python benchmarks/all_samples.py --quick   (smaller runs)
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning_influence.functional import FunctionalLoss
from lightning_influence.replay import TrajectoryReplay
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import IndexedDataset, InfluenceTracker, load_trajectory


# ----------------------------------------------------------------------------- models and data
class Attention(nn.Module):
    """Single-head self-attention with the softmax written out (differentiable twice by torch.func)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
        return self.out(weights @ v)


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 32, d: int = 32, layers: int = 2, length: int = 16, classes: int = 4) -> None:
        super().__init__()
        self.embed, self.position = nn.Embedding(vocab, d), nn.Parameter(torch.randn(length, d) * 0.02)
        self.blocks = nn.ModuleList(
            nn.ModuleList([nn.LayerNorm(d), Attention(d), nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)])
            for _ in range(layers)
        )
        self.head = nn.Linear(d, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.position
        for norm1, attention, norm2, up, down in self.blocks:
            h = h + attention(norm1(h))
            h = h + down(F.gelu(up(norm2(h))))
        return self.head(h.mean(dim=1))


def make_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "digits-mlp":
        return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    if name == "cnn-3x32x32":
        return nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2),
            nn.Flatten(), nn.Linear(32 * 8 * 8, 10),
        )  # fmt: skip
    return TinyTransformer()


def make_data(name: str, n: int) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """``(x, y, (x_val, y_val))``, reproducible."""
    gen = torch.Generator().manual_seed(1)
    if name == "digits-mlp":
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
        return x[:n], y[:n], (x[n : n + 200], y[n : n + 200])
    if name == "cnn-3x32x32":
        means = torch.randn(10, 3, 32, 32, generator=gen)
        y = torch.randint(0, 10, (n + 200,), generator=gen)
        x = means[y] * 0.5 + torch.randn(n + 200, 3, 32, 32, generator=gen)
    else:  # the label is the most frequent of the first 4 token classes in the sequence
        x = torch.randint(0, 32, (n + 200, 16), generator=gen)
        y = torch.stack([(x % 4 == c).sum(1) for c in range(4)], 1).argmax(1)
    return x[:n], y[:n], (x[n:], y[n:])


class Classifier(pl.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def per_sample_loss(self, batch) -> torch.Tensor:
        return F.cross_entropy(self.net(batch[0]), batch[1], reduction="none")

    def training_step(self, batch, batch_idx):
        return self.per_sample_loss(batch).mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=2e-3, weight_decay=1e-2)


class StepTimer(pl.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter() - self._started)


CASES = {  # name: (training samples, batch size, epochs)
    "digits-mlp": (1400, 64, 5),
    "cnn-3x32x32": (2000, 64, 2),
    "transformer": (1500, 32, 2),
}


def loader(name: str, n: int, batch: int) -> DataLoader:
    x, y, _ = make_data(name, n)
    return DataLoader(
        IndexedDataset(TensorDataset(x, y)), batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(2)
    )


def train(name: str, n: int, batch: int, epochs: int, tracker: InfluenceTracker | None):
    timer = StepTimer()
    trainer = pl.Trainer(
        max_epochs=epochs, callbacks=[timer] + ([tracker] if tracker else []), logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    model = Classifier(make_model(name))
    started = time.perf_counter()
    trainer.fit(model, loader(name, n, batch))
    return model, time.perf_counter() - started, timer.times


# ----------------------------------------------------------------------------- the replay's split
@contextmanager
def split_timing(totals: dict[str, float]):
    """Time the adjoint sweep's fused HVP + JVP passes (``FunctionalLoss.hvp_and_directional``)."""
    fused = FunctionalLoss.hvp_and_directional

    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return fused(*args, **kwargs)
        finally:
            totals["sweep"] = totals.get("sweep", 0.0) + time.perf_counter() - started

    FunctionalLoss.hvp_and_directional = timed
    try:
        yield
    finally:
        FunctionalLoss.hvp_and_directional = fused


def replay_child(name: str, n: str, path: str) -> None:
    """In a fresh process: load everything, then replay once; print the peak memory added by the replay."""
    x, y, (xv, yv) = make_data(name, int(n))
    replay = TrajectoryReplay(
        load_trajectory(path), Classifier(make_model(name)), IndexedDataset(TensorDataset(x, y)), progress=False
    )
    before = _rss_mib()
    replay.influence((xv, yv))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"before_mib": before, "peak_mib": peak}))


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


# ----------------------------------------------------------------------------- one case
def one_case(name: str, quick: bool, repeats: int) -> dict:
    n, batch, epochs = CASES[name]
    if quick:
        n, epochs = n // 2, 1
    bare_steps, recorded_steps, bare_total = [], [], math.inf
    for _ in range(repeats):  # alternate bare and recorded runs
        _, t_bare, steps = train(name, n, batch, epochs, None)
        bare_total, bare_steps = min(bare_total, t_bare), bare_steps + steps[3:]
        tracker = InfluenceTracker(
            track=(), record_trajectory=True, queries={"val": make_data(name, n)[2]}, dirpath=tempfile.mkdtemp()
        )
        model, _, steps = train(name, n, batch, epochs, tracker)
        recorded_steps += steps[3:]
    totals: dict[str, float] = {}
    with split_timing(totals):
        started = time.perf_counter()
        tracker.replay(progress=False).influence(tracker.queries["val"])
        t_query = time.perf_counter() - started
    out = subprocess.run(
        [sys.executable, __file__, "--replay-child", name, str(n), tracker.trajectory_path],
        capture_output=True,
        text=True,
        check=True,
    )
    memory = json.loads(out.stdout.strip().splitlines()[-1])
    bare, recorded = statistics.median(bare_steps), statistics.median(recorded_steps)
    trajectory = load_trajectory(tracker.trajectory_path)
    return dict(
        model=name, p=sum(q.numel() for q in model.parameters()), n=n, steps=len(trajectory.steps),
        checkpoints=len(trajectory.checkpoint_steps), bare_ms=bare * 1e3, recorded_ms=recorded * 1e3,
        overhead=recorded / bare - 1, train_s=bare_total, query_s=t_query, multiple=t_query / bare_total,
        sweep_s=totals.get("sweep", 0.0), replay_s=t_query - totals.get("sweep", 0.0),
        peak_mib=memory["peak_mib"] - memory["before_mib"],
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="half the samples, one epoch, one repeat")
    ap.add_argument("--repeats", type=int, default=2, help="alternating bare / recorded training runs")
    ap.add_argument("--models", nargs="*", default=list(CASES))
    ap.add_argument("--replay-child", nargs=3, metavar=("MODEL", "N", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    if args.replay_child:
        replay_child(*args.replay_child)
        return
    rows = [one_case(name, args.quick, 1 if args.quick else args.repeats) for name in args.models]
    print(f"\n## All-sample influence cost (float32, torch {torch.__version__}, {torch.get_num_threads()} threads)\n")
    print("| model | p | n | steps | checkpoints | step (ms) | step recorded (ms) | recording overhead |"
          " plain training (s) | all-sample query (s) | query / training | replay (s) | HVP + JVP (s) |"
          " replay peak memory (MiB) |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['model']} | {r['p']} | {r['n']} | {r['steps']} | {r['checkpoints']} | {r['bare_ms']:.2f} |"
            f" {r['recorded_ms']:.2f} | {r['overhead']:+.1%} | {r['train_s']:.2f} | {r['query_s']:.2f} |"
            f" {r['multiple']:.2f}× | {r['replay_s']:.2f} | {r['sweep_s']:.2f} | {r['peak_mib']:.0f} |"
        )


if __name__ == "__main__":
    main()
