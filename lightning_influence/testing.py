"""Ground truth for influence: exact counterfactual retraining, and a tiny Lightning module.

``retrain`` replays a training run in plain PyTorch with per-sample weights (w_j = 0 removes
sample j, w_j = 1 ± ε gives finite-difference derivatives), with the same initial weights, the
same batches in the same order, the same optimizer and scheduler, and the batch denominator kept
([concepts.md: The counterfactual run]). ``TinyClassifier`` + ``FixedBatches`` run the very same schedule through a
Lightning ``Trainer``, so a tracked Lightning run and its counterfactuals share every batch.
Tests and benchmarks use these; users can too, to check the tracker on their own small problems.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Iterator, Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset
from torchmetrics.functional import kendall_rank_corrcoef, pearson_corrcoef, spearman_corrcoef

from lightning_influence.sample_ids import IndexedDataset

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]
Schedule = Sequence[Sequence[Sequence[int]]]  # epochs -> batches -> sample ids


def random_schedule(num_samples: int, batch_size: int, epochs: int, seed: int = 0) -> list[list[list[int]]]:
    """A shuffled batch order per epoch (drop_last), reproducible from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(epochs):
        perm = torch.randperm(num_samples, generator=gen).tolist()
        out.append([perm[i : i + batch_size] for i in range(0, num_samples - batch_size + 1, batch_size)])
    return out


def random_classification(
    num_samples: int, dim: int, classes: int, num_query: int = 8, seed: int = 0, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Gaussian inputs with random labels: ``(x [n, dim], y [n], (x_query, y_query))``, reproducible
    from ``seed`` (drawn in float64, then cast to ``dtype``, so every dtype sees the same values)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, dim, generator=gen, dtype=torch.float64)
    y = torch.randint(0, classes, (num_samples,), generator=gen)
    xq = torch.randn(num_query, dim, generator=gen, dtype=torch.float64)
    yq = torch.randint(0, classes, (num_query,), generator=gen)
    return x.to(dtype), y, (xq.to(dtype), yq)


def noisy_label_splits(
    x: torch.Tensor, y: torch.Tensor, n_train: int, n_val: int, flip_fraction: float, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Shuffle ``(x, y)`` into train / val / test (the rest) and flip ``flip_fraction`` of the training labels to
    another class (adding 1..C−1 modulo C). Keys: ``x_tr, y_tr`` (noisy), ``y_tr_clean``, ``flipped``
    (``BoolTensor[n_train]``), ``x_va, y_va, x_te, y_te`` (clean)."""
    classes = int(y.max()) + 1
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=gen)
    tr, va, te = perm[:n_train], perm[n_train : n_train + n_val], perm[n_train + n_val :]
    noisy, flipped = y[tr].clone(), torch.zeros(n_train, dtype=torch.bool)
    flip = torch.randperm(n_train, generator=gen)[: int(round(flip_fraction * n_train))]
    flipped[flip] = True
    noisy[flip] = (noisy[flip] + torch.randint(1, classes, (len(flip),), generator=gen)) % classes
    return {
        "x_tr": x[tr], "y_tr": noisy, "y_tr_clean": y[tr], "flipped": flipped,
        "x_va": x[va], "y_va": y[va], "x_te": x[te], "y_te": y[te],
    }  # fmt: skip


class FixedBatches(Sampler):
    """A batch sampler that yields epoch e's batches of ``schedule``.

    Lightning calls ``set_epoch(e)`` at the start of every training epoch (through the batch sampler's
    ``sampler`` attribute, which is this object), so a run resumed from a checkpoint replays the
    batches of the epoch it resumes in. Without ``set_epoch`` calls (a plain ``for`` loop), the e-th
    iteration yields epoch e; past the schedule's end the last epoch repeats.

    The epoch is read when the first batch is drawn, not when ``iter()`` is called (like PyTorch's
    samplers inside a ``BatchSampler``): Lightning creates the first epoch's iterator, also the one
    of a resumed epoch, before it calls ``set_epoch``.
    """

    def __init__(self, schedule: Schedule) -> None:
        self.schedule = [[list(b) for b in epoch] for epoch in schedule]
        self._epoch = 0

    @property
    def sampler(self) -> FixedBatches:
        """Lightning's ``_set_sampler_epoch`` looks for ``set_epoch`` on ``batch_sampler.sampler``."""
        return self

    def set_epoch(self, epoch: int) -> None:
        """The next iteration yields epoch ``epoch``'s batches (then the counter moves on as before)."""
        self._epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.schedule[0])

    def __iter__(self) -> Iterator[list[int]]:
        epoch = self._epoch  # a generator: runs at the first next(), after Lightning's set_epoch
        self._epoch += 1
        yield from (list(b) for b in self.schedule[min(epoch, len(self.schedule) - 1)])


def cross_entropy_losses(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy (``Tensor[B]``); a single logit column means binary logistic loss; logits
    ``[B, L, V]`` of a sequence model against targets ``[B, L]`` give each sequence's mean token loss."""
    out = net(x)
    if out.dim() == 3:
        return F.cross_entropy(out.transpose(1, 2), y, reduction="none").mean(dim=1)
    if out.shape[-1] == 1:
        return F.binary_cross_entropy_with_logits(out.squeeze(-1), y.to(out.dtype), reduction="none")
    return F.cross_entropy(out, y, reduction="none")


def retrain(
    net: nn.Module,
    make_optimizer: OptimizerFactory,
    x: torch.Tensor,
    y: torch.Tensor,
    schedule: Schedule,
    weights: torch.Tensor | None = None,
    make_scheduler: SchedulerFactory | None = None,
    accumulate: int = 1,
    clip_norm: float | None = None,
    clip_value: float | None = None,
    grad_log: list[torch.Tensor] | None = None,
) -> nn.Module:
    """Train a deep copy of ``net`` on ``schedule`` with per-sample ``weights`` (default all 1).

    Without accumulation, the step-t loss is ``Σ_{i∈B_t} w_i ℓ_i / |B_t|`` (denominator kept); a
    scheduler is stepped after every optimizer step. Returns the trained copy.

    Args:
        accumulate: gradient accumulation as ``Trainer(accumulate_grad_batches=accumulate)`` does it:
            consecutive groups of ``accumulate`` batches of each epoch (the groups restart at every
            epoch; the last group of an epoch may be shorter) make one optimizer step whose loss is
            ``Σ_m mean_m / accumulate`` (a short group is still divided by ``accumulate``); the
            scheduler steps once per optimizer step (Lightning's ``interval="step"``).
        clip_norm, clip_value: gradient clipping as ``Trainer(gradient_clip_val=c,
            gradient_clip_algorithm="norm" | "value")`` applies it between backward and the optimizer
            step: ``clip_grad_norm_`` / ``clip_grad_value_`` over all the optimizer's parameters.
        grad_log: if a list, the unclipped gradient of every step (``Tensor[p]``, the optimizer's
            parameters flattened in param-group order) is appended to it, e.g. to check that a
            clipping threshold really clips.
    """
    if accumulate < 1:
        raise ValueError("accumulate must be a positive integer.")
    if clip_norm is not None and clip_value is not None:
        raise ValueError("Pass at most one of clip_norm and clip_value.")
    net = copy.deepcopy(net)
    weights = torch.ones(len(x), dtype=x.dtype) if weights is None else weights
    opt = make_optimizer(net)
    sched = make_scheduler(opt) if make_scheduler else None
    params = [p for group in opt.param_groups for p in group["params"]]
    for epoch in schedule:
        for start in range(0, len(epoch), accumulate):
            opt.zero_grad()
            for ids in epoch[start : start + accumulate]:
                idx = torch.as_tensor(ids)
                loss = (weights[idx] * cross_entropy_losses(net, x[idx], y[idx])).sum() / len(idx)
                (loss / accumulate if accumulate > 1 else loss).backward()
            if grad_log is not None:
                grad_log.append(torch.cat([p.grad.detach().reshape(-1) for p in params if p.grad is not None]))
            if clip_norm is not None:  # what Lightning's precision plugin calls, on the optimizer's params
                torch.nn.utils.clip_grad_norm_(params, clip_norm)
            if clip_value is not None:
                torch.nn.utils.clip_grad_value_(params, clip_value)
            opt.step()
            if sched is not None:
                sched.step()
    return net


def mean_loss(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(cross_entropy_losses(net, x, y).mean())


def leave_one_out(
    net: nn.Module,
    make_optimizer: OptimizerFactory,
    x: torch.Tensor,
    y: torch.Tensor,
    schedule: Schedule,
    query: tuple[torch.Tensor, torch.Tensor],
    ids: Sequence[int],
    make_scheduler: SchedulerFactory | None = None,
    **retrain_kwargs,
) -> torch.Tensor:
    """Exact leave-one-out scores ``f(θ_-j(T)) − f(θ(T))`` for each id (f = mean query loss); ``retrain_kwargs``
    (``accumulate``, ``clip_norm``, ``clip_value``) go to :func:`retrain`."""
    base = mean_loss(retrain(net, make_optimizer, x, y, schedule, None, make_scheduler, **retrain_kwargs), *query)
    out = []
    for j in ids:
        w = torch.ones(len(x), dtype=x.dtype)
        w[j] = 0
        trained = retrain(net, make_optimizer, x, y, schedule, w, make_scheduler, **retrain_kwargs)
        out.append(mean_loss(trained, *query) - base)
    return torch.tensor(out, dtype=torch.float64)


def removal_derivative(
    net: nn.Module,
    make_optimizer: OptimizerFactory,
    x: torch.Tensor,
    y: torch.Tensor,
    schedule: Schedule,
    query: tuple[torch.Tensor, torch.Tensor],
    j: int,
    make_scheduler: SchedulerFactory | None = None,
    eps: float = 1e-4,
    **retrain_kwargs,
) -> float:
    """``−d f(θ_T)/d w_j`` by central differences of two re-trainings (w_j = 1 ± eps): the exact
    first-order prediction of removing sample j (f = mean query loss). ``retrain_kwargs`` go to
    :func:`retrain` (``accumulate``, ``clip_norm``, ``clip_value``)."""
    values = []
    for w_j in (1 + eps, 1 - eps):
        w = torch.ones(len(x), dtype=x.dtype)
        w[j] = w_j
        trained = retrain(net, make_optimizer, x, y, schedule, w, make_scheduler, **retrain_kwargs)
        values.append(mean_loss(trained, *query))
    return -(values[0] - values[1]) / (2 * eps)


def agreement(pred: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    """How well estimated scores ``pred`` follow ground truth ``truth`` (both ``Tensor[k]``): Spearman,
    Kendall τ, Pearson and the relative RMSE ``‖pred − truth‖ / ‖truth‖``."""
    return {
        "spearman": float(spearman_corrcoef(pred, truth)),
        # torchmetrics types the result as Tensor | (tau, p-value) whatever t_test is (no overload): a Tensor here
        "kendall": float(kendall_rank_corrcoef(pred, truth)),  # type: ignore[arg-type]
        "pearson": float(pearson_corrcoef(pred, truth)),
        "rel_rmse": float((pred - truth).norm() / truth.norm()),
    }


class TinyClassifier(pl.LightningModule):
    """A minimal LightningModule around ``net`` for ``(x, y, ids)`` batches, with per-sample weights.

    ``per_sample_loss`` is the tracker's default loss hook; ``training_step`` returns the weighted
    mean ``Σ w_i ℓ_i / B`` (weights all 1 unless given), matching :func:`retrain`.
    """

    def __init__(
        self,
        net: nn.Module,
        make_optimizer: OptimizerFactory,
        make_scheduler: SchedulerFactory | None = None,
        weights: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.make_optimizer = make_optimizer
        self.make_scheduler = make_scheduler
        self.weights = weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def per_sample_loss(self, batch) -> torch.Tensor:
        return cross_entropy_losses(self.net, batch[0], batch[1])

    def training_step(self, batch, batch_idx):
        losses = self.per_sample_loss(batch)
        if self.weights is not None:
            losses = losses * self.weights.to(losses)[batch[-1]]
        return losses.sum() / len(losses)

    def configure_optimizers(self):
        opt = self.make_optimizer(self.net)
        if self.make_scheduler is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.make_scheduler(opt), "interval": "step"}}


def fixed_loader(x: torch.Tensor, y: torch.Tensor, schedule: Schedule) -> DataLoader:
    """A DataLoader of ``(x, y, ids)`` batches that follows ``schedule`` exactly."""
    return DataLoader(IndexedDataset(TensorDataset(x, y)), batch_sampler=FixedBatches(schedule))


def lightning_trainer(epochs: int, precision: str = "64-true", **kwargs) -> pl.Trainer:
    """A quiet CPU Trainer for small checks."""
    opts: dict[str, Any] = dict(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    opts.update(kwargs)
    return pl.Trainer(**opts)


def seeded_fit(
    net: nn.Module,
    make_optimizer: OptimizerFactory,
    x: torch.Tensor,
    y: torch.Tensor,
    schedule: Schedule,
    weights: torch.Tensor | None = None,
    callbacks: Sequence[pl.Callback] = (),
    seed: int = 11,
) -> TinyClassifier:
    """Train a copy of ``net`` with Lightning from ``pl.seed_everything(seed)``: the ground truth of a model that draws
    (dropout). Runs with the same seed draw the same masks, so runs with per-sample ``weights`` (w_j = 1 ± ε, or 0)
    are the counterfactuals of the run the tracker followed ([concepts.md: Random draws])."""
    pl.seed_everything(seed, verbose=False)
    module = TinyClassifier(copy.deepcopy(net), make_optimizer, weights=weights)
    lightning_trainer(len(schedule), callbacks=list(callbacks)).fit(module, fixed_loader(x, y, schedule))
    return module


def eval_query_loss(module: TinyClassifier, query: tuple[torch.Tensor, torch.Tensor]) -> float:
    """The mean loss of ``query`` with the module in eval mode, as Lightning validates (and as queries are scored)."""
    module.eval()
    with torch.no_grad():
        return float(module.per_sample_loss(query).mean())
