"""DIT time windows ([concepts.md: Time windows]): when a window closes, and the snapshot it leaves behind.

A window [s_a, s_b] of a registered query q scores every tracked sample j by

    W_j = I_j(s_b; q) − I_j(s_a; q)

where I_j(s; q) = ⟨∇q(θ(s)), δθ_j(s)⟩ is the accumulated influence at boundary s. Consecutive
windows telescope: their sum is I_j at the last boundary (I_j(0) = 0). Only the k totals of the
last boundary are kept per query, never states, so memory is k floats per window per query.
Nothing here knows Lightning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Protocol

import torch


@dataclass(frozen=True)
class WindowSnapshot:
    """Influence of the tracked samples on one query over one time window.

    Attributes:
        query: the registered query's name.
        index: 0 for the first window, then 1, 2, ...
        start_step, end_step: optimizer steps at the window's boundaries (``start_step`` = 0 for
            the first window); the window covers steps ``start_step .. end_step − 1``.
        epoch: the training epoch in which the window closed.
        sample_ids: ``LongTensor[k]``, tracked training-set ids.
        scores: ``Tensor[k]``, window scores W_j = I_j(end) − I_j(start); the sign of [concepts.md: The counterfactual
        run]
            (negative = the sample's training during this window harmed the query).
    """

    query: str
    index: int
    start_step: int
    end_step: int
    epoch: int
    sample_ids: torch.Tensor
    scores: torch.Tensor

    def __repr__(self) -> str:
        harmful = int((self.scores < 0).sum())
        strongest = ""
        if self.scores.numel():
            row = int(self.scores.abs().argmax())
            strongest = f", strongest id {int(self.sample_ids[row])} ({float(self.scores[row]):+.3e})"
        return (
            f"WindowSnapshot(query={self.query!r}, index={self.index}, steps {self.start_step}–{self.end_step},"
            f" epoch {self.epoch}, k={self.scores.numel()}, harmful={harmful}{strongest})"
        )


class WindowSchedule:
    """When windows close: after every ``every_n_steps`` optimizer steps, or at the end of every
    ``every_n_epochs``-th epoch (at most one of the two); the end of fit always closes the last one."""

    def __init__(self, every_n_steps: int | None = None, every_n_epochs: int | None = None) -> None:
        for name, value in (("window_every_n_steps", every_n_steps), ("window_every_n_epochs", every_n_epochs)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}.")
        if every_n_steps is not None and every_n_epochs is not None:
            raise ValueError("Set window_every_n_steps or window_every_n_epochs, not both.")
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs

    def closes_after_step(self, steps_done: int) -> bool:
        """True if the window closes once ``steps_done`` optimizer steps have been taken."""
        return self.every_n_steps is not None and steps_done % self.every_n_steps == 0

    def closes_after_epoch(self, epoch: int) -> bool:
        """True if the window closes at the end of (0-based) ``epoch``."""
        return self.every_n_epochs is not None and (epoch + 1) % self.every_n_epochs == 0


class WindowRecorder:
    """Turns accumulated totals I(s) at successive boundaries into :class:`WindowSnapshot` records.

    Keeps, per query, the totals ``Tensor[k]`` of its last boundary and the snapshots so far.
    """

    def __init__(self, sample_ids: torch.Tensor, start_step: int = 0) -> None:
        self.sample_ids = sample_ids.detach().cpu().clone()
        self.start_step = start_step  # where the first window starts
        self._last: dict[str, tuple[int, torch.Tensor]] = {}  # query -> (boundary step, totals)
        self._snapshots: dict[str, list[WindowSnapshot]] = {}

    @property
    def last_boundary(self) -> int:
        """The step of the most recent boundary (``start_step`` before the first window closes)."""
        return max((step for step, _ in self._last.values()), default=self.start_step)

    def close(self, query: str, end_step: int, epoch: int, totals: torch.Tensor) -> WindowSnapshot:
        """Close ``query``'s current window at ``end_step`` given the totals I(end_step): ``Tensor[k]``."""
        totals = totals.detach().cpu().clone()
        if totals.shape != self.sample_ids.shape:
            raise ValueError(f"totals must be Tensor[{self.sample_ids.numel()}], got {tuple(totals.shape)}.")
        start_step, previous = self._last.get(query, (self.start_step, torch.zeros_like(totals)))
        if end_step <= start_step and query in self._last:
            raise ValueError(f"Window of {query!r} would close at step {end_step}, not after its start {start_step}.")
        history = self._snapshots.setdefault(query, [])
        snap = WindowSnapshot(query, len(history), start_step, end_step, epoch, self.sample_ids, totals - previous)
        history.append(snap)
        self._last[query] = (end_step, totals)
        return snap

    @property
    def queries(self) -> list[str]:
        """The queries that have closed a window."""
        return list(self._snapshots)

    def windows(self, query: str) -> list[WindowSnapshot]:
        """The snapshots of ``query`` in time order."""
        return list(self._snapshots.get(query, []))

    def window_matrix(self, query: str) -> torch.Tensor:
        """``Tensor[num_windows, k]``: the window scores of ``query``, one row per window."""
        history = self._snapshots.get(query, [])
        if not history:
            return torch.zeros(0, self.sample_ids.numel())
        return torch.stack([s.scores for s in history])

    def state_dict(self) -> dict[str, Any]:
        return {
            "sample_ids": self.sample_ids,
            "start_step": self.start_step,
            "last": {q: (step, t) for q, (step, t) in self._last.items()},
            "snapshots": {
                q: [(s.index, s.start_step, s.end_step, s.epoch, s.scores) for s in history]
                for q, history in self._snapshots.items()
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not torch.equal(state["sample_ids"], self.sample_ids):
            raise ValueError("The saved windows track different sample ids than this tracker.")
        self.start_step = int(state.get("start_step", 0))
        self._last = {q: (int(step), t.clone()) for q, (step, t) in state["last"].items()}
        self._snapshots = {
            q: [WindowSnapshot(q, i, a, b, e, self.sample_ids, s.clone()) for i, a, b, e, s in history]
            for q, history in state["snapshots"].items()
        }


class WindowSink(Protocol):
    """Where closed windows and a fit's final scores go (the loggers, the artifact files)."""

    def window(self, snapshot: WindowSnapshot, recorder: WindowRecorder) -> None:
        """``snapshot`` just closed; ``recorder`` holds every window so far."""

    def final(self, results: Mapping[str, Any], metadata: Mapping[str, Any]) -> None:
        """The end of fit: ``{query name: InfluenceResult}``."""
