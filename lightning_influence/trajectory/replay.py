"""Influence of every training sample from a recorded trajectory ([concepts.md: Every sample at once]): replay the run,
sweep the adjoint back.

:class:`TrajectoryReplay` walks the trajectory's segments from the last to the first. For each segment it loads the
checkpoint, replays the segment's steps forward (:mod:`lightning_influence.trajectory.steps`: the recorded samples and
hyper-parameters, the real update re-run, every step checked against its recorded fingerprints), checks that the
replay ends on the next checkpoint's (or the final) parameters, then sweeps the adjoint
(:class:`~lightning_influence.trajectory.adjoint.AdjointSweep`) back through the segment. Only one segment's steps are
held at a time: memory is O(p × segment length) plus the adjoint (rows × p per state block) and the score table
(rows × num_samples).

For a query q and a boundary s (a step count: θ_s are the parameters after every recorded step t < s), the score
of sample j is the first-order prediction I_j(s) = ⟨∇q(θ_s), δθ_j(s)⟩ of [concepts.md: One step] (estimator
``"first-order"``), with the sign of [concepts.md: The counterfactual run]: f(θ_-j) − f(θ), **negative = harmful**. The
rows of every boundary, query and query example are swept together in one backward pass. A window [a, b] scores I(b) −
I(a). Nothing here knows Lightning.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch
from torch import nn
from torch.utils.data import IterableDataset, default_collate
from tqdm import tqdm

from lightning_influence.autodiff.draws import DrawnBatch, moved
from lightning_influence.autodiff.functional import FunctionalLoss, PerSampleLossFn, RegularizerFn
from lightning_influence.autodiff.queries import query_example_gradients, query_gradient
from lightning_influence.errors import ReplayInputError
from lightning_influence.optimizers import OptimizerStep
from lightning_influence.results.result import InfluenceResult
from lightning_influence.results.windows import WindowSnapshot
from lightning_influence.trajectory.adjoint import AdjointStep, AdjointSweep
from lightning_influence.trajectory.format import BATCH_DIR, StepEntry, listed_steps
from lightning_influence.trajectory.reader import Trajectory, load_trajectory
from lightning_influence.trajectory.steps import (
    TOLERANCES,
    AutocastLoss,
    FingerprintCheck,
    ReplayedStep,
    ReplayMismatchError,
    autocast_from_meta,
    batch_caster,
    check_autocast_device,
    check_module,
    default_loss_fn,
    group_steps,
    jacobian_from_meta,
    layout_from_meta,
    make_clip,
    recorded_dtype,
    step_gradient,
    working_module,
)
from lightning_influence.trajectory.windows import window_ends, window_snapshots

__all__ = ["TOLERANCES", "ReplayMismatchError", "TrajectoryReplay"]


class _State(NamedTuple):
    """Parameters ``theta: Tensor[p]`` at a point of the run, the frozen values there, and how to name it."""

    theta: torch.Tensor
    frozen: dict[str, torch.Tensor] | None
    label: str


class _Rows:
    """Adjoint rows: query ``name`` at boundary index b owns ``rows[(name, b)]`` (``LongTensor[n]``, one row per
    query vector); ``at[position]`` lists the ``(name, rows)`` seeded when the sweep reaches ``position`` (the number
    of recorded steps before the boundary; boundaries at position 0 are never seeded: their scores are 0)."""

    def __init__(self, names: Sequence[str], positions: Sequence[int], counts: Mapping[str, int]) -> None:
        self.rows: dict[tuple[str, int], torch.Tensor] = {}
        self.at: dict[int, list[tuple[str, torch.Tensor]]] = {}
        start = 0
        for name in names:
            for b, position in enumerate(positions):
                rows = torch.arange(start, start + counts[name])
                start += counts[name]
                self.rows[(name, b)] = rows
                if position > 0:
                    self.at.setdefault(position, []).append((name, rows))
        self.num_rows = start

    def table(self, scores: torch.Tensor, name: str, num_boundaries: int) -> torch.Tensor:
        """``Tensor[num_boundaries, n, num_samples]`` of ``name``'s rows."""
        rows = torch.stack([self.rows[(name, b)] for b in range(num_boundaries)])
        return scores[rows.flatten().to(scores.device)].reshape(*rows.shape, scores.shape[1]).cpu()


@dataclass
class _Sweep:
    """One backward pass: the adjoint, its rows, the queries and the progress bar."""

    adjoint: AdjointSweep
    rows: _Rows
    queries: Mapping[str, Any]
    gradients: Callable[[Any, _State], torch.Tensor]  # (query, state) -> Tensor[n, p]
    bar: Any

    def seed(self, position: int, state: _State) -> None:
        """Seed the rows of every boundary at ``position`` with their query's gradients at ``state``."""
        cache: dict[str, torch.Tensor] = {}
        for name, rows in self.rows.at.get(position, []):
            if name not in cache:
                cache[name] = self.gradients(self.queries[name], state)
            self.adjoint.seed(rows, cache[name])


class TrajectoryReplay:
    """Scores of every training sample for any query, from a trajectory recorded while training.

    Args:
        trajectory: a :class:`~lightning_influence.trajectory.reader.Trajectory` or its folder.
        module: a module of the trained architecture (names and shapes of its trainable parameters must be the
            recorded ones); it is evaluated with the recorded parameters, and never modified (when its dtype
            differs from the recorded one, a cast copy is used).
        train_dataset: the training set, ``train_dataset[i]`` the sample of id i, as in training; not read for
            steps whose batches were recorded (``record_batches``), may then be None.
        loss_fn: ``(module, batch) -> Tensor[B]`` per-sample losses, the training loss (default
            ``type(module).per_sample_loss``); extra batch elements (e.g. the ids) are for it to ignore.
        regularizer: ``(module) -> scalar`` R(θ), added to each micro-batch's mean loss, as in training.
        collate_fn: builds a micro-batch from its samples (default ``torch.utils.data.default_collate``).
        move: ``batch -> batch`` on the module's device and dtype (default: tensors moved to the module's
            device, floating ones cast to the recorded dtype); applied to training and query batches.
        progress: show a progress bar over the replayed and swept steps.
        chunk_size: adjoint rows per vectorised HVP / JVP call (None: all at once).
        tolerances: ``(parameters rtol, gradient rtol)`` of the fingerprint check (default: :data:`TOLERANCES`
            of the recorded dtype; for a run recorded under autocast, ``MIXED_TOLERANCES`` of its dtype).

    A run recorded under autocast (``meta["autocast"]``: Lightning's bf16-mixed or 16-mixed) is replayed under the
    same autocast: each step's gradient, HVPs and directional derivatives are those of the loss as the training
    forward computed it; the queries are evaluated without autocast, in the parameters' dtype, as after any run. The
    module must be on a device of the recorded autocast's type (:class:`ReplayInputError` otherwise).

    Raises :class:`~lightning_influence.errors.UnfinishedTrajectoryError` for a trajectory whose writer did not finish
    (no ``end.json``: a crashed, failed or running fit; resume the fit so that it finishes),
    :class:`~lightning_influence.errors.FolderInUseError` while another process writes it, and
    :class:`~lightning_influence.errors.ReplayInputError` for a training set that cannot give the recorded samples
    (an ``IterableDataset``, or fewer samples than the largest recorded id), all before any work; (while scoring)
    :class:`ReplayMismatchError` when a replayed step does not reproduce the recorded one.
    """

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

    def scores(
        self, queries: Mapping[str, Any], boundaries: Sequence[int], per_example: bool = False
    ) -> dict[str, torch.Tensor]:
        """I_j(s) = ⟨∇q(θ_s), δθ_j(s)⟩ for every query, boundary s and training sample j, in one backward pass.

        Args:
            queries: ``{name: query}``; a query is a batch, an iterable of batches (f = mean loss over its samples)
                or a callable ``(module) -> scalar`` (:mod:`lightning_influence.autodiff.queries`).
            boundaries: step counts s in [0, final step]; θ_s = the parameters after every recorded step t < s.
            per_example: score each example of a batch query (a callable query has one).

        Returns:
            ``{name: Tensor[len(boundaries), num_samples]}`` (``Tensor[len(boundaries), n, num_samples]`` with
            ``per_example``) on the CPU; samples in no step score 0. Sign: negative = harmful.
        """
        names, bounds = list(queries), self._check_boundaries(boundaries)
        end = self._final_state()
        counts = {name: self._count(queries[name], end, per_example) for name in names}
        rows = _Rows(names, [bisect.bisect_left(self._steps, s) for s in bounds], counts)
        sweep_dtype = torch.promote_types(self.dtype, torch.float32)
        adjoint = AdjointSweep(
            self.step_loss, self.jacobian, self.num_samples, rows.num_rows, sweep_dtype, self.device, self.chunk_size
        )
        position = len(self._entries)
        with tqdm(total=2 * position, disable=not self.progress, desc="Influence replay", unit="step") as bar:
            sweep = _Sweep(adjoint, rows, queries, lambda q, s: self._query_gradients(q, s, per_example), bar)
            for start, entries in reversed(self._segments):
                end = self._segment(start, entries, position, end, sweep)
                position -= len(entries)
        tables = {name: rows.table(adjoint.scores, name, len(bounds)) for name in names}
        return tables if per_example else {name: t[:, 0] for name, t in tables.items()}

    def influence(self, query: Any, per_example: bool = False) -> InfluenceResult:
        """Scores at the final step for every sample in :attr:`sample_ids` (estimator ``"first-order"``);
        ``per_example``: also ``Tensor[k, n]`` per query example (their mean is ``scores``)."""
        table = self.scores({"query": query}, [self.final_step], per_example)["query"][0]
        ids = self.sample_ids
        if per_example:
            examples = table[:, ids].T.contiguous()
            return InfluenceResult(ids, examples.mean(dim=1), examples, estimator="first-order")
        return InfluenceResult(ids, table[ids], estimator="first-order")

    def windows(self, name: str, query: Any, boundaries: Sequence[int] | None = None) -> list[WindowSnapshot]:
        """Window scores I(b) − I(a) of ``query`` (named ``name``) between consecutive boundaries, over
        :attr:`sample_ids`. Default boundaries: ``meta["windows"]`` (every n steps: the multiples of n; every n
        epochs: the step count after each n-th epoch's last step) and the final step. The first window starts at
        the first recorded step; a window's epoch is that of its last step."""
        start = self._steps[0]
        ends = window_ends(self.trajectory.meta.get("windows"), self._entries, self.final_step, boundaries)
        table = self.scores({name: query}, ends)[name]
        epochs = [self._entries[bisect.bisect_left(self._steps, b) - 1].epoch for b in ends]
        return window_snapshots(name, start, ends, epochs, self.sample_ids, table)

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

    # -- the sweep ---------------------------------------------------------------------------------------------

    def _segment(self, start: int, entries: list[StepEntry], position: int, end: _State | None, sweep: _Sweep):
        """Replay the segment of checkpoint ``start`` (its steps end at ``position``), check it ends on ``end``, and
        sweep the adjoint back to the checkpoint; returns the checkpoint's state (the end of the previous one)."""
        theta, opt_state, frozen = self._load_checkpoint(start)
        replayed, theta_end = self._replay(entries, theta, opt_state, frozen, sweep.bar)
        if end is not None:
            where = f"after replaying step {entries[-1].step}, compared with {end.label},"
            self.check.check(self.check.of(end.theta), theta_end, "parameters", where)
        after = end if end is not None else _State(theta_end, frozen, f"the parameters after step {entries[-1].step}")
        while replayed:  # pop: each step is freed once swept
            step = replayed.pop()
            sweep.seed(position, after)
            sweep.adjoint.step_back(self._adjoint_step(step, frozen))
            sweep.bar.update()
            after, position = _State(step.opt_step.theta, frozen, ""), position - 1
        return _State(theta, frozen, f"the checkpoint of step {start}")

    def _replay(self, entries, theta, opt_state, frozen, bar) -> tuple[list[ReplayedStep], torch.Tensor]:
        """Replay ``entries`` forward from θ and the optimizer state; returns the steps and the parameters after."""
        out = []
        for entry in entries:
            where = f"at optimizer step {entry.step} (epoch {entry.epoch})"
            self.check.check(entry.fingerprint.get("theta"), theta, "parameters", where)
            micro = self._fetch(entry)
            raw = step_gradient(self.step_loss, theta, [(moved(b, self.move), i, w) for b, i, w in micro], frozen)
            self.check.check(entry.fingerprint.get("grad"), raw, "gradient", where)
            clip = make_clip(entry.clip, raw)
            opt_step = OptimizerStep(group_steps(entry, self.layout), theta, raw if clip is None else clip.clipped)
            theta, opt_state = self.jacobian.apply(opt_step, opt_state)
            opt_step = opt_step.with_post_state(opt_state)
            out.append(ReplayedStep(entry, opt_step, micro, clip))
            bar.update()
        return out, theta

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

    def _adjoint_step(self, step: ReplayedStep, frozen: dict | None) -> AdjointStep:
        micro = [(moved(b, self.move), ids.to(self.device), w) for b, ids, w in step.micro_batches]
        return AdjointStep(step.opt_step, micro, step.clip, frozen)

    # -- states, queries, boundaries ---------------------------------------------------------------------------

    def _load_checkpoint(self, step: int) -> tuple[torch.Tensor, dict, dict | None]:
        """θ (``Tensor[p]``), the pre-step optimizer state and the frozen values of the checkpoint of ``step``."""
        document = self.trajectory.checkpoint(step, map_location=self.device)
        theta = self._theta(document, f"the checkpoint of step {step}")
        opt_state = {
            k: None if v is None else v.to(self.device, self.dtype)
            for k, v in (document.get("optimizer_state") or {}).items()
        }
        return theta, opt_state, document.get("frozen") or None

    def _final_state(self) -> _State | None:
        """θ_T and the frozen values of ``final.pt`` (None when the run wrote none)."""
        if self.trajectory.final_step is None:
            return None
        document = self.trajectory.final(map_location=self.device)
        label = f"the final parameters (step {self.final_step})"
        return _State(self._theta(document, label), document.get("frozen") or None, label)

    def _theta(self, document: Mapping[str, Any], label: str) -> torch.Tensor:
        theta = document["theta"].to(self.device, self.dtype).reshape(-1)
        if theta.numel() != self.layout.numel:
            raise ValueError(f"{label} holds {theta.numel()} parameters, the layout {self.layout.numel}.")
        return theta

    def _query_gradients(self, query: Any, state: _State, per_example: bool) -> torch.Tensor:
        """``Tensor[n, p]``: ∇q(θ) (n = 1), or the per-example gradients of a batch query."""
        label = f"The query at {state.label}" if state.label else "The query"
        with torch.enable_grad():
            if per_example:
                return query_example_gradients(self.loss, state.theta, query, self.move, state.frozen, label=label)
            return query_gradient(self.loss, state.theta, query, self.move, state.frozen, label=label)[None]

    def _count(self, query: Any, end: _State | None, per_example: bool) -> int:
        """Query vectors per boundary: 1, or the number of examples (evaluated at the final parameters)."""
        if not per_example:
            return 1
        if end is None:
            theta, _, frozen = self._load_checkpoint(self._segments[-1][0])
            end = _State(theta, frozen, "")
        return int(self._query_gradients(query, end, per_example).shape[0])

    def _check_boundaries(self, boundaries: Sequence[int]) -> list[int]:
        bounds = [int(s) for s in boundaries]
        if not bounds:
            raise ValueError("Pass at least one boundary (a step count).")
        outside = [s for s in bounds if not 0 <= s <= self.final_step]
        if outside:
            raise ValueError(f"Boundaries {outside} lie outside the recorded run [0, {self.final_step}].")
        return bounds
