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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable

import torch
from tqdm import tqdm

from lightning_influence.autodiff.queries import query_example_gradients, query_gradient, running_stats_gradient
from lightning_influence.results.result import InfluenceResult
from lightning_influence.results.windows import WindowSnapshot
from lightning_influence.trajectory.adjoint import AdjointSweep
from lightning_influence.trajectory.format import StepEntry
from lightning_influence.trajectory.query_sketch import QuerySketch, check_rows, sketch_error
from lightning_influence.trajectory.rerun import RecordedRun, RunState
from lightning_influence.trajectory.steps import TOLERANCES, ReplayMismatchError
from lightning_influence.trajectory.windows import window_ends, window_snapshots

__all__ = ["TOLERANCES", "ReplayMismatchError", "TrajectoryReplay"]


QueryVectors = tuple[torch.Tensor, "torch.Tensor | None"]
"""A query's gradients at a point: ``(Tensor[n, p] in θ, Tensor[n, q] in the running buffers or None)``."""


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
    """One backward pass: the adjoint, its rows, the queries and the progress bar; ``owned``: the rows this process
    sweeps when a shared replay splits the rows between its processes (``BoolTensor[num_rows]``; None: every row)."""

    adjoint: AdjointSweep
    rows: _Rows
    queries: Mapping[str, Any]
    gradients: Callable[[Any, RunState], QueryVectors]
    bar: Any
    owned: torch.Tensor | None = None

    def seed(self, position: int, state: RunState) -> None:
        """Seed the rows of every boundary at ``position`` with their query's gradients at ``state``."""
        cache: dict[str, QueryVectors] = {}
        for name, rows in self.rows.at.get(position, []):
            keep = slice(None) if self.owned is None else self.owned[rows]
            if not rows[keep].numel():
                continue
            if name not in cache:
                cache[name] = self.gradients(self.queries[name], state)
            vectors, buffers = cache[name]
            self.adjoint.seed(rows[keep], vectors[keep], None if buffers is None else buffers[keep])


class TrajectoryReplay(RecordedRun):
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
        counts = {name: self._count(queries[name], per_example) for name in queries}
        return self._sweep(queries, boundaries, counts, lambda q, s: self._query_gradients(q, s, per_example),
                           per_example)  # fmt: skip

    def _sweep(
        self,
        queries: Mapping[str, Any],
        boundaries: Sequence[int],
        counts: Mapping[str, int],
        gradients: Callable[[Any, RunState], QueryVectors],
        per_example: bool = True,
    ) -> dict[str, torch.Tensor]:
        """:meth:`scores` with the rows' vectors from ``gradients(query, state)`` (``counts[name]`` rows each)."""
        names, bounds = list(queries), self._check_boundaries(boundaries)
        end = self._final_state()
        rows = _Rows(names, [bisect.bisect_left(self._steps, s) for s in bounds], counts)
        sweep_dtype = torch.promote_types(self.dtype, torch.float32)
        owned = self._owned_rows(rows.num_rows)
        reduce = self.shard.reduce if self.shard is not None and owned is None else None  # the batches split
        adjoint = AdjointSweep(
            self.step_loss, self.jacobian, self.num_samples, rows.num_rows, sweep_dtype, self.device, self.chunk_size,
            reduce,
        )  # fmt: skip
        position = len(self._entries)
        with tqdm(total=2 * position, disable=not self.progress, desc="Influence replay", unit="step") as bar:
            sweep = _Sweep(adjoint, rows, queries, gradients, bar, owned)
            for start, entries in reversed(self._segments):
                end = self._segment(start, entries, position, end, sweep)
                position -= len(entries)
        scores = self._summed(adjoint.scores)  # each process holds its rows', or its samples', terms
        tables = {name: rows.table(scores, name, len(bounds)) for name in names}
        return tables if per_example else {name: t[:, 0] for name, t in tables.items()}

    def _owned_rows(self, num_rows: int) -> torch.Tensor | None:
        """On one of N processes sharing the replay, with at least N adjoint rows: the contiguous block of rows this
        process sweeps (``BoolTensor[num_rows]``), every step replayed whole; the rows are independent (the adjoint is
        linear), so nothing is exchanged until the scores. None (fewer rows, or one process): every row, each step's
        batch split between the processes (:mod:`~lightning_influence.trajectory.shards`)."""
        if self.shard is None or num_rows < self.shard.world_size:
            return None
        rank, n = self.shard.rank, self.shard.world_size
        owner = torch.arange(num_rows) * n // num_rows
        return owner == rank

    def influence(self, query: Any, per_example: bool = False, energy: float | None = None) -> InfluenceResult:
        """Scores at the final step for every sample in :attr:`sample_ids` (estimator ``"first-order"``);
        ``per_example``: also ``Tensor[k, n]`` per query example (their mean is ``scores``), one adjoint row per
        example. ``energy`` (with ``per_example``): sweep the directions the examples' gradients span instead
        (:mod:`~lightning_influence.trajectory.query_sketch`): ``1.0`` their rank (exact), less a truncated SVD keeping
        that share of their energy, whose error on a few exact rows swept alongside ``result.approximation`` reports."""
        if per_example and energy is not None:
            return self._sketched(query, energy)
        table = self.scores({"query": query}, [self.final_step], per_example)["query"][0]
        ids = self.sample_ids
        if per_example:
            examples = table[:, ids].T.contiguous()
            return InfluenceResult(ids, examples.mean(dim=1), examples, estimator="first-order")
        return InfluenceResult(ids, table[ids], estimator="first-order")

    def _sketched(self, query: Any, energy: float, checks: int = 4) -> InfluenceResult:
        """:meth:`influence` per example by the query sketch, with ``checks`` exact rows to measure it."""
        theta_part, buffer_part = self._query_gradients(query, self._last_state(), per_example=True)
        full = theta_part if buffer_part is None else torch.cat([theta_part, buffer_part.to(theta_part)], dim=1)
        sketch, exact_rows = QuerySketch.of(full, energy), check_rows(full.shape[0], checks)
        vectors = torch.cat([sketch.directions, full[exact_rows]])
        p = theta_part.shape[1]

        def given(_: Any, __: RunState) -> QueryVectors:
            return vectors[:, :p], None if buffer_part is None else vectors[:, p:]

        table = self._sweep({"rows": None}, [self.final_step], {"rows": vectors.shape[0]}, given)["rows"][0]
        examples = sketch.expand(table[: sketch.rank])
        error = sketch_error(examples[exact_rows], table[sketch.rank :])
        ids = self.sample_ids
        per = examples[:, ids].T.contiguous()
        note = (
            f"query sketch: {sketch.rank} directions for {full.shape[0]} examples ({sketch.kept:.4%} of their"
            f" gradients' energy); max relative error {error:.2e} on {exact_rows.numel()} examples swept exactly"
        )
        return InfluenceResult(ids, per.mean(dim=1), per, estimator="first-order", approximation=note)

    def windows(self, name: str, query: Any, boundaries: Sequence[int] | None = None) -> list[WindowSnapshot]:
        """Window scores I(b) − I(a) of ``query`` (named ``name``) between consecutive boundaries, over
        :attr:`sample_ids`. Default boundaries: ``meta["windows"]`` (every n steps: the multiples of n; every n
        epochs: the step count after each n-th epoch's last step) and the final step. The first window starts at
        the first recorded step; a window's epoch is that of its last step."""
        return self.all_windows({name: query}, boundaries)[name]

    def all_windows(
        self, queries: Mapping[str, Any], boundaries: Sequence[int] | None = None
    ) -> dict[str, list[WindowSnapshot]]:
        """:meth:`windows` of every query of ``{name: query}`` at once, in one backward sweep."""
        start = self._steps[0]
        ends = window_ends(self.trajectory.meta.get("windows"), self._entries, self.final_step, boundaries)
        tables = self.scores(queries, ends)
        epochs = [self._entries[bisect.bisect_left(self._steps, b) - 1].epoch for b in ends]
        return {name: window_snapshots(name, start, ends, epochs, self.sample_ids, t) for name, t in tables.items()}

    def _segment(self, start: int, entries: list[StepEntry], position: int, end: RunState | None, sweep: _Sweep):
        """Replay the segment of checkpoint ``start`` (its steps end at ``position``), check it ends on ``end``, and
        sweep the adjoint back to the checkpoint; returns the checkpoint's state (the end of the previous one)."""
        theta, opt_state, frozen = self._load_checkpoint(start)
        replayed, theta_end, states = self._replay(entries, theta, opt_state, frozen, sweep.bar)
        moved_to = states.pop()  # the frozen values after the segment; states[i]: before its step i
        if end is not None:
            where = f"after replaying step {entries[-1].step}, compared with {end.label},"
            self.check.check(self.check.of(end.theta), theta_end, "parameters", where)
            self._check_buffers(end, moved_to, where)
        label = f"the parameters after step {entries[-1].step}"
        after = end if end is not None else RunState(theta_end, moved_to, label)
        while replayed:  # pop: each step is freed once swept
            step, step_frozen = replayed.pop(), states.pop()
            sweep.seed(position, after)
            sweep.adjoint.step_back(self._adjoint_step(step, step_frozen, split=sweep.owned is None))
            sweep.bar.update()
            after, position = RunState(step.opt_step.theta, step_frozen, ""), position - 1
        return RunState(theta, frozen, f"the checkpoint of step {start}")

    def _query_gradients(self, query: Any, state: RunState, per_example: bool) -> QueryVectors:
        """``(Tensor[n, p], Tensor[n, q] | None)``: ∇q(θ) (n = 1), or the per-example gradients of a batch query, and
        their gradients in the running buffers (None when the model moves none)."""
        label = f"The query at {state.label}" if state.label else "The query"
        with torch.enable_grad():
            if per_example:
                g = query_example_gradients(self.loss, state.theta, query, self.move, state.frozen, label=label)
            else:
                g = query_gradient(self.loss, state.theta, query, self.move, state.frozen, label=label)[None]
        buffers = running_stats_gradient(self.loss, state.theta, query, self.move, state.frozen, per_example)
        if buffers is not None and not per_example:
            buffers = buffers[None]
        return g, buffers

    def _count(self, query: Any, per_example: bool) -> int:
        """Query vectors per boundary: 1, or the number of examples (evaluated at :meth:`_last_state`)."""
        if not per_example:
            return 1
        return int(self._query_gradients(query, self._last_state(), per_example)[0].shape[0])

    def _last_state(self) -> RunState:
        """θ_T and its frozen values, or the last checkpoint's when the run wrote no final state: where a query's
        examples are counted and the query sketch's directions are found."""
        end = self._final_state()
        if end is None:
            theta, _, frozen = self._load_checkpoint(self._segments[-1][0])
            end = RunState(theta, frozen, "")
        return end

    def _check_boundaries(self, boundaries: Sequence[int]) -> list[int]:
        bounds = [int(s) for s in boundaries]
        if not bounds:
            raise ValueError("Pass at least one boundary (a step count).")
        outside = [s for s in bounds if not 0 <= s <= self.final_step]
        if outside:
            raise ValueError(f"Boundaries {outside} lie outside the recorded run [0, {self.final_step}].")
        return bounds
