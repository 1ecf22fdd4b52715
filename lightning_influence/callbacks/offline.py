"""The offline recipe of data selection in one call: train with the tracker, score, drop, retrain.

K = T (the whole run) in the K-step look-ahead's terms: the full run's influence on a query decides, once,
which samples to drop, and the model is retrained from the same initial weights on the same loader without
them (:class:`~lightning_influence.ExcludeSamples` drops their rows, so every other batch, step and schedule
stays the same: the two runs cost the same number of steps).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_influence.callbacks.exclusion import ExcludeSamples
from lightning_influence.results.result import InfluenceResult


@dataclass
class OfflineSelection:
    """What :func:`offline_selection` did.

    Attributes:
        removed: ``LongTensor[m]``, the dropped ids, most harmful first.
        scores: the full run's influence on the query (every tracked sample).
        full_state: the model's ``state_dict`` after the full run (the model itself ends retrained).
        trainer: the Trainer of the retraining run (its ``callback_metrics``, ``logged_metrics``...).
    """

    removed: torch.Tensor
    scores: InfluenceResult
    full_state: dict[str, Any]
    trainer: pl.Trainer


def most_harmful_ids(result: InfluenceResult, budget: int | float) -> torch.Tensor:
    """The ``budget`` most harmful ids of ``result`` (an int count, or a float fraction of its samples), only
    among samples with a negative score: ``LongTensor[m]``, most harmful first."""
    n = result.scores.numel()
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget < 0:
        raise ValueError(f"budget must be a count (int ≥ 0) or a fraction (float in [0, 1]), got {budget!r}.")
    if isinstance(budget, float):
        if budget > 1:
            raise ValueError(f"A fractional budget must be in [0, 1], got {budget}.")
        budget = math.floor(budget * n + 1e-9)
    return result.most_harmful(budget).sample_ids.clone()


def offline_selection(
    model: pl.LightningModule,
    make_trainer: Callable[[list[Callback]], pl.Trainer],
    tracker: Any,
    query: str,
    budget: int | float,
    train_dataloaders: Any = None,
    val_dataloaders: Any = None,
    datamodule: Any = None,
) -> OfflineSelection:
    """Train ``model`` with ``tracker``, drop the ``budget`` most harmful samples on ``query``, retrain from the
    same initial weights without them. ``model`` ends with the retrained weights.

    Args:
        make_trainer: ``(callbacks) -> Trainer``, called twice (the tracked run, then the retraining run); seed
            inside it (``pl.seed_everything``) so that a shuffling loader gives both runs the same batches.
        tracker: an :class:`~lightning_influence.InfluenceTracker` with ``query`` registered.
        budget: how many samples to drop (int), or which fraction of the tracked samples (float); only samples
            with a negative (harmful) score are dropped, so fewer may be.
        train_dataloaders, val_dataloaders, datamodule: as for ``Trainer.fit``.
    """
    if query not in tracker.config.queries:
        raise ValueError(f"query={query!r} is not registered with the tracker ({sorted(tracker.config.queries)}).")
    initial = copy.deepcopy(model.state_dict())
    make_trainer([tracker]).fit(model, train_dataloaders, val_dataloaders, datamodule)
    scores = tracker.influence(query)
    removed = most_harmful_ids(scores, budget)
    full_state = copy.deepcopy(model.state_dict())
    model.load_state_dict(initial)
    trainer = make_trainer([ExcludeSamples(removed, sample_ids=tracker.config.sample_ids)])
    trainer.fit(model, train_dataloaders, val_dataloaders, datamodule)
    return OfflineSelection(removed, scores, full_state, trainer)
