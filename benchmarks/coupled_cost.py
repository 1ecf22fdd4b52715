"""What the coupled path costs: per-sample terms from the batch's own forward against a forward of each row alone.

A model whose forward draws (dropout) or holds recurrent layers gets its tracked samples' gradients g_r and HVPs
H_r v_r from one forward of the whole batch and backward passes vectorised over the rows ("coupled"). Other models
take one copy of θ per row, with only the forward vmapped over the rows ("per row"). Both compute the same numbers on
a deterministic model; this script times both, per model and number of tracked rows m in a batch of 64, for the
``"acc"`` terms (gradients and HVPs) and the ``"first-order"`` ones (gradients only).

Times are ms per call, the best of 5 after a warm-up, on ``--threads`` threads (default 2).

Run:  python benchmarks/coupled_cost.py     (about a minute on 2 idle CPU cores)
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from lightning_influence.autodiff.functional import FlatParameters, FunctionalLoss

BATCH = 64


def _models() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 10))
    cnn = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 16, 3, padding=1),
                        nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 10))  # fmt: skip
    return {"mlp (9.6k params)": (mlp, torch.randn(BATCH, 64)), "cnn (5.1k params)": (cnn, torch.randn(BATCH, 1, 8, 8))}


def _best(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    torch.set_num_threads(parser.parse_args().threads)
    print(f"{'model':20s} {'m':>3s} {'acc: per row':>13s} {'acc: coupled':>13s} {'first-order: per row':>21s}"
          f" {'first-order: coupled':>21s}  (ms per call)")  # fmt: skip
    for name, (net, x) in _models().items():
        layout = FlatParameters.from_groups([list(net.named_parameters())])
        batch = (x, torch.randint(0, 10, (BATCH,)))

        def loss_fn(m, b):
            return F.cross_entropy(m(b[0]), b[1], reduction="none")

        paths = {c: FunctionalLoss(net, loss_fn, layout, coupled=c) for c in (False, True)}
        theta = layout.flatten([p.detach() for p in net.parameters()])
        for m in (1, 4, 16):
            rows, vectors = torch.arange(m), 1e-3 * torch.randn(m, theta.numel())
            cells = [_best(partial(loss.sample_gradients_and_hvps, theta, batch, rows, BATCH, vectors))
                     for loss in (paths[False], paths[True])]  # fmt: skip
            cells += [_best(partial(loss.sample_gradients, theta, batch, rows, BATCH))
                      for loss in (paths[False], paths[True])]  # fmt: skip
            print(f"{name:20s} {m:3d} {cells[0]:13.2f} {cells[1]:13.2f} {cells[2]:21.2f} {cells[3]:21.2f}")


if __name__ == "__main__":
    main()
