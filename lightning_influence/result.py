"""``InfluenceResult``: influence scores of tracked training samples on one query."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass(frozen=True)
class InfluenceResult:
    """Scores of the tracked training samples on one query.

    Attributes:
        sample_ids: ``LongTensor[k]``, training-set indices.
        scores: ``Tensor[k]``, the predicted change of the query when the sample is removed,
            ``f(θ_-j(T)) − f(θ(T))``. **Negative = harmful** (removing the sample lowers the query
            loss), **positive = helpful**.
        per_example: ``Tensor[k, n]`` scores on each of the query's n examples, when asked for
            (their mean over n is ``scores``).
        estimator: which estimator produced the scores.
    """

    sample_ids: torch.Tensor
    scores: torch.Tensor
    per_example: torch.Tensor | None = None
    estimator: str = "acc"

    def __len__(self) -> int:
        return self.sample_ids.numel()

    def __iter__(self) -> Iterator[tuple[int, float]]:
        """``(sample_id, score)`` pairs."""
        return zip(self.sample_ids.tolist(), self.scores.tolist())

    def _subset(self, order: torch.Tensor) -> InfluenceResult:
        return InfluenceResult(
            self.sample_ids[order],
            self.scores[order],
            None if self.per_example is None else self.per_example[order],
            self.estimator,
        )

    def most_harmful(self, n: int = 10) -> InfluenceResult:
        """The ``n`` samples with the most negative scores, most harmful first (only negative scores)."""
        order = torch.argsort(self.scores)
        order = order[self.scores[order] < 0][:n]
        return self._subset(order)

    def most_helpful(self, n: int = 10) -> InfluenceResult:
        """The ``n`` samples with the most positive scores, most helpful first (only positive scores)."""
        order = torch.argsort(self.scores, descending=True)
        order = order[self.scores[order] > 0][:n]
        return self._subset(order)

    def ranking(self) -> InfluenceResult:
        """All samples from most harmful to most helpful."""
        return self._subset(torch.argsort(self.scores))

    def as_dict(self) -> dict[int, float]:
        """``{sample_id: score}``."""
        return dict(iter(self))

    def __repr__(self) -> str:
        return f"InfluenceResult(k={len(self)}, estimator={self.estimator!r}, harmful={int((self.scores < 0).sum())})"
