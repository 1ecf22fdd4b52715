"""Which way of applying the step's Hessian-vector product to the state rows is cheapest, per model.

For each model, at random parameters and one training batch, the script times one step's HVP work for k
state rows (building the gradient graph, then applying it to the k rows) in the ways the tracker can
(``StepHvp``: a ``torch.func`` graph applied to c rows at once with ``vmap``, for several c, and a plain
autograd graph applied row by row, ``loop``), plus forward-over-reverse (``jvp`` of the gradient, vmapped:
``FunctionalLoss.hvp_and_directional``) as a reference. It then runs the tracker's own chooser
(``choose_hvp``, what the engine does on its first step) and reports its choice, that choice's step time,
and the speed-up over the old fixed default (vmap over all k rows).

Times are ms per step, the best of 3 after a warm-up, on ``--threads`` threads (default 1).

Run:  python benchmarks/hvp_methods.py            (about 2 minutes on 2 idle CPU cores)
      python benchmarks/hvp_methods.py --quick    (the two small models only)
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from lightning_influence.autodiff.functional import FlatParameters, FunctionalLoss
from lightning_influence.autodiff.hvp_plan import choose_hvp


def cross_entropy(module: nn.Module, batch) -> torch.Tensor:
    return F.cross_entropy(module(batch[0]), batch[1], reduction="none")


class TinyTransformer(nn.Module):
    """Token ids [B, 32] → one encoder layer (d=64, 4 heads) → mean-pool → 10 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 64)
        self.layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
        self.head = nn.Linear(64, 10)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(self.embed(tokens)).mean(1))


def models(quick: bool):
    """(name, module, inputs, k)."""
    for k in (1, 256):
        yield "logreg 64-10", nn.Linear(64, 10), torch.randn(32, 64), k
    for k in (1, 64):
        yield "MLP 64-32-10", nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)), torch.randn(32, 64), k
    conv = [nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten()]
    for k in (1, 64):
        yield "CNN digits", nn.Sequential(*conv, nn.Linear(128, 10)), torch.randn(32, 64), k
    if quick:
        return
    yield "transformer", TinyTransformer(), torch.randint(0, 100, (32, 32)), 32
    yield (
        "MLP 512-1024-512-10",
        nn.Sequential(nn.Linear(512, 1024), nn.Tanh(), nn.Linear(1024, 512), nn.Tanh(), nn.Linear(512, 10)),
        torch.randn(64, 512),
        16,
    )
    cnn = [nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU()]
    cnn += [nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4096, 64), nn.ReLU(), nn.Linear(64, 10)]
    yield "CNN 3x32x32 (batch 128)", nn.Sequential(*cnn), torch.randn(128, 3, 32, 32), 8


def per_step(fn, V: torch.Tensor, repeats: int = 3) -> float:
    """Milliseconds of ``fn(V)`` (best of ``repeats`` after a warm-up)."""
    fn(V)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(V)
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def measure(name: str, net: nn.Module, x: torch.Tensor, k: int) -> str:
    y = torch.randint(0, 10, (x.shape[0],))
    named = list(net.named_parameters())
    layout = FlatParameters.from_groups([named])
    loss = FunctionalLoss(net, cross_entropy, layout)
    theta = layout.flatten([p.detach() for _, p in named])
    batch = [(x, y)]
    V = torch.randn(k, theta.numel()) * 1e-2

    def build(method: str):
        return loss.linearize(theta, batch, method=method)[1]

    def step(method: str, rows: int):  # one whole step's HVP work: the graph, then k rows
        def run(v: torch.Tensor) -> torch.Tensor:
            hvp = build(method)
            return torch.cat([hvp(v[i : i + rows]) for i in range(0, len(v), rows)])

        return run

    cols = {"loop": per_step(step("loop", k), V)}
    for c in (4, k):
        cols["vmap×4" if c == 4 else "vmap×k"] = per_step(step("vmap", min(c, k)), V)
    cols["fwd-over-rev"] = per_step(lambda v: loss.hvp_and_directional(theta, batch, v)[0], V)
    choice = choose_hvp(build, V, max_rows=k)
    chosen = per_step(step(choice.method, choice.rows), V)
    default = cols["vmap×k"]
    row = " | ".join(f"{v:.2f}" for v in cols.values())
    return (f"| {name} | {theta.numel():,} | {x.shape[0]} | {k} | {row} | {choice.method} ×{choice.rows} |"
            f" {chosen:.2f} | {default / chosen:.2f}× |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"HVP work of one step (graph + k rows), ms, {args.threads} thread(s), torch {torch.__version__}\n")
    print("| model | p | batch | k | loop | vmap×4 | vmap×k | fwd-over-rev | chosen | chosen (ms) | vs vmap×k |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    for name, net, x, k in models(args.quick):
        print(measure(name, net, x, k), flush=True)


if __name__ == "__main__":
    main()
