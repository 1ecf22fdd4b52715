"""The processes of a shared replay, started by Lightning Fabric ([concepts.md: Every sample at once]).

``lightning_influence.load_trajectory(path)`` gives its trajectory :func:`fabric_launcher`: ``trajectory.influence(...,
devices=N, accelerator=...)`` then runs on N processes that Fabric starts with its ``ddp`` strategy (forked on the
CPU, so nothing needs to pickle; spawned on GPUs, where the module, dataset and loss must pickle), each given its
:class:`~lightning_influence.trajectory.shards.ReplayShard` whose ``reduce`` is torch.distributed's all-reduce on the
process group Fabric set up (gloo on the CPU, NCCL on GPUs).
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import pickle
import tempfile
from typing import Any, Callable

import torch
from lightning.fabric import Fabric

from lightning_influence.trajectory.reader import Trajectory
from lightning_influence.trajectory.reader import load_trajectory as read_trajectory
from lightning_influence.trajectory.shards import ReplayShard


def fabric_launcher(task: Callable[[ReplayShard], Any], devices: int, accelerator: str) -> Any:
    """Run ``task(shard)`` on ``devices`` processes of ``accelerator`` started by Lightning Fabric; returns process
    0's result. On the CPU the processes are forked where the platform can (no pickling; each gets its share of the
    CPU's threads, Fabric's default), else spawned."""
    forks = accelerator == "cpu" and "fork" in multiprocessing.get_all_start_methods()
    if not forks:
        _check_picklable(task, devices, accelerator)
    fabric = Fabric(accelerator=accelerator, devices=devices, strategy="ddp_fork" if forks else "ddp_spawn")
    # the answer comes back through a file: Fabric returns process 0's result through a pipe that the caller reads
    # only once every process ended, so a result larger than the pipe's buffer (64 KiB) would never be read
    with tempfile.TemporaryDirectory(prefix="lightning-influence-replay-") as folder:
        path = os.path.join(folder, "answer.pt")
        fabric.launch(functools.partial(_run_shard, task=task, path=path))
        return torch.load(path, weights_only=False)


def _check_picklable(task: Callable[[ReplayShard], Any], devices: int, accelerator: str) -> None:
    """``ValueError`` naming the fix when the task cannot go to spawned processes (before any starts)."""
    try:
        pickle.dumps(task)
    except Exception as err:  # pickling raises many kinds (PicklingError, AttributeError, TypeError)
        raise ValueError(
            f"devices={devices} on accelerator={accelerator!r} spawns its processes, which receive the module, the"
            " training set, loss_fn and the replay's options pickled: use module-level functions and classes (no"
            f" lambdas or local functions), or devices=1 ({type(err).__name__}: {err})."
        ) from err


def _run_shard(fabric: Fabric, task: Callable[[ReplayShard], Any], path: str) -> None:
    """Process ``fabric.global_rank``'s part; process 0 saves the answer to ``path``."""

    def summed(tensor: torch.Tensor) -> torch.Tensor:
        # torch.distributed's all-reduce on the process group Fabric set up: Fabric's own all_reduce waits at a
        # barrier before each reduction, a second collective per call (a replay reduces twice per step)
        torch.distributed.all_reduce(tensor)
        return tensor

    answer = task(ReplayShard(fabric.global_rank, fabric.world_size, summed))
    if fabric.global_rank == 0:
        torch.save(answer, path)
    fabric.barrier()  # every process finished its collectives


def load_trajectory(path: Any) -> Trajectory:
    """:func:`~lightning_influence.trajectory.reader.load_trajectory` whose replays run on several processes with
    ``devices=N`` (:func:`fabric_launcher`)."""
    return read_trajectory(path, launcher=fabric_launcher)


__all__ = ["fabric_launcher", "load_trajectory"]
