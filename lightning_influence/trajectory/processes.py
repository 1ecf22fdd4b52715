"""A replay's answer computed by several processes ([concepts.md: Every sample at once]).

:meth:`Trajectory.influence <lightning_influence.trajectory.reader.Trajectory.influence>` (and ``self_influence``,
``windows``) with ``devices=N`` runs one :class:`ReplayTask` on N processes: each builds the replay with its
:class:`~lightning_influence.trajectory.shards.ReplayShard` (its share of the adjoint's rows or of every step's batch,
and the all-reduce that sums the processes' parts) and asks it the same question; process 0's answer is returned,
the others hold the same.

Starting the processes and their all-reduce is a :data:`Launcher`'s job, given to :func:`load_trajectory
<lightning_influence.trajectory.reader.load_trajectory>`: the package's public ``load_trajectory`` passes Lightning
Fabric's (:mod:`lightning_influence.callbacks.processes`). Nothing here knows Lightning.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from lightning_influence.trajectory.shards import ReplayShard

if TYPE_CHECKING:  # the reader imports this module
    from lightning_influence.trajectory.reader import Trajectory

Launcher = Callable[[Callable[[ReplayShard], Any], int, str], Any]
"""``launcher(task, devices, accelerator)``: runs ``task(shard)`` on ``devices`` processes of ``accelerator``
(``"cpu"``, ``"cuda"``, ...), each with its shard, and returns process 0's result."""


@dataclass
class ReplayTask:
    """One replay question for every process: build :class:`~lightning_influence.trajectory.replay.TrajectoryReplay`
    over ``trajectory`` with ``options`` and the process's shard, then call its ``method`` with ``args`` and
    ``kwargs``. Picklable when its module, dataset, loss and options are (processes started by spawning need that)."""

    trajectory: Trajectory
    module: Any
    train_dataset: Any
    method: str
    args: tuple = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)

    def __call__(self, shard: ReplayShard | None) -> Any:
        options = dict(self.options)
        if shard is not None and shard.rank != 0:
            options["progress"] = False  # one progress bar, process 0's
        return getattr(self._replay(shard, options), self.method)(*self.args, **self.kwargs)

    def check(self, devices: int) -> None:
        """Build the replay of process 0 of ``devices`` here, before any process starts: what the replay refuses (a
        module or training set that does not fit the run, a model a shared replay cannot split) is raised as is."""
        self._replay(ReplayShard(0, devices, lambda tensor: tensor), {**self.options, "progress": False})

    def _replay(self, shard: ReplayShard | None, options: Mapping[str, Any]) -> Any:
        from lightning_influence.trajectory.replay import TrajectoryReplay  # the replay imports the reader

        return TrajectoryReplay(self.trajectory, self.module, self.train_dataset, shard=shard, **options)


def answer(task: ReplayTask, devices: int, accelerator: str, launcher: Launcher | None) -> Any:
    """``task``'s answer: in this process for ``devices=1``, else on ``devices`` processes started by ``launcher``."""
    if not isinstance(devices, int) or isinstance(devices, bool) or devices < 1:
        raise ValueError(f"devices must be a positive integer (the number of processes), got {devices!r}.")
    if devices == 1:
        return task(None)
    if launcher is None:
        raise ValueError(
            f"devices={devices} needs a launcher for the processes: load the trajectory with"
            " lightning_influence.load_trajectory(path), which starts them with Lightning Fabric."
        )
    task.check(devices)
    return launcher(task, devices, accelerator)
