"""Standalone 2-process DDP (gloo, CPU) run of ``InfluenceTracker``, driven by ``tests/callbacks/test_ddp.py``.

Usage::

    python tests/callbacks/ddp_worker.py OUTDIR [--mode shards|accumulate|padded|all] [--timeout-s 60]

Lightning's DDP launcher re-executes this very script (same argv) for rank 1 with ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``, ``WORLD_SIZE`` and ``NODE_RANK`` set, so everything below is
deterministic and lives under ``if __name__ == "__main__":``. When several modes run, the later
``Trainer``s reuse the processes and the process group of the first (rank 0 exported
``LOCAL_RANK``, so Lightning does not launch again).

``shards``
    ``use_distributed_sampler=False``; a fixed global schedule of batches of ``2·b`` ids; rank r
    consumes rows ``[r·b, (r+1)·b)`` of every global batch. AdamW, estimator ``"acc"`` (plus a
    second tracker with ``"tracin"``), windows every 3 steps, TensorBoard + CSV loggers.
    Writes ``OUTDIR/shards/rank{r}.pt``.
``accumulate``
    Like ``shards`` with ``accumulate_grad_batches=2`` (two micro-batches per rank per step, each
    weighted 1/(2·2)), SGD with momentum and ``gradient_clip_val`` (norm clipping of the all-reduced
    gradient), estimator ``"acc"``, no windows; an ``"exact"`` tracker follows ``EXACT_IDS``; another records
    the trajectory (``record_trajectory=True, track=()``) to ``OUTDIR/accumulate/recorded/trajectory``. Writes
    ``OUTDIR/accumulate/rank{r}.pt``.
``padded``
    Lightning's default ``DistributedSampler`` (``shuffle=True``) on an odd-sized training set with
    one batch per rank per epoch, so the sample the sampler repeats to equalise the ranks lands on
    both ranks in the same optimizer step. SGD with momentum, estimator ``"first-order"``.
    Writes ``OUTDIR/padded/rank{r}.pt``.

Each ``rank{r}.pt`` holds: the rank, world size, the ids this rank consumed (``ids``: one list per
training batch, i.e. per micro-batch), the tracker's states, ``influence("val").scores``, the
windows (``(start, end, scores)``), TracIn scores (shards), the tracked ids and the log directory.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta

import torch
from torch import nn

# ---------------------------------------------------------------------------- problem definitions
# Imported by tests/callbacks/test_ddp.py to build the single-process references: keep them pure functions.
NUM_FEATURES, NUM_CLASSES, HIDDEN = 4, 3, 5

SHARDS = dict(num_samples=24, per_rank_batch=3, epochs=2, schedule_seed=3, window_every_n_steps=3, lr=0.05)
ACCUMULATE = dict(num_samples=24, per_rank_batch=2, epochs=2, schedule_seed=4, lr=0.2, momentum=0.9, clip=0.3)
PADDED = dict(num_samples=13, epochs=4, lr=0.1, momentum=0.9)
# more than 64 samples: the default path records the run and replays it at the end of fit, shared by the ranks
DEFAULT = dict(num_samples=80, per_rank_batch=4, epochs=2, schedule_seed=5)
EXACT_IDS = [0, 5, 11, 17]  # tracked by the "exact" estimator in the accumulate run


def make_data(num_samples: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, NUM_FEATURES, generator=gen, dtype=torch.float64)
    y = torch.randint(0, NUM_CLASSES, (num_samples,), generator=gen)
    return x, y


def make_query(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An ``(x, y, ids)`` query batch (ids are ignored by the loss)."""
    x, y = make_data(6, seed)
    return x, y, torch.arange(6)


def make_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(NUM_FEATURES, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, NUM_CLASSES)).double()


def adamw(net: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(net.parameters(), lr=SHARDS["lr"], weight_decay=0.01)


def sgd_momentum(net: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(net.parameters(), lr=PADDED["lr"], momentum=PADDED["momentum"])


def sgd_momentum_accumulate(net: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(net.parameters(), lr=ACCUMULATE["lr"], momentum=ACCUMULATE["momentum"])


def global_schedule(cfg: dict = SHARDS) -> list[list[list[int]]]:
    """Epochs -> global (micro-)batches of ``2·b`` ids each (``cfg``: ``SHARDS`` or ``ACCUMULATE``)."""
    from lightning_influence.testing import random_schedule

    return random_schedule(cfg["num_samples"], 2 * cfg["per_rank_batch"], cfg["epochs"], cfg["schedule_seed"])


def rank_schedule(rank: int, cfg: dict = SHARDS) -> list[list[list[int]]]:
    """Rank ``rank``'s share of :func:`global_schedule`: rows ``[r·b, (r+1)·b)`` of every global batch."""
    b = cfg["per_rank_batch"]
    return [[batch[rank * b : (rank + 1) * b] for batch in epoch] for epoch in global_schedule(cfg)]


# ---------------------------------------------------------------------------- the DDP runs
def _trainer(out: str, epochs: int, callbacks: list, timeout_s: float, loggers: list | bool, **kwargs):
    from lightning.fabric.plugins.environments import LightningEnvironment
    from lightning.pytorch.strategies import DDPStrategy

    from lightning_influence.testing import lightning_trainer

    # LightningEnvironment: Lightning launches the processes itself, and does not probe for SLURM/MPI
    # (with mpi4py installed, the MPI probe fails outside an MPI launcher)
    strategy = DDPStrategy(
        process_group_backend="gloo", timeout=timedelta(seconds=timeout_s), cluster_environment=LightningEnvironment()
    )
    return lightning_trainer(
        epochs,
        devices=2,
        strategy=strategy,
        callbacks=callbacks,
        logger=loggers,
        default_root_dir=out,
        log_every_n_steps=1,
        **kwargs,
    )


def _record_ids():
    from lightning.pytorch.callbacks import Callback

    class RecordIds(Callback):
        """The ids this rank consumed, one list per training batch (= per optimizer step without accumulation)."""

        def __init__(self) -> None:
            self.ids: list[list[int]] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.ids.append(batch[-1].tolist())

    return RecordIds()


def _save(path: str, trainer, tracker, recorder, extra: dict) -> None:
    windows = [(w.start_step, w.end_step, w.scores.clone()) for w in tracker.windows("val")]
    payload = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "ids": recorder.ids,
        "tracked_ids": tracker.tracked_ids.clone(),
        "states": {b: s.detach().cpu().clone() for b, s in tracker.engine.states.items()},
        "scores": tracker.influence("val").scores.clone(),
        "windows": windows,
        "unseen": tracker.unseen_ids.clone(),
        "global_step": trainer.global_step,
        "log_dir": trainer.log_dir,
        **extra,
    }
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(payload, path)


def run_shards(out: str, timeout_s: float) -> None:
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from lightning_influence import InfluenceTracker
    from lightning_influence.testing import TinyClassifier, fixed_loader

    out = os.path.join(out, "shards")
    x, y = make_data(SHARDS["num_samples"])
    tracker = InfluenceTracker(queries={"val": make_query()}, window_every_n_steps=SHARDS["window_every_n_steps"])
    # its own query name: two trackers logging the same query name would share the logger tags
    tracin = InfluenceTracker(estimator="tracin", queries={"val_tracin": make_query()}, write_artifacts=False)
    recorder = _record_ids()
    loggers = [TensorBoardLogger(out, name="tb"), CSVLogger(out, name="csv")]
    trainer = _trainer(
        out, SHARDS["epochs"], [tracker, tracin, recorder], timeout_s, loggers, use_distributed_sampler=False
    )
    rank = int(os.environ.get("LOCAL_RANK", 0))  # the Trainer has not set global_rank on the module yet
    measured = _measure_another_plan_on_rank_one(rank)
    model = TinyClassifier(make_net(), adamw)
    trainer.fit(model, fixed_loader(x, y, rank_schedule(rank)))
    _save(
        os.path.join(out, f"rank{trainer.global_rank}.pt"),
        trainer,
        tracker,
        recorder,
        {
            "tracin_scores": tracin.influence("val_tracin").scores.clone(),
            "hvp_choice": tracker.engine.hvp_choice,
            "measured_choice": measured[0] if measured else None,
        },
    )


def _measure_another_plan_on_rank_one(rank: int) -> list:
    """On rank 1, the HVP timing at train start picks another method and chunk than rank zero's would (as a busy
    machine can make it): the fit must still chunk, and all-reduce, as rank zero does, or the collectives mismatch
    (gloo's "Connection reset by peer"). Returns the list that receives rank 1's own measurement."""
    measured: list = []
    if rank != 1:
        return measured
    import lightning_influence.core.memory as memory
    from lightning_influence.autodiff.hvp_plan import HvpChoice

    real = memory.choose_hvp

    def another(*args, **kwargs):
        choice = real(*args, **kwargs)
        other = HvpChoice("loop" if choice.method == "vmap" else "vmap", max(1, choice.rows - 1))
        measured.append(other)
        return other

    memory.choose_hvp = another
    return measured


def run_accumulate(out: str, timeout_s: float) -> None:
    from lightning_influence import InfluenceTracker
    from lightning_influence.testing import TinyClassifier, fixed_loader

    out = os.path.join(out, "accumulate")
    cfg = ACCUMULATE
    x, y = make_data(cfg["num_samples"])
    tracker = InfluenceTracker(queries={"val": make_query()}, write_artifacts=False)
    # the trajectory for the all-sample replay: every rank's micro-batches, recorded by rank zero
    trajectory = InfluenceTracker(
        estimator="first-order",
        track=(),
        record_trajectory=True,
        checkpoint_every_n_steps=3,
        dirpath=os.path.join(out, "recorded"),
    )
    exact = InfluenceTracker(estimator="exact", track=EXACT_IDS, queries={"val": make_query()}, write_artifacts=False)
    recorder = _record_ids()
    trainer = _trainer(
        out,
        cfg["epochs"],
        [tracker, trajectory, exact, recorder],
        timeout_s,
        False,
        use_distributed_sampler=False,
        accumulate_grad_batches=2,
        gradient_clip_val=cfg["clip"],
    )
    rank = int(os.environ.get("LOCAL_RANK", 0))
    trainer.fit(TinyClassifier(make_net(), sgd_momentum_accumulate), fixed_loader(x, y, rank_schedule(rank, cfg)))
    _save(
        os.path.join(out, f"rank{trainer.global_rank}.pt"),
        trainer,
        tracker,
        recorder,
        {
            "exact_scores": exact.influence("val").scores.clone(),
            # the replay after a DDP fit, shared by both processes (each replays its micro-batches of every step)
            "replayed": trajectory.influence(make_query(), all_samples=True).scores.clone(),
            "replay_processes": trajectory.replay(progress=False).processes,
        },
    )


def run_padded(out: str, timeout_s: float) -> None:
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    from lightning_influence import IndexedDataset, InfluenceTracker
    from lightning_influence.testing import TinyClassifier

    out = os.path.join(out, "padded")
    n = PADDED["num_samples"]
    x, y = make_data(n)
    # one batch per rank per epoch: the sampler pads the odd set by repeating its first index, on the other rank
    loader = DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=(n + 1) // 2, shuffle=True)
    tracker = InfluenceTracker(estimator="first-order", queries={"val": make_query()}, write_artifacts=False)
    recorder = _record_ids()
    trainer = _trainer(out, PADDED["epochs"], [tracker, recorder], timeout_s, False)
    trainer.fit(TinyClassifier(make_net(), sgd_momentum), loader)
    sampler = trainer.train_dataloader.sampler
    if not isinstance(sampler, DistributedSampler):
        raise AssertionError(f"expected Lightning to inject a DistributedSampler, got {type(sampler).__name__}")
    _save(os.path.join(out, f"rank{trainer.global_rank}.pt"), trainer, tracker, recorder, {})


def run_default(out: str, timeout_s: float) -> None:
    from lightning_influence import InfluenceTracker
    from lightning_influence.testing import TinyClassifier, fixed_loader

    out = os.path.join(out, "default")
    x, y = make_data(DEFAULT["num_samples"])
    tracker = InfluenceTracker(queries={"val": make_query()}, window_every_n_steps=5, dirpath=os.path.join(out, "run"))
    trainer = _trainer(out, DEFAULT["epochs"], [tracker], timeout_s, False, use_distributed_sampler=False)
    rank = int(os.environ.get("LOCAL_RANK", 0))
    trainer.fit(TinyClassifier(make_net(), adamw), fixed_loader(x, y, rank_schedule(rank, DEFAULT)))
    result = tracker.influence("val")  # read back: replayed at the end of fit
    payload = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "ids": result.sample_ids.clone(),
        "scores": result.scores.clone(),
        "windows": [(w.start_step, w.end_step, w.scores.clone()) for w in tracker.windows("val")],
        "replays": tracker.replays,
        "live": tracker.tracked_ids.clone(),
        "processes": tracker.replay(progress=False).processes,
    }
    torch.save(payload, os.path.join(out, f"rank{trainer.global_rank}.pt"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir")
    parser.add_argument("--mode", choices=("shards", "accumulate", "padded", "default", "all"), default="all")
    parser.add_argument("--timeout-s", type=float, default=60.0, help="gloo collective timeout")
    args = parser.parse_args(argv)
    out = os.path.abspath(args.outdir)
    torch.set_num_threads(1)  # two processes on a small machine
    if args.mode in ("shards", "all"):
        run_shards(out, args.timeout_s)
    if args.mode in ("accumulate", "all"):
        run_accumulate(out, args.timeout_s)
    if args.mode in ("padded", "all"):
        run_padded(out, args.timeout_s)
    if args.mode in ("default", "all"):
        run_default(out, args.timeout_s)
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        print(f"ddp_worker: done ({args.mode})", file=sys.stderr)
    # Tear the process group down while both processes are alive: left to interpreter shutdown,
    # gloo's threads can abort the process ("terminate called without an active exception")
    # after all the work is done. os._exit then skips the remaining C++ static destructors.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
