"""The linear datamodeling score (LDS) of a tracker's scores, measured by retraining on random subsets.

``linear_datamodeling_score`` trains M models with Lightning, each on a random half (``fraction``) of the scored
training samples, evaluates the query on each, and compares with the sum of the removed samples' scores
(:mod:`lightning_influence.results.lds`). It is ground truth on the user's own problem, as the audit is for single
samples, at the cost of M training runs.

How a subset model trains (the contract): the user's module and Trainer, the user's training loader, and a training
step replaced, on the instance, by the weighted mean ``Σ_i w_i ℓ_i / B`` of the module's per-sample losses
(``per_sample_loss(batch)``, or ``loss_fn``), with ``w_i = 0`` for a removed sample and 1 otherwise, the batch
denominator B kept, plus ``regularizer(module)`` when given. This is the loss the tracker models (the batch mean of
``per_sample_loss``, plus its ``regularizer``) with the counterfactual weights of [concepts.md: The counterfactual
run]; anything else the module's own ``training_step`` does (logging, extra terms) does not run in the subset models.
"""

from __future__ import annotations

import os
import pickle
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any, Callable

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import move_data_to_device
from torch import nn
from torch.utils.data import DataLoader

from lightning_influence.results.lds import VARIANTS, LDSReport, LDSVariant, lds_from, predicted_changes, subset_masks
from lightning_influence.results.result import InfluenceResult
from lightning_influence.sample_ids import SampleIdsFn, default_sample_ids

__all__ = ["linear_datamodeling_score", "subset_query_losses"]

LossFn = Callable[[nn.Module, Any], torch.Tensor]
RegularizerFn = Callable[[nn.Module], torch.Tensor]


@dataclass(frozen=True)
class _Job:
    """Everything one subset model needs (pickled to a worker process when ``processes > 1``)."""

    make_module: Callable[[int], pl.LightningModule]
    make_trainer: Callable[[], pl.Trainer]
    train: DataLoader
    query: Any
    loss_fn: LossFn | None
    sample_ids: SampleIdsFn
    regularizer: RegularizerFn | None
    num_threads: int | None = None
    fresh_order: bool = False  # a loader's own generator seeded by each model's seed (else its initial seed)


def _per_sample_loss(module: pl.LightningModule, loss_fn: LossFn | None) -> Callable[[Any], torch.Tensor]:
    if loss_fn is not None:
        return lambda batch: loss_fn(module, batch)
    method = getattr(module, "per_sample_loss", None)
    if not callable(method):
        raise TypeError(
            f"{type(module).__name__} has no `per_sample_loss(batch)` method returning Tensor[B]: add one (the"
            " tracker's loss hook), or pass loss_fn=(module, batch) -> Tensor[B]."
        )
    return method


def _weighted_step(job: _Job, module: pl.LightningModule, weights: torch.Tensor) -> Callable[..., torch.Tensor]:
    """The training step of a subset model: ``Σ_i w_i ℓ_i / B`` (+ regularizer)."""
    losses_of = _per_sample_loss(module, job.loss_fn)

    def training_step(batch: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        losses = losses_of(batch)
        ids = torch.as_tensor(job.sample_ids(batch)).to(device=weights.device, dtype=torch.long)
        loss = (weights[ids].to(losses) * losses).sum() / losses.shape[0]
        if job.regularizer is not None:
            loss = loss + job.regularizer(module)
        return loss

    return training_step


def _train_and_query(job: _Job, weights: torch.Tensor, seed: int) -> torch.Tensor:
    """Train ``make_module(seed)`` from ``seed_everything(seed)`` with per-sample ``weights``; the query's per-example
    losses (float64 ``Tensor[n]``) in eval mode, without gradients."""
    if job.num_threads is not None:
        torch.set_num_threads(job.num_threads)
    pl.seed_everything(seed, verbose=False)
    for generator in _own_generators(job.train):
        generator.manual_seed(seed if job.fresh_order else generator.initial_seed())
    module = job.make_module(seed)
    module.training_step = _weighted_step(job, module, weights)  # type: ignore[method-assign]
    job.make_trainer().fit(module, job.train)
    module.eval()
    with torch.no_grad():
        losses = _per_sample_loss(module, job.loss_fn)(move_data_to_device(job.query, module.device))
    return losses.detach().reshape(-1).to(torch.float64).cpu()


def _own_generators(train: DataLoader) -> list[torch.Generator]:
    """The generators the loader draws its order from, when it has its own (not the global one): the loader's, its
    sampler's, its batch sampler's sampler's."""
    sampler = getattr(train, "batch_sampler", None)
    candidates = (train.generator, getattr(train.sampler, "generator", None),
                  getattr(getattr(sampler, "sampler", None), "generator", None))  # fmt: skip
    found: list[torch.Generator] = []
    for generator in candidates:
        if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
            found.append(generator)
    return found


def _check_fresh_seeds(make_module: Callable[[int], pl.LightningModule], seeds: list[int]) -> None:
    """``ValueError`` when ``make_module`` builds the same initial weights from two seeds (it seeds the generator
    itself with a constant): every "fresh-seed" model would start as the same-seed ones, and the LDS would not be the
    fresh-seed one it says."""
    if len(set(seeds)) < 2:
        return
    first, second = sorted(set(seeds))[:2]
    built = []
    for seed in (first, second):
        pl.seed_everything(seed, verbose=False)
        built.append([p.detach().clone() for p in make_module(seed).parameters()])
    if all(torch.equal(a, b) for a, b in zip(*built)):
        raise ValueError(
            f"make_module({first}) and make_module({second}) build the same initial weights: it seeds the random"
            " generator with a constant (e.g. torch.manual_seed(0) inside), so the fresh-seed models would start from"
            " the tracked run's weights. Seed it with the seed it is given (torch.manual_seed(seed)), or not at all."
        )


def _check_picklable(job: _Job) -> None:
    try:
        pickle.dumps(job)
    except Exception as err:  # pickling raises many kinds (PicklingError, AttributeError, TypeError)
        raise ValueError(
            "processes > 1 sends make_module, make_trainer, the training loader, the query, loss_fn, sample_ids and"
            " regularizer to 'spawn' worker processes, so they must be picklable: module-level functions and"
            f" classes, no lambdas or local functions ({type(err).__name__}: {err}). Or use processes=1."
        ) from err


def subset_query_losses(
    weights: torch.Tensor,
    seeds: list[int],
    train: DataLoader,
    query: Any,
    make_module: Callable[[int], pl.LightningModule],
    make_trainer: Callable[[], pl.Trainer],
    loss_fn: LossFn | None = None,
    sample_ids: SampleIdsFn | None = None,
    regularizer: RegularizerFn | None = None,
    processes: int = 1,
    variant: LDSVariant = "same-seed",
) -> torch.Tensor:
    """The query's per-example losses (float64 ``Tensor[M, n]``) of M models trained with per-sample ``weights[m]``
    (``Tensor[M, N]``, indexed by sample id) from seed ``seeds[m]`` (see :func:`linear_datamodeling_score`).

    A training loader with its own ``generator`` (``DataLoader(..., shuffle=True, generator=g)``, or a sampler's) is
    reseeded before each model: with ``g.initial_seed()`` for ``variant="same-seed"`` (the batch order of a run that
    started from ``g`` freshly seeded, as the tracked run did, however far ``g`` has advanced since), with the model's
    seed for ``"fresh-seed"``; its state is put back afterwards."""
    job = _Job(make_module, make_trainer, train, query, loss_fn, sample_ids or default_sample_ids, regularizer,
               fresh_order=variant == "fresh-seed")  # fmt: skip
    states = [(g, g.get_state()) for g in _own_generators(train)]
    try:
        return _all_losses(job, weights, seeds, processes)
    finally:
        for generator, state in states:
            generator.set_state(state)


def _all_losses(job: _Job, weights: torch.Tensor, seeds: list[int], processes: int) -> torch.Tensor:
    if processes <= 1 or len(seeds) <= 1:
        return torch.stack([_train_and_query(job, w, s) for w, s in zip(weights, seeds)])
    workers = min(processes, len(seeds))
    job = _Job(**{**job.__dict__, "num_threads": max(1, (os.cpu_count() or 1) // workers)})
    _check_picklable(job)
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(_train_and_query, job, w.clone(), s) for w, s in zip(weights, seeds)]
        return torch.stack([f.result() for f in futures])


def _score_table(scores: InfluenceResult, num_query: int) -> torch.Tensor:
    """``Tensor[k]`` (the query as a whole) or ``Tensor[k, n]`` (per example) of the result's scores."""
    table = scores.per_example if scores.per_example is not None else scores.scores
    table = table.detach().to(torch.float64).cpu()
    if not torch.isfinite(table).all():
        raise ValueError("The scores hold NaN or inf: the LDS needs finite scores.")
    if table.dim() == 2 and table.shape[1] != num_query:
        raise ValueError(
            f"The result has per-example scores for {table.shape[1]} query examples, the query has {num_query}:"
            " pass the query the scores were computed for."
        )
    return table


def linear_datamodeling_score(
    scores: InfluenceResult,
    train: DataLoader,
    query: Any,
    make_module: Callable[[int], pl.LightningModule],
    make_trainer: Callable[[], pl.Trainer],
    num_subsets: int = 32,
    fraction: float = 0.5,
    variant: LDSVariant = "same-seed",
    seed: int = 0,
    processes: int = 1,
    subset_seed: int = 0,
    loss_fn: LossFn | None = None,
    sample_ids: SampleIdsFn | None = None,
    regularizer: RegularizerFn | None = None,
    num_bootstrap: int = 200,
) -> LDSReport:
    """Retrain on ``num_subsets`` random subsets and report the LDS of ``scores`` (with its standard error).

    Subsets are drawn over the scored samples (``scores.sample_ids``; samples without a score always stay), each
    keeping ``⌊fraction · k⌋`` of the k scored samples (:func:`~lightning_influence.results.lds.subset_masks`, from
    ``subset_seed``). For subset m the prediction is the sum of the removed samples' scores (negative = harmful:
    removing them lowers the loss), the actual value the query loss of the subset model; the LDS is their Spearman
    correlation over the subsets, per query example when ``scores.per_example`` is set (else for the query's mean
    loss), averaged over the examples. The standard error is a bootstrap over the subsets
    (:func:`~lightning_influence.results.lds.lds_from`).

    Args:
        scores: the tracker's :class:`~lightning_influence.InfluenceResult` for ``query`` (from
            ``influence(query, per_example=True)`` for per-example LDS).
        train: the training ``DataLoader`` of the tracked run, yielding batches whose sample ids ``sample_ids(batch)``
            reads (default: the :class:`~lightning_influence.IndexedDataset` convention).
        query: the query batch, scored in eval mode with ``per_sample_loss`` (or ``loss_fn``).
        make_module: ``(seed) -> LightningModule`` with a ``per_sample_loss(batch) -> Tensor[B]`` method (or pass
            ``loss_fn``); its ``training_step`` is replaced (see the module docstring).
        make_trainer: ``() -> pl.Trainer``, a fresh Trainer as the tracked run used (same epochs, precision,
            accumulation, clipping), without the tracker (a tracker would only slow the subset runs down).
        variant: ``"same-seed"``: every subset model is ``make_module(seed)`` trained after
            ``pl.seed_everything(seed)``, so with a deterministic loader (a fixed sampler, a shuffle drawn from
            the seeded global generator, or from the loader's own generator, reseeded with its initial seed before
            each model) it shares the tracked run's initial weights, batches and random draws, the removed samples
            at weight 0: the counterfactual the scores model (pass the seed of the tracked run).
            ``"fresh-seed"``: model m uses seed ``seed + 1 + m`` instead (new initial weights, a new shuffle order
            when the loader shuffles, its own generator seeded with that seed, new dropout draws), still with
            weight 0 for the removed samples; a fixed batch sampler keeps its batches. A ``make_module`` that builds
            the same weights from two seeds (it seeds with a constant) is refused (``ValueError``).
        processes: how many subset models train at once. More than 1 uses a ``ProcessPoolExecutor`` with the
            ``'spawn'`` start method (each worker gets ``cpu_count // processes`` torch threads), so every argument
            must be picklable (module-level functions, no lambdas); each worker pays for importing torch and
            Lightning, so it pays off only when one fit takes several seconds.
        loss_fn, sample_ids, regularizer: as the tracker's arguments of the same names.
        num_bootstrap: resamples of the subsets for the standard error.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}.")
    ids = scores.sample_ids.detach().cpu().long().reshape(-1)
    if ids.numel() != ids.unique().numel():
        raise ValueError("The result's sample ids repeat: pass one score per training sample.")
    table = _score_table(
        scores, _query_size(query, make_module, loss_fn, seed) if scores.per_example is not None else 0
    )
    masks = subset_masks(ids.numel(), num_subsets, fraction, subset_seed)
    size = max(_dataset_size(train), int(ids.max()) + 1 if ids.numel() else 0)
    weights = torch.ones(num_subsets, size, dtype=torch.float64)
    weights[:, ids] = masks.to(torch.float64)  # scored samples: 1 if kept, 0 if removed
    seeds = [seed] * num_subsets if variant == "same-seed" else [seed + 1 + m for m in range(num_subsets)]
    if variant == "fresh-seed":
        _check_fresh_seeds(make_module, seeds)
    losses = subset_query_losses(
        weights, seeds, train, query, make_module, make_trainer, loss_fn, sample_ids, regularizer, processes, variant
    )
    actual = losses if scores.per_example is not None else losses.mean(dim=1, keepdim=True)
    predicted = predicted_changes(table, masks)
    return lds_from(predicted, actual, fraction, variant, num_bootstrap, seed=subset_seed)


def _dataset_size(train: DataLoader) -> int:
    try:
        return len(train.dataset)  # type: ignore[arg-type]
    except TypeError:  # an iterable dataset without a length: the ids say how many
        return 0


def _query_size(query: Any, make_module: Callable[[int], pl.LightningModule], loss_fn: LossFn | None, seed: int) -> int:
    """How many examples the query holds: one evaluation of a fresh module (before any training run, so that a
    query that does not match the scores fails at once)."""
    module = make_module(seed)
    module.eval()
    with torch.no_grad():
        return int(_per_sample_loss(module, loss_fn)(move_data_to_device(query, module.device)).numel())
