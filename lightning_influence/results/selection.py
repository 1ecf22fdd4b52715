"""Online data selection (the K-step look-ahead): which samples a closed window says to remove, and how.

At a window boundary s_b the window scores W_j = I_j(s_b) − I_j(s_a) say how sample j's training during the
last K = s_b − s_a steps changed the query (negative = harmful, [concepts.md: The counterfactual run]). A
:class:`SelectionPolicy` turns them into a removal decision: the most harmful samples, a fraction per window and/or
beyond an absolute threshold, under a cap on the total; :func:`drop_rows` removes their rows from a collated batch.
Nothing here knows Lightning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection

SELECTION_FORMAT = "lightning-influence/selection"
SELECTION_VERSION = 1


def _check_fraction(name: str, value: float | None, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}.")


@dataclass(frozen=True)
class SelectionPolicy:
    """Which harmful samples one window removes.

    Args:
        fraction: at most ``ceil(fraction × k)`` samples per window (k = tracked samples), the most harmful
            first; None: no per-window count (``threshold`` alone decides).
        threshold: only samples whose window score is ≤ −``threshold`` (≥ 0; harm of at least that much);
            None: any negative score qualifies.
        max_fraction: at most ``floor(max_fraction × k)`` samples removed over the whole run.

    A sample with a window score ≥ 0 (helpful or inert in that window) is never removed.
    """

    fraction: float | None = 0.02
    threshold: float | None = None
    max_fraction: float = 0.1

    def __post_init__(self) -> None:
        _check_fraction("fraction", self.fraction, allow_none=True)
        _check_fraction("max_fraction", self.max_fraction, allow_none=False)
        if self.threshold is not None and (
            isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or self.threshold < 0
        ):
            raise ValueError(f"threshold must be a non-negative number (≥ 0), got {self.threshold!r}.")
        if self.fraction is None and self.threshold is None:
            raise ValueError("Give fraction= (a share per window), threshold= (a score cut-off), or both.")

    def cap(self, k: int) -> int:
        """The most samples the run may remove, of ``k`` tracked ones."""
        return math.floor(self.max_fraction * k + 1e-9)

    def choose(self, scores: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
        """Rows to remove after one window, most harmful first.

        Args:
            scores: ``Tensor[k]``, the window's scores (negative = harmful).
            removed: ``BoolTensor[k]``, rows already removed (never chosen again; they count towards the cap).

        Returns:
            ``LongTensor[m]`` of rows, ``m ≤ min(ceil(fraction × k), cap − removed.sum())``.
        """
        scores = scores.detach().to("cpu", torch.float64)
        k = scores.numel()
        eligible = ~removed.cpu() & torch.isfinite(scores) & (scores < 0)
        if self.threshold is not None:
            eligible &= scores <= -float(self.threshold)
        room = self.cap(k) - int(removed.sum())
        if self.fraction is not None:
            room = min(room, math.ceil(self.fraction * k - 1e-9))
        rows = torch.nonzero(eligible).flatten()
        if room <= 0 or rows.numel() == 0:
            return torch.empty(0, dtype=torch.long)
        order = torch.argsort(scores[rows], stable=True)
        return rows[order[:room]]


@dataclass(frozen=True)
class SelectionDecision:
    """The removal made after one closed window.

    Attributes:
        query: the query whose window scores decided.
        window: the window's index; ``start_step``/``end_step`` its boundaries (removal holds from step ``end_step``).
        epoch: the epoch in which the window closed.
        sample_ids: ``LongTensor[m]``, the removed training-set ids, most harmful first.
        scores: ``Tensor[m]``, the scores that decided (the window's, or the cumulative ones), all negative.
        total_removed: samples removed so far, this decision included.
    """

    query: str
    window: int
    start_step: int
    end_step: int
    epoch: int
    sample_ids: torch.Tensor
    scores: torch.Tensor
    total_removed: int

    def to_record(self) -> dict[str, Any]:
        """The JSON record of ``selection.jsonl`` (one line per decision)."""
        return {
            "format": SELECTION_FORMAT,
            "version": SELECTION_VERSION,
            "query": self.query,
            "window": self.window,
            "start_step": self.start_step,
            "end_step": self.end_step,
            "epoch": self.epoch,
            "sample_ids": [int(i) for i in self.sample_ids],
            "scores": [float(s) for s in self.scores],
            "total_removed": self.total_removed,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> SelectionDecision:
        fields = {k: record[k] for k in ("query", "window", "start_step", "end_step", "epoch", "total_removed")}
        ids = torch.tensor(record["sample_ids"], dtype=torch.long)
        return cls(sample_ids=ids, scores=torch.tensor(record["scores"], dtype=torch.float64), **fields)

    def __repr__(self) -> str:
        shown = ", ".join(f"{int(i)} ({float(s):+.2e})" for i, s in zip(self.sample_ids[:5], self.scores[:5]))
        more = f", … {self.sample_ids.numel() - 5} more" if self.sample_ids.numel() > 5 else ""
        return (
            f"SelectionDecision(query={self.query!r}, window {self.window}, steps {self.start_step}–{self.end_step},"
            f" removed {self.sample_ids.numel()}: [{shown}{more}], total {self.total_removed})"
        )


def drop_rows(batch: Any, keep: torch.Tensor) -> Any:
    """``batch`` with only the rows where ``keep`` (``BoolTensor[B]``) is True.

    Every tensor in the (nested) batch whose first dimension is B is indexed; other tensors and non-tensor
    leaves are left as they are. Batches holding per-row data in other forms (lists of strings...) need a
    ``filter_batch=`` function instead.
    """
    size = keep.numel()

    def take(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dim() and tensor.shape[0] == size:
            return tensor[keep.to(tensor.device)]
        return tensor

    return apply_to_collection(batch, torch.Tensor, take)
