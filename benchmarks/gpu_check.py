"""GPU checks: the tracker on a CUDA device agrees with the CPU, and mixed precision behaves.

Prints numbers; asserts nothing beyond "it ran" (CI has no GPU: run this by hand on a CUDA machine).

    python benchmarks/gpu_check.py            # needs torch.cuda.is_available()

1. float64, AdamW, windows every 3 steps: CPU run vs CUDA run over the same batches (relative
   difference of final scores and of every window; queries answered after fit, when Lightning has
   moved the module back to the CPU).
2. float32 model: "bf16-mixed" and "16-mixed" (GradScaler) on CUDA vs "32-true" on CUDA (Spearman,
   relative RMSE); under "16-mixed" with an initial loss scale of 2**24 the scaled fp16 backward
   overflows and the GradScaler skips the first steps: the tracker must book only the steps taken.
3. Per-step time with and without the tracker for an MLP on digits-sized data (k = all samples).
"""

from __future__ import annotations

import time

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins import MixedPrecision
from torch import nn

from lightning_influence import InfluenceTracker
from lightning_influence.testing import TinyClassifier, agreement, fixed_loader, lightning_trainer, random_schedule


def make_net(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)


def data(n: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 8, generator=gen, dtype=dtype)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return x, y


def adamw(net: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(net.parameters(), lr=0.02, weight_decay=0.01)


class CountTakenSteps(pl.Callback):
    """Counts optimizer steps that changed the parameters (a GradScaler skip leaves them alone)."""

    def __init__(self) -> None:
        self.taken = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self._before = [p.detach().clone() for p in pl_module.parameters()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.taken += any(not torch.equal(a, p) for a, p in zip(self._before, pl_module.parameters()))


def fit(accelerator: str, precision, dtype, n=96, batch=16, epochs=3, plugins=None, extra=()):
    x, y = data(n, dtype)
    query = (x[:32], y[:32])
    tracker = InfluenceTracker(queries={"val": query}, window_every_n_steps=3)
    trainer = lightning_trainer(
        epochs, precision=precision, accelerator=accelerator, callbacks=[tracker, *extra], plugins=plugins
    )
    trainer.fit(TinyClassifier(make_net(dtype), adamw), fixed_loader(x, y, random_schedule(n, batch, epochs)))
    return tracker, trainer


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def main() -> None:
    assert torch.cuda.is_available(), "this check needs a CUDA device"
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, lightning {pl.__version__}")

    cpu, _ = fit("cpu", "64-true", torch.float64)
    gpu, _ = fit("gpu", "64-true", torch.float64)
    print("\n1. float64 CPU vs CUDA")
    print(f"   final scores: relative difference {rel(gpu.influence('val').scores, cpu.influence('val').scores):.2e}")
    for wc, wg in zip(cpu.windows("val"), gpu.windows("val")):
        print(
            f"   window {wc.index} [{wc.start_step}, {wc.end_step}]:"
            f" relative difference {rel(wg.scores, wc.scores):.2e}"
        )
    print(f"   states on {gpu.engine.theta.device}; query after fit answered on {gpu.influence('val').scores.device}")

    print("\n2. mixed precision on CUDA vs 32-true on CUDA (float32 model)")
    ref, _ = fit("gpu", "32-true", torch.float32)
    bf16, _ = fit("gpu", "bf16-mixed", torch.float32)
    stats = agreement(bf16.influence("val").scores.double(), ref.influence("val").scores.double())
    print(
        f"   bf16-mixed: spearman {stats['spearman']:.4f}, relative RMSE {stats['rel_rmse']:.2e},"
        f" state dtype {bf16.engine.theta.dtype}"
    )
    fp16, _ = fit("gpu", "16-mixed", torch.float32)
    stats = agreement(fp16.influence("val").scores.double(), ref.influence("val").scores.double())
    print(f"   16-mixed:   spearman {stats['spearman']:.4f}, relative RMSE {stats['rel_rmse']:.2e}")
    scaler = MixedPrecision("16-mixed", "cuda", scaler=torch.amp.GradScaler("cuda", init_scale=2.0**24))
    counter = CountTakenSteps()
    skip, trainer = fit("gpu", None, torch.float32, plugins=[scaler], extra=[counter])
    print(
        f"   16-mixed, init_scale 2**24: Lightning counted {trainer.global_step} steps, {counter.taken} changed the"
        f" parameters, the tracker booked {skip.steps_booked}; final scores finite:"
        f" {bool(torch.isfinite(skip.influence('val').scores).all())}"
    )

    print("\n3. per-step time, MLP 64-128-10, batch 64, 1024 samples, AdamW, float32, CUDA")
    for tracked in (False, True):
        x = torch.randn(1024, 64)
        y = torch.randint(0, 10, (1024,))
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 10))
        callbacks = [InfluenceTracker()] if tracked else []
        trainer = lightning_trainer(3, precision="32-true", accelerator="gpu", callbacks=callbacks)
        loader = fixed_loader(x, y, random_schedule(1024, 64, 3))
        start = time.perf_counter()
        trainer.fit(TinyClassifier(net, adamw), loader)
        torch.cuda.synchronize()
        per_step = (time.perf_counter() - start) / trainer.global_step
        print(
            f"   {'with' if tracked else 'without'} tracker (k=1024):"
            f" {per_step * 1e3:.2f} ms per step (incl. Lightning)"
        )


if __name__ == "__main__":
    main()
