"""Bad inputs refused at the earliest moment, by name (issue 24): non-finite queries at every entry point,
half-precision parameters, sizes and budgets checked before anything is allocated, samplers that draw with
replacement.

Each test reproduces the case through the public API on a small float64 problem and checks the error's class and
message (the problem, where, the fix), or the numbers.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, RandomSampler, TensorDataset, WeightedRandomSampler

from lightning_influence import (
    IndexedDataset,
    InfluenceConfigurationError,
    InfluenceTracker,
    NonFiniteInfluenceError,
)

NAN = float("nan")


def fit(make_trainer, model, loader, tracker, **trainer_kwargs):
    trainer = make_trainer(tracker, **trainer_kwargs)
    trainer.fit(model, train_dataloaders=loader)
    return trainer


def query_batch(data, bad_row: int | None = None, value: float = NAN) -> tuple[torch.Tensor, torch.Tensor]:
    """The first 8 training samples as an ``(x, y)`` query batch, with ``value`` in row ``bad_row``."""
    x, y = data
    x = x[:8].clone()
    if bad_row is not None:
        x[bad_row, 1] = value
    return x, y[:8]


class QueryBatches:
    """An iterable of query batches (a DataLoader's stand-in): 2 batches of 4, ``bad`` (batch, row) set to NaN."""

    def __init__(self, data, bad: tuple[int, int] | None = None) -> None:
        x, y = query_batch(data)
        self.batches = [(x[:4].clone(), y[:4]), (x[4:].clone(), y[4:])]
        if bad is not None:
            self.batches[bad[0]][0][bad[1], 0] = NAN

    def __iter__(self):
        return iter(self.batches)


# ------------------------------------------------------------------------------------ 1. NaN/inf in a query


@pytest.mark.parametrize("value", [NAN, float("inf")])
def test_non_finite_query_batch_is_refused_at_registration(data, value):
    with pytest.raises(NonFiniteInfluenceError, match=r"queries\['val'\] holds NaN or inf: queries\['val'\]\[0\] \(1 of"
                       r" 32 values\).*Drop or fix those samples"):  # fmt: skip
        InfluenceTracker(queries={"val": query_batch(data, bad_row=5, value=value)})
    with pytest.raises(NonFiniteInfluenceError, match=r"queries\['d'\]\['x'\] \(1 of 32 values\)"):
        x, y = query_batch(data, bad_row=0, value=value)
        InfluenceTracker(queries={"d": {"x": x, "y": y}})


@pytest.mark.parametrize("estimator", ["acc", "exact", "tracin"])
def test_non_finite_query_loader_is_refused_when_first_evaluated_and_never_written(
    make_trainer, make_model, train_loader, data, tmp_path, estimator
):
    tracker = InfluenceTracker(
        queries={"val": QueryBatches(data, bad=(1, 2))}, window_every_n_steps=1, dirpath=tmp_path, estimator=estimator
    )
    # the forward estimators evaluate the query at the first window; TracIn at the first step's parameters
    where = "at the parameters of a training step" if estimator == "tracin" else "at the window ending at step 1"
    which = r"samples \[6\], counted over its batches; the first in batch 1"
    with pytest.raises(NonFiniteInfluenceError, match=rf"Registered query 'val' {where}: its loss is NaN or inf on 1 of"
                       rf" its 8 samples \({which}\)"):  # fmt: skip
        fit(make_trainer, make_model(), train_loader, tracker)
    windows = tmp_path / "windows.jsonl"
    assert not windows.exists() or not windows.read_text().strip()


def test_non_finite_query_after_fit_is_refused_by_name(make_trainer, make_model, train_loader, data):
    tracker = InfluenceTracker(queries={"val": query_batch(data)}, window_every_n_steps=1)
    fit(make_trainer, make_model(), train_loader, tracker)
    assert all(bool(torch.isfinite(w.scores).all()) for w in tracker.windows("val"))
    bad = query_batch(data, bad_row=3)
    fix = r"Check those samples' inputs and targets for NaN/inf"
    with pytest.raises(NonFiniteInfluenceError, match=rf"The query at the end of fit \(step 3\): its loss is NaN or inf"
                       rf" on 1 of its 8 samples \(samples \[3\]\).*{fix}"):  # fmt: skip
        tracker.influence(bad)
    with pytest.raises(NonFiniteInfluenceError, match=r"\(step 3\): its loss is NaN or inf on 1 of its 8 samples"):
        tracker.influence(bad, per_example=True)
    with pytest.raises(NonFiniteInfluenceError, match=r"batches; the first in batch 1"):
        tracker.influence(QueryBatches(data, bad=(1, 0)))
    with pytest.raises(NonFiniteInfluenceError, match=r"The query at the end of fit \(step 3\): the callable returned"):
        tracker.influence(lambda m: m.net.weight.sum() * NAN)
    # a finite value whose gradient is not: the square root of 0
    with pytest.raises(NonFiniteInfluenceError, match=r"value is finite but its gradient holds NaN or inf"):
        tracker.influence(lambda m: (m.net.weight - m.net.weight.detach()).pow(2).sum().sqrt())
    assert torch.isfinite(tracker.influence(query_batch(data)).scores).all()  # the fit is intact


def test_non_finite_query_is_refused_by_the_exact_estimator_after_fit(make_trainer, make_model, train_loader, data):
    tracker = InfluenceTracker(estimator="exact")
    fit(make_trainer, make_model(), train_loader, tracker)
    with pytest.raises(NonFiniteInfluenceError, match=r"at the end of fit \(step 3\): its loss is NaN or inf on 1"):
        tracker.influence(query_batch(data, bad_row=7))


def test_non_finite_query_loader_is_refused_by_the_all_samples_replay(make_trainer, make_model, train_loader, data):
    tracker = InfluenceTracker(track=(), record_trajectory=True, queries={"val": QueryBatches(data, bad=(0, 1))})
    fit(make_trainer, make_model(), train_loader, tracker)  # record-only: the query is not evaluated while training
    with pytest.raises(NonFiniteInfluenceError, match=r"its loss is NaN or inf on 1 of its 8 samples \(samples \[1\]"):
        tracker.influence("val", all_samples=True)
    with pytest.raises(NonFiniteInfluenceError, match=r"its loss is NaN or inf"):
        tracker.windows("val", all_samples=True)
    assert torch.isfinite(tracker.influence(QueryBatches(data), all_samples=True).scores).all()


# ------------------------------------------------------------------------ 2. half-precision parameters


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_parameters_under_32_true_are_refused_at_fit_start(
    make_trainer, make_model, train_loader, dtype
):
    model = make_model()
    model.net.to(dtype)
    match = rf"half-precision parameters \('net.weight', 'net.bias': {dtype}\) under precision='32-true'.*float64"
    with pytest.raises(InfluenceConfigurationError, match=match):
        fit(make_trainer, model, train_loader, InfluenceTracker(), precision="32-true")


# ------------------------------------------------------------------ 3. sizes checked before allocating


class IterableXY(IterableDataset):
    """Yields ``(x, y, id)`` items; has no ``__len__``."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __iter__(self):
        for i in range(len(self.x)):
            yield self.x[i], self.y[i], i


@pytest.mark.parametrize("record_only", [False, True])
def test_num_samples_larger_than_the_dataset_is_refused(make_trainer, make_model, train_loader, record_only):
    kwargs = {"track": (), "record_trajectory": True} if record_only else {}
    tracker = InfluenceTracker(num_samples=10**8, **kwargs)
    with pytest.raises(InfluenceConfigurationError, match=r"num_samples=100000000 is larger than the training set,"
                       r" whose length is 24.*pass num_samples=24"):  # fmt: skip
        fit(make_trainer, make_model(), train_loader, tracker)


def test_states_over_budget_are_refused_before_anything_is_allocated(make_trainer, make_model, data):
    """Every sample of a 10^8-sample stream tracked: the states alone are 10^8 × 15 × 8 bytes, refused from their
    figure in well under a second, without allocating the ids (0.8 GiB) or anything of that size."""
    loader = DataLoader(IterableXY(*data), batch_size=8)
    tracker = InfluenceTracker(track=None, num_samples=10**8, sample_ids=lambda batch: batch[-1])
    with pytest.raises(InfluenceConfigurationError, match=r"needs ≈ 33.53 GiB at its peak, while a checkpoint is saved"
                       r" \(3 × the states' 11.18 GiB: .*k=100000000 samples × p=15 parameters × 1 state block\(s\) ×"
                       r" 8 bytes. That is over max_memory_bytes=4294967296 \(4.00 GiB\)"):  # fmt: skip
        fit(make_trainer, make_model(), loader, tracker, enable_checkpointing=True)
    without_checkpoints = InfluenceTracker(track=None, num_samples=10**8, sample_ids=lambda batch: batch[-1])
    with pytest.raises(InfluenceConfigurationError, match=r"needs ≈ 11.18 GiB at its peak, during a step"):
        fit(make_trainer, make_model(), loader, without_checkpoints)


def test_record_only_with_a_large_num_samples_stays_small(make_trainer, make_model, data):
    """A stream without a length: num_samples is believed, and the fit's tables are O(tracked), not O(num_samples)."""
    loader = DataLoader(IterableXY(*data), batch_size=8)
    tracker = InfluenceTracker(
        track=(), record_trajectory=True, record_batches=True, num_samples=10**8, sample_ids=lambda b: b[-1]
    )
    fit(make_trainer, make_model(), loader, tracker)
    assert tracker.steps_booked > 0  # (its peak memory was measured by hand: below 300 MiB, was 2.2 GiB)


# ------------------------------------------------------------------ 4. the memory check uses the real peak


def test_memory_check_uses_the_checkpoint_peak(make_trainer, make_model, data):
    """States of k=96 samples × p=15 × 8 bytes = 11520 bytes; a checkpoint save holds 3 × that. A budget of 2.5 × the
    states covers a step (states plus one HVP row of workspace) but not the save: refused, naming the save."""
    x, y = data
    big = IndexedDataset(TensorDataset(x.repeat(4, 1), y.repeat(4)))
    loader = DataLoader(big, batch_size=8)
    states = 96 * 15 * 8
    tracker = InfluenceTracker(track=None, hvp_chunk_size=1, max_memory_bytes=int(2.5 * states))
    with pytest.raises(InfluenceConfigurationError, match=r"needs ≈ 33.75 KiB at its peak, while a checkpoint is saved"
                       r" \(3 × the states' 11.25 KiB: .*k=96 samples × p=15 .*over max_memory_bytes=28800"
                       r" \(28.12 KiB\). Track fewer samples"):  # fmt: skip
        fit(make_trainer, make_model(), loader, tracker, enable_checkpointing=True)
    # a Trainer that saves no checkpoint never reaches that peak: the same budget covers its steps
    budget = int(2.5 * states)
    fit(make_trainer, make_model(), loader, InfluenceTracker(track=None, hvp_chunk_size=1, max_memory_bytes=budget))
    # the step's own peak, when it is the larger one, is named as such
    tracker = InfluenceTracker(track=[0, 1], max_memory_bytes=3 * 2 * 15 * 8 + 1)
    with pytest.raises(InfluenceConfigurationError, match=r"at its peak, during a step \(the states' 0.23 KiB and"
                       r" the HVP workspace\).*lower hvp_memory_bytes"):  # fmt: skip
        fit(make_trainer, make_model(), loader, tracker)


# -------------------------------------------------------------------- 5. samplers with replacement


@pytest.mark.parametrize(
    "make_sampler",
    [
        pytest.param(lambda n: WeightedRandomSampler(torch.ones(n, dtype=torch.float64), n), id="weighted"),
        pytest.param(lambda n: RandomSampler(range(n), replacement=True), id="random-replacement"),
    ],
)
def test_sampler_with_replacement_is_refused_before_the_first_batch(make_trainer, make_model, train_set, make_sampler):
    loader = DataLoader(train_set, batch_size=8, sampler=make_sampler(len(train_set)))
    trainer = make_trainer(InfluenceTracker())
    name = type(loader.sampler).__name__
    with pytest.raises(InfluenceConfigurationError, match=rf"sampler, {name} with replacement=True, can draw one"
                       r" training sample twice into a batch of 8.*sample without replacement within a batch.*"
                       r"sample_ids="):  # fmt: skip
        trainer.fit(make_model(), train_dataloaders=loader)
    assert trainer.global_step == 0


@pytest.mark.filterwarnings("ignore:.*never appeared in an optimizer step")
def test_sampler_with_replacement_is_accepted_for_batches_of_one(make_trainer, make_model, train_set):
    sampler = WeightedRandomSampler(torch.ones(len(train_set), dtype=torch.float64), 6)
    tracker = InfluenceTracker()
    fit(make_trainer, make_model(), DataLoader(train_set, batch_size=1, sampler=sampler), tracker)
    assert tracker.steps_booked == 6
