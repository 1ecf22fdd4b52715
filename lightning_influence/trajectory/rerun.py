"""A recorded run re-walked forward: the steps of a trajectory rebuilt from its checkpoints and checked as they go.

:class:`RecordedRun` loads a finished trajectory with a module of the trained architecture and the training set, and
replays its steps forward, segment by segment (:mod:`lightning_influence.trajectory.steps`: the recorded samples, draws
and hyper-parameters, the real update re-run, every step checked against its recorded fingerprints, each segment's end
against the next checkpoint's or the final parameters, and the running buffers a BatchNorm in train mode moves). The
adjoint sweep (:mod:`lightning_influence.trajectory.replay`) and the in-run self-influence
(:mod:`lightning_influence.trajectory.self_influence`) consume the steps it rebuilds. Nothing here knows Lightning.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping
from typing import Any, Callable, NamedTuple

import torch
from torch import nn
from torch.utils.data import IterableDataset, default_collate
from tqdm import tqdm

from lightning_influence.autodiff.draws import DrawnBatch, moved
from lightning_influence.autodiff.functional import FunctionalLoss, PerSampleLossFn, RegularizerFn
from lightning_influence.errors import ReplayInputError
from lightning_influence.optimizers import OptimizerStep
from lightning_influence.results.result import IN_RUN, InfluenceResult
from lightning_influence.trajectory.adjoint import AdjointStep
from lightning_influence.trajectory.format import BATCH_DIR, StepEntry, listed_steps
from lightning_influence.trajectory.reader import Trajectory, load_trajectory
from lightning_influence.trajectory.self_influence import SelfInfluence
from lightning_influence.trajectory.shards import ReplayShard
from lightning_influence.trajectory.steps import (
    AutocastLoss,
    FingerprintCheck,
    ReplayedStep,
    autocast_from_meta,
    batch_caster,
    check_autocast_device,
    check_module,
    check_running_buffers,
    default_loss_fn,
    group_steps,
    jacobian_from_meta,
    layout_from_meta,
    make_clip,
    recorded_dtype,
    step_gradient,
    working_module,
)


class RunState(NamedTuple):
    """Parameters ``theta: Tensor[p]`` at a point of the run, the frozen values there, and how to name it."""

    theta: torch.Tensor
    frozen: dict[str, torch.Tensor] | None
    label: str


class RecordedRun:
    """A finished trajectory, its module and training set, ready to be replayed forward (the arguments are
    :class:`~lightning_influence.trajectory.replay.TrajectoryReplay`'s)."""

    def __init__(
        self,
        trajectory: Trajectory | str | os.PathLike,
        module: nn.Module,
        train_dataset: Any,
        loss_fn: PerSampleLossFn | None = None,
        regularizer: RegularizerFn | None = None,
        collate_fn: Callable[[list], Any] | None = None,
        move: Callable[[Any], Any] | None = None,
        progress: bool = True,
        chunk_size: int | None = None,
        tolerances: tuple[float, float] | None = None,
        shard: ReplayShard | None = None,
    ) -> None:
        self.trajectory = trajectory if isinstance(trajectory, Trajectory) else load_trajectory(trajectory)
        self.trajectory._check_finished()
        meta = self.trajectory.meta
        self.dtype, self.layout = recorded_dtype(meta), layout_from_meta(meta)
        check_module(module, self.layout)
        self.module = working_module(module, self.dtype)
        self.device = next((p.device for p in module.parameters()), torch.device("cpu"))
        self.jacobian = jacobian_from_meta(meta)
        loss_fn = loss_fn or default_loss_fn(module)
        self.loss = FunctionalLoss(self.module, loss_fn, self.layout, regularizer)  # queries: no autocast
        check_running_buffers(meta, self.loss)
        # the steps' loss, under the training forward's autocast when the run had one (bf16-mixed, 16-mixed): the
        # recomputed gradients, HVPs and directional derivatives are those of the step as it ran
        self.autocast = autocast_from_meta(meta)
        check_autocast_device(self.autocast, self.device)
        self.step_loss = (
            self.loss
            if self.autocast is None
            else AutocastLoss(self.module, loss_fn, self.layout, regularizer, autocast=self.autocast)
        )
        self.train_dataset, self.collate_fn = train_dataset, collate_fn or default_collate
        self.move = move or batch_caster(self.dtype, self.device)
        self.progress, self.chunk_size = progress, chunk_size
        self.shard = shard_for(shard, self.module, self.loss)
        self.num_samples = int(meta["num_samples"])
        self.check = FingerprintCheck(meta, self.dtype, tolerances)
        self._segments = self.trajectory.segments()
        if not self._segments:
            raise ValueError(f"{self.trajectory.path}: the trajectory holds no recorded step to replay.")
        self._entries: list[StepEntry] = [e for _, entries in self._segments for e in entries]
        self._steps = [e.step for e in self._entries]
        self._check_dataset()
        final = self.trajectory.final_step
        self.final_step: int = self._steps[-1] + 1 if final is None else int(final)

    @property
    def sample_ids(self) -> torch.Tensor:
        """``LongTensor[k]``: every sample id that took part in a recorded step, sorted."""
        ids = {i for e in self._entries for micro, _ in e.micro_batches for i in micro}
        return torch.tensor(sorted(ids), dtype=torch.long)

    def self_influence(self, chunk_size: int | None = None) -> InfluenceResult:
        """The in-run self-influence of every sample id in [0, num_samples) by one forward replay (``estimator`` and
        ``definition`` ``"in-run"``; :mod:`~lightning_influence.trajectory.self_influence`; positive = helpful to its
        own loss, 0 for a sample no step consumed); ``chunk_size``: rows per per-sample-gradient call."""
        dtype = torch.promote_types(self.dtype, torch.float32)
        total = SelfInfluence(self.step_loss, self.jacobian, self.num_samples, dtype, self.device, chunk_size)
        scores = self._summed(total.add_all(self.replayed_steps("Self-influence replay"))).detach().cpu()
        return InfluenceResult(torch.arange(self.num_samples), scores, estimator=IN_RUN, definition=IN_RUN)

    def replayed_steps(self, desc: str = "Replay") -> Iterator[AdjointStep]:
        """Every recorded step in time order, replayed as :meth:`scores` replays it (a segment's steps come once its
        end matched the next checkpoint or the final parameters): θ_t, the consumed gradient and the post-step
        optimizer state (``opt_step``), the micro-batches on the module's device, the clip, the frozen values."""
        final, segments = self._final_state(), self._segments
        state = self._load_checkpoint(segments[0][0])
        with tqdm(total=len(self._entries), disable=not self.progress, desc=desc, unit="step") as bar:
            for k, (_, entries) in enumerate(segments):
                theta, opt_state, frozen = state
                replayed, theta_end, states = self._replay(entries, theta, opt_state, frozen, bar)
                moved_to, end = states.pop(), final  # states[i]: the frozen values before step i
                if k + 1 < len(segments):
                    state = self._load_checkpoint(segments[k + 1][0])
                    end = RunState(state[0], state[2], f"the checkpoint of step {segments[k + 1][0]}")
                if end is not None:
                    where = f"after replaying step {entries[-1].step}, compared with {end.label},"
                    self.check.check(self.check.of(end.theta), theta_end, "parameters", where)
                    self._check_buffers(end, moved_to, where)
                yield from (self._adjoint_step(step, before) for step, before in zip(replayed, states))

    @property
    def processes(self) -> int:
        """How many processes share this replay (1 without a
        :class:`~lightning_influence.trajectory.shards.ReplayShard`)."""
        return 1 if self.shard is None else self.shard.world_size

    def _check_dataset(self) -> None:
        """Before any work: the training set can give every sample of the steps whose batches were not recorded."""
        recorded = set(listed_steps(self.trajectory.path / BATCH_DIR))
        unrecorded = [e for e in self._entries if e.step not in recorded]
        if not unrecorded or self.train_dataset is None:  # None: _fetch names the first step that needs the data
            return
        path, dataset, first = self.trajectory.path, self.train_dataset, unrecorded[0].step
        if isinstance(dataset, IterableDataset):
            raise ReplayInputError(
                f"{path}: the batches of step {first} (and {len(unrecorded) - 1} more) were not recorded, and the"
                f" training set ({type(dataset).__name__}) is an IterableDataset: the replay cannot read its samples"
                " by id. Record the run with InfluenceTracker(record_trajectory=True, record_batches=True), or pass a"
                " map-style dataset whose dataset[i] is the sample of id i."
            )
        try:
            size = len(dataset)
        except TypeError:  # no length: a missing id shows as the dataset's own error
            return
        largest = max((i for e in unrecorded for ids, _ in e.micro_batches for i in ids), default=-1)
        if largest >= size:
            raise ReplayInputError(
                f"{path}: the training set holds {size} samples, but the recorded run had num_samples="
                f"{self.num_samples} and used sample id {largest} (in a step whose batches were not recorded): it is"
                " not the training set of the run. Pass the dataset the run trained on (dataset[i] the sample of id"
                " i), or record the run with record_batches=True."
            )

    def _replay(self, entries, theta, opt_state, frozen, bar) -> tuple[list[ReplayedStep], torch.Tensor, list]:
        """Replay ``entries`` forward from θ and the optimizer state; returns the steps, the parameters after, and the
        frozen values before each step and after the last (the running buffers move with the steps, if any)."""
        out, states = [], [frozen]
        for entry in entries:
            where = f"at optimizer step {entry.step} (epoch {entry.epoch})"
            self.check.check(entry.fingerprint.get("theta"), theta, "parameters", where)
            micro = self._fetch(entry)
            raw = step_gradient(self.step_loss, theta, [(moved(b, self.move), i, w) for b, i, w in micro], frozen)
            self.check.check(entry.fingerprint.get("grad"), raw, "gradient", where)
            clip = make_clip(entry.clip, raw)
            opt_step = OptimizerStep(group_steps(entry, self.layout), theta, raw if clip is None else clip.clipped)
            states.append(self._moved_buffers(theta, micro, states[-1]))
            theta, opt_state = self.jacobian.apply(opt_step, opt_state)
            opt_step = opt_step.with_post_state(opt_state)
            out.append(ReplayedStep(entry, opt_step, micro, clip))
            bar.update()
        return out, theta, states

    def _check_buffers(self, end: RunState, frozen: dict | None, where: str) -> None:
        """The running buffers replayed to the end of a segment are the recorded ones there (when both exist)."""
        stats = self.step_loss.running_stats
        names = [] if stats is None else stats.buffer_names
        if stats is None or frozen is None or end.frozen is None or not all(n in end.frozen for n in names):
            return
        recorded, replayed = stats.read(self.module, end.frozen), stats.read(self.module, frozen)
        self.check.check(self.check.of(recorded), replayed, "parameters", f"{where} (the running statistics)")

    def _moved_buffers(self, theta: torch.Tensor, micro: list, frozen: dict | None) -> dict | None:
        """The frozen values after a step at θ: its running buffers r ↦ d ⊙ r + u(θ) moved by the step's forwards
        (``frozen`` itself when the model moves none)."""
        stats = self.step_loss.running_stats
        if stats is None:
            return frozen
        batches = [moved(b, self.move) for b, _, _ in micro]
        with torch.no_grad():
            update, decay = self.step_loss.fold_statistics(theta, batches, frozen)
            buffers = decay * stats.read(self.module, frozen).to(update) + update
        return stats.with_values(frozen, buffers)

    def _fetch(self, entry: StepEntry) -> list[tuple[Any, torch.Tensor, float]]:
        """The step's micro-batches ``[(batch, ids, w_m)]``: recorded, else collated from the training set."""
        ids = [torch.tensor(micro, dtype=torch.long) for micro, _ in entry.micro_batches]
        bad = [int(i) for t in ids for i in t if not 0 <= i < self.num_samples]
        if bad:
            raise ValueError(f"Step {entry.step} holds sample ids {bad[:5]} outside [0, {self.num_samples}).")
        batches = self.trajectory.batches(entry.step)
        if batches is None:
            if self.train_dataset is None:
                raise ValueError(f"Step {entry.step}'s batches were not recorded: pass the train_dataset to replay.")
            batches = [self.collate_fn([self.train_dataset[int(i)] for i in t]) for t in ids]
        elif len(batches) != len(ids):
            raise ValueError(f"Step {entry.step}: {len(batches)} recorded batches for {len(ids)} micro-batches.")
        draws = self.trajectory.draws(entry.step)
        if draws is not None:  # a model that draws (dropout): each micro-batch replays its forward's draws
            batches = [DrawnBatch(b, d) for b, d in zip(batches, draws)]
        return [(b, t, float(w)) for b, t, (_, w) in zip(batches, ids, entry.micro_batches)]

    def _summed(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the processes of a shared replay (itself on one process)."""
        return tensor if self.shard is None else self.shard.reduce(tensor)

    def _adjoint_step(self, step: ReplayedStep, frozen: dict | None, split: bool = True) -> AdjointStep:
        """The step for a consumer; on a process of a shared replay, with ``split``, its share of the step's batch
        (every process replays every step whole, forward: its parameters and optimizer state are the run's, with
        nothing exchanged)."""
        micro = step.micro_batches
        if self.shard is not None and split:
            micro = self.shard.split(step.entry.step, micro)
        micro = [(moved(b, self.move), ids.to(self.device), w) for b, ids, w in micro]
        return AdjointStep(step.opt_step, micro, step.clip, frozen)

    def _load_checkpoint(self, step: int) -> tuple[torch.Tensor, dict, dict | None]:
        """θ (``Tensor[p]``), the pre-step optimizer state and the frozen values of the checkpoint of ``step``."""
        document = self.trajectory.checkpoint(step, map_location=self.device)
        theta = self._theta(document, f"the checkpoint of step {step}")
        opt_state = {
            k: None if v is None else v.to(self.device, self.dtype)
            for k, v in (document.get("optimizer_state") or {}).items()
        }
        return theta, opt_state, document.get("frozen") or None

    def _final_state(self) -> RunState | None:
        """θ_T and the frozen values of ``final.pt`` (None when the run wrote none)."""
        if self.trajectory.final_step is None:
            return None
        document = self.trajectory.final(map_location=self.device)
        label = f"the final parameters (step {self.final_step})"
        return RunState(self._theta(document, label), document.get("frozen") or None, label)

    def _theta(self, document: Mapping[str, Any], label: str) -> torch.Tensor:
        theta = document["theta"].to(self.device, self.dtype).reshape(-1)
        if theta.numel() != self.layout.numel:
            raise ValueError(f"{label} holds {theta.numel()} parameters, the layout {self.layout.numel}.")
        return theta


def shard_for(shard: ReplayShard | None, module: nn.Module, loss: FunctionalLoss) -> ReplayShard | None:
    """``shard`` told whether the module couples a batch's rows (None for one process); :class:`ReplayInputError` for
    a model whose running buffers move (BatchNorm in train mode): every process would need every micro-batch's
    statistics, in order."""
    if shard is None or shard.world_size == 1:
        return None
    if loss.running_stats is not None:
        raise ReplayInputError(
            f"The model moves running buffers in its training forward ({loss.running_stats.buffer_names[0]!r}, ...:"
            " BatchNorm in train mode), which a replay on several processes does not share: the buffers' adjoint and"
            " a sample's terms need the statistics of the whole batch. Replay on one process (devices=1)."
        )
    coupled = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in module.modules())
    return dataclasses.replace(shard, rows_coupled=coupled)
