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
        estimator: which estimator produced the scores (``"in-run"`` for the in-run self-influence).
        definition: which quantity the scores hold, for answers that have more than one: ``None`` for the influence
            on a query (the quantity above); :data:`COUNTERFACTUAL` (``"counterfactual"``) for the self-influence of
            forward-tracked samples, ℓ_j(θ_-j(T)) − ℓ_j(θ(T)); :data:`IN_RUN` (``"in-run"``) for the in-run
            self-influence of every sample of a recorded run, Σ_t Σ_{m∋j} (η_t w_m/|B_m|) ⟨∇ℓ_j(θ_t), P_t ∇ℓ_j(θ_t)⟩
            (P_t the optimizer's preconditioner; [concepts.md: Self-influence of every sample]). Both self-influences
            have the sign of every score (positive: the sample helps its own loss).
        approximation: how the scores approximate the estimator's, when they do (e.g. a low-rank sketch of many query
            examples' gradients, with its measured error against exact rows); None: they are the estimator's.
    """

    sample_ids: torch.Tensor
    scores: torch.Tensor
    per_example: torch.Tensor | None = None
    estimator: str = "acc"
    definition: str | None = None
    approximation: str | None = None

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
            self.definition,
            self.approximation,
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

    def summary(self) -> str:
        """One line: how many samples, which estimator (and definition, when set), how many harmful."""
        definition = "" if self.definition is None else f", definition={self.definition!r}"
        if self.approximation is not None:
            definition += f", approximation={self.approximation!r}"
        harmful = int((self.scores < 0).sum())
        return f"InfluenceResult(k={len(self)}, estimator={self.estimator!r}{definition}, harmful={harmful})"

    def _rows(self, limit: int) -> list[tuple[int, float] | None]:
        """``(sample_id, score)`` rows to show, in stored order: all, or the first and last ``limit // 2``
        (``None`` marks the gap)."""
        pairs: list[tuple[int, float] | None] = list(self)
        if len(pairs) <= limit:
            return pairs
        half = limit // 2
        return [*pairs[:half], None, *pairs[-half:]]

    def __repr__(self) -> str:
        """The summary line, then a short table (id, score) in the result's order; negative = harmful."""
        lines = [self.summary()]
        if len(self):
            lines.append(f"{'sample_id':>10}  {'score':>11}")
            for row in self._rows(10):
                lines.append(f"{'…':>10}  {'…':>11}" if row is None else f"{row[0]:>10}  {row[1]:>+11.4e}")
        if self.per_example is not None:
            lines.append(f"(per_example: Tensor{list(self.per_example.shape)}, one column per query example)")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        """The same table for notebooks."""
        cells = "".join(
            "<tr><td>…</td><td>…</td></tr>" if row is None else f"<tr><td>{row[0]}</td><td>{row[1]:+.4e}</td></tr>"
            for row in self._rows(20)
        )
        return (
            f"<p><code>{self.summary()}</code> (negative = harmful)</p>"
            f"<table><thead><tr><th>sample_id</th><th>score</th></tr></thead><tbody>{cells}</tbody></table>"
        )

    def to_pandas(self, per_example: bool = False):
        """A ``pandas.DataFrame``: columns ``sample_id`` and ``score``; with ``per_example=True`` one row per
        (sample, query example): ``sample_id``, ``query_index``, ``score`` (needs the ``pandas`` extra)."""
        try:
            import pandas as pd
        except ImportError as err:  # an optional dependency
            raise ImportError("to_pandas() needs pandas: pip install 'lightning-influence[pandas]'.") from err
        ids, scores = self.sample_ids.cpu().numpy(), self.scores.detach().cpu().double().numpy()
        if not per_example:
            return pd.DataFrame({"sample_id": ids, "score": scores})
        if self.per_example is None:
            raise ValueError("This result has no per-example scores: ask influence(query, per_example=True).")
        table = self.per_example.detach().cpu().double()
        n = table.shape[1]
        return pd.DataFrame(
            {"sample_id": ids.repeat(n), "query_index": list(range(n)) * len(ids), "score": table.reshape(-1).numpy()}
        )

    def show(self, dataset, n: int = 8, preview=None, columns: int = 8):
        """A matplotlib figure of the first ``n`` samples of this result (e.g. ``result.most_harmful(8).show(ds)``),
        ``columns`` per row. Each image is titled ``id <sample id> · label <training label>`` (the label where the
        item has one: :func:`~lightning_influence.results.previews.sample_labels`) over its score, red when harmful
        (negative), blue when helpful (positive); the figure's title recalls the convention. ``preview(dataset, ids)
        -> Tensor[N, C, H, W]`` defaults to the training items' image tensors
        (:func:`~lightning_influence.results.previews.image_preview`). Needs matplotlib (``pip install
        lightning-influence[plots]``)."""
        import matplotlib.pyplot as plt

        from lightning_influence.results.previews import image_preview, preview_images

        ids, scores = self.sample_ids[:n].tolist(), self.scores[:n].tolist()
        images = preview_images(preview or image_preview, dataset, ids)
        if images is None:
            raise ValueError("These samples are not images: pass preview=lambda dataset, ids: Tensor[N, C, H, W].")
        columns = max(1, min(columns, len(ids)))
        rows = -(-len(ids) // columns)
        fig, axes = plt.subplots(rows, columns, figsize=(1.9 * columns, 2.3 * rows + 0.4), squeeze=False)
        for ax in axes.flat[len(ids) :]:
            fig.delaxes(ax)
        for ax, image, caption, score in zip(axes.flat, images, _captions(dataset, ids, scores), scores):
            picture = image.permute(1, 2, 0).numpy()
            ax.imshow(picture[..., 0] if picture.shape[-1] == 1 else picture, cmap="gray", interpolation="nearest")
            ax.set_title(caption, fontsize=10, color=_score_color(score))
            ax.axis("off")
        fig.suptitle("score < 0: harmful, > 0: helpful", fontsize=10)
        fig.tight_layout()
        return fig

    def save(self, path) -> None:
        """Write the result to ``path`` (``torch.save`` of plain tensors and strings: ``{"format":
        "lightning-influence/result", "version": 1, "sample_ids", "scores", "per_example", "estimator",
        "definition", "approximation"}``; files written before these existed load with None)."""
        document = {
            "format": RESULT_FORMAT,
            "version": 1,
            "sample_ids": self.sample_ids.cpu(),
            "scores": self.scores.detach().cpu(),
            "per_example": None if self.per_example is None else self.per_example.detach().cpu(),
            "estimator": self.estimator,
            "definition": self.definition,
            "approximation": self.approximation,
        }
        torch.save(document, path)

    @classmethod
    def load(cls, path) -> InfluenceResult:
        """Read a result written by :meth:`save` (``torch.load(weights_only=True)``: no code is run)."""
        document = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(document, dict) or document.get("format") != RESULT_FORMAT:
            raise ValueError(f"{path} is not an InfluenceResult file (expected format {RESULT_FORMAT!r}).")
        definition = document.get("definition")  # absent from files of earlier versions
        return cls(
            document["sample_ids"], document["scores"], document["per_example"], document["estimator"], definition,
            document.get("approximation"),
        )  # fmt: skip


def _captions(dataset, ids: list[int], scores: list[float]) -> list[str]:
    """:meth:`InfluenceResult.show`'s image titles: ``id 12 · label 3`` (no label part without one), the score."""
    from lightning_influence.results.previews import format_score, sample_labels

    labels = sample_labels(dataset, ids)
    return [
        f"id {i}" + ("" if label is None else f" · label {label}") + f"\n{format_score(score)}"
        for i, label, score in zip(ids, labels, scores)
    ]


def _score_color(score: float) -> str:
    """Red when harmful (negative), blue when helpful (positive), grey for zero or NaN."""
    from lightning_influence.results.previews import score_color

    return "#{:02x}{:02x}{:02x}".format(*score_color(score))


RESULT_FORMAT = "lightning-influence/result"
COUNTERFACTUAL = "counterfactual"
"""``InfluenceResult.definition`` of the self-influence of forward-tracked samples: ℓ_j(θ_-j(T)) − ℓ_j(θ(T))."""
IN_RUN = "in-run"
"""``InfluenceResult.definition`` of the in-run self-influence of every sample of a recorded run."""
