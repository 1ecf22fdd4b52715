"""Online data selection (``InfluenceDataSelector``), ``ExcludeSamples`` and the offline recipe.

Ground truth, float64: the selector's run is replayed in plain PyTorch on the batches it really trained on
(removed rows dropped), and the tracker's scores for that run are checked against exact leave-one-out
retraining (``"exact"``) and finite differences (``"first-order"``) on those batches.
"""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_influence import (
    ExcludeSamples,
    InfluenceConfigurationError,
    InfluenceDataSelector,
    InfluenceTracker,
    SelectionPolicy,
    load_selection,
    most_harmful_ids,
    offline_selection,
)
from lightning_influence.results.selection import drop_rows
from lightning_influence.testing import (
    TinyClassifier,
    fixed_loader,
    leave_one_out,
    lightning_trainer,
    random_classification,
    random_schedule,
    removal_derivative,
    retrain,
)

N, D, C = 24, 4, 3


def _data():
    return random_classification(N, D, C)


def _net() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(D, 6), nn.Tanh(), nn.Linear(6, C)).double()


def _sgd(m: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.5)


class Recorded(TinyClassifier):
    """Records the ids of every batch ``training_step`` really trained on."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch[-1].tolist())
        return super().training_step(batch, batch_idx)


def _selected_run(
    schedule,
    estimator="first-order",
    callbacks=(),
    ckpt_path=None,
    windows=None,
    selector_first=False,
    **selector_kwargs,
):
    x, y, query = _data()
    windows = windows or {"window_every_n_steps": 3}
    tracker = InfluenceTracker(estimator=estimator, queries={"val": query}, write_artifacts=False, **windows)
    selector = InfluenceDataSelector(tracker, "val", **{"fraction": 0.1, "max_fraction": 0.25, **selector_kwargs})
    module = Recorded(_net(), _sgd)
    order = [selector, tracker] if selector_first else [tracker, selector]
    trainer = lightning_trainer(len(schedule), callbacks=[*order, *callbacks], enable_checkpointing=bool(callbacks))
    trainer.fit(module, fixed_loader(x, y, schedule), ckpt_path=ckpt_path)
    return tracker, selector, module


# ---------------------------------------------------------------------------- the policy, pure
def test_policy_takes_the_most_harmful_fraction_and_never_a_helpful_or_removed_sample():
    scores = torch.tensor([0.3, -0.2, -0.9, 0.0, -0.1, -0.5, float("nan"), -0.7, 0.1, -0.05], dtype=torch.float64)
    removed = torch.zeros(10, dtype=torch.bool)
    removed[2] = True  # the most harmful, already removed
    rows = SelectionPolicy(fraction=0.3, max_fraction=1.0).choose(scores, removed)
    assert rows.tolist() == [7, 5, 1]  # ceil(0.3 × 10) = 3: -0.7, -0.5, -0.2
    rows = SelectionPolicy(fraction=1.0, max_fraction=1.0).choose(scores, removed)
    assert sorted(rows.tolist()) == [1, 4, 5, 7, 9]  # every negative, finite, not removed one


def test_policy_threshold_and_cap():
    scores = torch.tensor([-0.9, -0.5, -0.2, -0.1, -0.01, 0.4], dtype=torch.float64)
    none = torch.zeros(6, dtype=torch.bool)
    assert SelectionPolicy(fraction=None, threshold=0.15, max_fraction=1.0).choose(scores, none).tolist() == [0, 1, 2]
    assert SelectionPolicy(fraction=0.5, threshold=0.3, max_fraction=1.0).choose(scores, none).tolist() == [0, 1]
    # cap floor(0.5 × 6) = 3, of which 2 are already spent
    spent = torch.tensor([False, False, False, False, True, True])
    assert SelectionPolicy(fraction=1.0, max_fraction=0.5).choose(scores, spent).tolist() == [0]
    assert SelectionPolicy(fraction=1.0, max_fraction=0.34).choose(scores, spent).numel() == 0


@pytest.mark.parametrize(
    "kwargs",
    [dict(fraction=0.0), dict(fraction=1.5), dict(max_fraction=0), dict(threshold=-1.0), dict(fraction=None)],
)
def test_policy_refuses_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        SelectionPolicy(**kwargs)


def test_drop_rows_keeps_the_rows_of_every_per_row_tensor():
    keep = torch.tensor([True, False, True])
    x, y, ids = torch.arange(6.0).reshape(3, 2), torch.tensor([5, 6, 7]), torch.tensor([10, 11, 12])
    out = drop_rows((x, y, ids), keep)
    assert out[0].tolist() == [[0.0, 1.0], [4.0, 5.0]] and out[1].tolist() == [5, 7] and out[2].tolist() == [10, 12]
    shared = torch.ones(4)  # not per-row: left alone
    out = drop_rows({"x": x, "mask": shared, "sample_id": ids, "name": "batch"}, keep)
    assert out["sample_id"].tolist() == [10, 12] and out["mask"] is shared and out["name"] == "batch"


# ---------------------------------------------------------------------------- the run that happened
def test_removed_samples_take_no_part_from_the_next_step_and_budgets_hold():
    schedule = random_schedule(N, 6, 3, seed=7)
    tracker, selector, module = _selected_run(schedule)
    decisions = selector.decisions
    assert [d.end_step for d in decisions] == [3, 6, 9]  # the last window closes at the end: nothing to act on
    assert selector.removed.numel() > 0
    assert torch.equal(selector.removed, torch.cat([d.sample_ids for d in decisions]))
    for d in decisions:
        assert d.sample_ids.numel() <= math.ceil(0.1 * N) and bool((d.scores < 0).all())
        later = {i for batch in module.seen[d.end_step :] for i in batch}
        assert not later & set(d.sample_ids.tolist()), d
        earlier = {i for batch in module.seen[: d.end_step] for i in batch}
        assert set(d.sample_ids.tolist()) <= earlier  # it had been trained on
    assert len(selector.removed) <= math.floor(0.25 * N)
    assert decisions[-1].total_removed == selector.removed.numel()
    assert tracker.steps_booked == 12


@pytest.mark.parametrize("by", ["window", "cumulative"])
def test_each_decision_takes_the_most_harmful_by_the_chosen_scores(by):
    schedule = random_schedule(N, 6, 3, seed=7)
    tracker, selector, _ = _selected_run(schedule, by=by)
    windows, removed = tracker.windows("val"), set()
    for d in selector.decisions:
        upto = [w.scores for w in windows[: d.window + 1]]
        scores = (upto[-1] if by == "window" else torch.stack(upto).sum(0)).to(torch.float64)
        rows = [int((tracker.tracked_ids == i).nonzero()) for i in d.sample_ids]
        torch.testing.assert_close(d.scores, scores[rows])
        candidates = sorted(
            (float(s), int(i)) for s, i in zip(scores, tracker.tracked_ids) if s < 0 and int(i) not in removed
        )
        assert d.sample_ids.tolist() == [i for _, i in candidates[: d.sample_ids.numel()]]
        assert d.sample_ids.numel() == min(len(candidates), math.ceil(0.1 * N), math.floor(0.25 * N) - len(removed))
        removed |= set(d.sample_ids.tolist())


def test_exact_scores_equal_leave_one_out_on_the_batches_really_trained_on():
    x, y, query = _data()
    schedule = random_schedule(N, 6, 3, seed=7)
    tracker, selector, module = _selected_run(schedule, estimator="exact")
    realized = [module.seen]  # the filtered batches, in order: an ordinary run on smaller batches
    ref = retrain(_net(), _sgd, x, y, realized)
    for a, b in zip(module.net.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    probes = [*selector.removed[:2].tolist(), *[j for j in range(N) if j not in selector.removed.tolist()][:2]]
    truth = leave_one_out(_net(), _sgd, x, y, realized, query, probes)
    scores = tracker.influence("val").scores[probes]
    torch.testing.assert_close(scores, truth, rtol=1e-8, atol=1e-12)


def test_first_order_scores_match_finite_differences_and_removed_samples_keep_evolving():
    x, y, query = _data()
    schedule = random_schedule(N, 6, 3, seed=7)
    tracker, selector, module = _selected_run(schedule, estimator="first-order")
    realized = [module.seen]
    result = tracker.influence("val")
    first = int(selector.removed[0])
    for j in (first, *[j for j in range(N) if j not in selector.removed.tolist()][:2]):
        expected = removal_derivative(_net(), _sgd, x, y, realized, query, j, None, 1e-4)
        assert abs(float(result.scores[j]) - expected) <= 1e-3 * abs(expected), (j, float(result.scores[j]), expected)
    # the first removed sample has no source term after its removal, yet its state is still propagated:
    # its later windows move (the momentum and the curvature carry its earlier effect on)
    row = int((tracker.tracked_ids == first).nonzero())
    later = [w.scores[row] for w in tracker.windows("val") if w.start_step >= selector.decisions[0].end_step]
    assert any(abs(float(s)) > 0 for s in later)


def test_resume_keeps_the_removed_set_and_the_decisions(tmp_path):
    schedule = random_schedule(N, 6, 3, seed=8)
    epochs = {"window_every_n_epochs": 1}
    reference, ref_selector, _ = _selected_run(schedule, windows=epochs, fraction=0.15)
    assert [d.end_step for d in ref_selector.decisions] == [4, 8]
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=8, save_top_k=-1)  # saved before the epoch-8 window
    _selected_run(schedule, windows=epochs, fraction=0.15, callbacks=[ckpt])
    path = next(tmp_path.glob("*step=8.ckpt"))
    tracker, selector, module = _selected_run(schedule, windows=epochs, fraction=0.15, ckpt_path=path)
    assert torch.equal(selector.removed, ref_selector.removed)
    assert [d.to_record() for d in selector.decisions] == [d.to_record() for d in ref_selector.decisions]
    assert not {i for batch in module.seen for i in batch} & set(ref_selector.removed.tolist())
    torch.testing.assert_close(
        tracker.influence("val").scores, reference.influence("val").scores, rtol=1e-10, atol=1e-14
    )


# ---------------------------------------------------------------------------- outputs and errors
def test_decisions_go_to_the_loggers_and_to_selection_jsonl(tmp_path):
    x, y, query = _data()
    tracker = InfluenceTracker(queries={"val": query}, window_every_n_steps=3, dirpath=tmp_path / "art")
    selector = InfluenceDataSelector(tracker, "val", fraction=0.1, max_fraction=0.25)
    logger = CSVLogger(tmp_path, name="logs")
    trainer = lightning_trainer(3, callbacks=[tracker, selector], logger=logger)
    trainer.fit(Recorded(_net(), _sgd), fixed_loader(x, y, random_schedule(N, 6, 3, seed=7)))
    loaded = load_selection(tmp_path / "art")
    assert [d.to_record() for d in loaded] == [d.to_record() for d in selector.decisions]
    logger.save()
    text = open(f"{logger.log_dir}/metrics.csv").read()
    assert "influence/val/selection/removed_total" in text and "influence/val/selection/removed_in_window" in text


def test_configuration_errors_name_the_fix():
    _, _, query = _data()
    tracker = InfluenceTracker(queries={"val": query}, window_every_n_steps=3)
    with pytest.raises(ValueError, match="not registered"):
        InfluenceDataSelector(tracker, "test")
    with pytest.raises(ValueError, match="window_every_n"):
        InfluenceDataSelector(InfluenceTracker(queries={"val": query}), "val")
    with pytest.raises(ValueError, match="not supported"):
        InfluenceDataSelector(tracker, "val", mode="downweight")
    with pytest.raises(TypeError):
        InfluenceDataSelector(object(), "val")
    selector = InfluenceDataSelector(tracker, "val")
    x, y, _ = _data()
    trainer = lightning_trainer(1, callbacks=[selector])
    with pytest.raises(InfluenceConfigurationError, match="not among the Trainer's callbacks"):
        trainer.fit(Recorded(_net(), _sgd), fixed_loader(x, y, random_schedule(N, 6, 1)))


def test_the_selector_acts_the_same_before_or_after_its_tracker():
    schedule = random_schedule(N, 6, 3, seed=7)
    _, after, module_after = _selected_run(schedule)
    _, before, module_before = _selected_run(schedule, selector_first=True)
    assert [d.to_record() for d in before.decisions] == [d.to_record() for d in after.decisions]
    assert before.decisions and module_before.seen == module_after.seen


# ---------------------------------------------------------------------------- ExcludeSamples and offline
def test_exclude_samples_drops_rows_and_skips_an_emptied_batch():
    x, y, _ = _data()
    schedule = random_schedule(N, 6, 2, seed=9)
    dropped = schedule[0][1]  # every row of the second batch
    exclude = ExcludeSamples(dropped + [schedule[0][0][0]])
    module = Recorded(_net(), _sgd)
    trainer = lightning_trainer(2, callbacks=[exclude])
    with pytest.warns(UserWarning, match="every row of a training batch was removed"):
        trainer.fit(module, fixed_loader(x, y, schedule))
    assert exclude.skipped_batches == 1  # Lightning still counts the step; the optimizer did not take it:
    gone = set(exclude.removed.tolist())
    realized = [[[i for i in batch if i not in gone] for batch in epoch] for epoch in schedule]
    assert module.seen == [b for epoch in realized for b in epoch if b]
    ref = retrain(_net(), _sgd, x, y, [[b for epoch in realized for b in epoch if b]])
    for a, b in zip(module.net.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert "training_step" not in module.__dict__  # the wrapped hooks are restored after fit


def test_offline_selection_drops_the_most_harmful_and_retrains_from_the_same_start():
    x, y, query = _data()
    schedule = random_schedule(N, 6, 2, seed=10)
    tracker = InfluenceTracker(queries={"val": query}, write_artifacts=False)
    module = Recorded(_net(), _sgd)
    out = offline_selection(
        module, lambda callbacks: lightning_trainer(2, callbacks=callbacks), tracker, "val", 0.2,
        train_dataloaders=fixed_loader(x, y, schedule),
    )  # fmt: skip
    full = retrain(_net(), _sgd, x, y, schedule)
    torch.testing.assert_close(out.full_state["net.0.weight"], full[0].weight, rtol=0, atol=1e-12)
    assert torch.equal(out.removed, most_harmful_ids(out.scores, 0.2))
    assert out.removed.numel() == 4 and bool((out.scores.scores[out.removed] < 0).all())
    gone = set(out.removed.tolist())
    realized = [[[i for i in batch if i not in gone] for batch in epoch] for epoch in schedule]
    ref = retrain(_net(), _sgd, x, y, realized)
    for a, b in zip(module.net.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
