"""DIT time windows end to end ([concepts.md: Time windows], §6): telescoping, ground truth at the window boundaries,
logging to the Trainer's loggers, artifacts on disk, the memory bound and the pattern entry point.

Ground truth follows tests/estimators/test_exactness.py: float64 problems, the tracked Lightning run and
``testing.retrain`` share every batch; the reference run up to step s is ``retrain`` on the
schedule truncated to its first s batches. Measured numbers are printed (``pytest -s``).
"""

from __future__ import annotations

import copy
import csv
import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing import event_accumulator as ea
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import InfluenceTracker
from lightning_influence.io.artifacts import FINAL_FILE, WINDOWS_FILE, load_final_scores, load_snapshots
from lightning_influence.results.patterns import PATTERNS, classify_patterns
from lightning_influence.testing import (
    TinyClassifier,
    agreement,
    fixed_loader,
    lightning_trainer,
    mean_loss,
    random_classification,
    random_schedule,
    retrain,
)

N, D, C = 24, 4, 3
BATCH, EPOCHS = 6, 3
STEPS_PER_EPOCH = N // BATCH  # 4
TOTAL_STEPS = STEPS_PER_EPOCH * EPOCHS  # 12
EPS = 1e-4
PROBES = (0, 5, 17)

OPTIMIZERS = {
    "sgd": (lambda m: torch.optim.SGD(m.parameters(), lr=0.3), None),
    "momentum": (lambda m: torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.9, dampening=0.1), None),
    "adamw": (lambda m: torch.optim.AdamW(m.parameters(), lr=0.03, weight_decay=0.1, betas=(0.8, 0.95)), None),
    "adam-l2-step-lr": (
        lambda m: torch.optim.Adam(m.parameters(), lr=0.05, weight_decay=0.05),
        lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.7),
    ),
}

# window configuration -> the end steps of its windows (12 steps: 3 epochs of 4 batches)
WINDOW_CONFIGS = {
    "every-5-steps": (dict(window_every_n_steps=5), [5, 10, 12]),  # the end of fit closes a partial window
    "every-4-steps": (dict(window_every_n_steps=4), [4, 8, 12]),  # the schedule closes the last window
    "every-epoch": (dict(window_every_n_epochs=1), [4, 8, 12]),
    "every-2-epochs": (dict(window_every_n_epochs=2), [8, 12]),  # a partial last window
    "whole-run": ({}, [12]),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These problems are tiny: intra-op threads only cost, and on a busy machine (other test
    processes) spinning OpenMP workers made this file ~10x slower. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _data():
    return random_classification(N, D, C)


def _net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, C)).double()


def _schedule(seed: int = 3):
    return random_schedule(N, BATCH, EPOCHS, seed=seed)


def _truncated(schedule, steps: int):
    """The schedule's first ``steps`` batches (as one epoch): ``retrain`` on it stops at θ(steps)."""
    batches = [b for epoch in schedule for b in epoch]
    assert 0 <= steps <= len(batches)
    return [batches[:steps]]


def _fit(x, y, schedule, *trackers, optimizer="adamw", net=None, **trainer_kwargs):
    make_opt, make_sched = OPTIMIZERS[optimizer]
    module = TinyClassifier(copy.deepcopy(net if net is not None else _net()), make_opt, make_sched)
    trainer = lightning_trainer(len(schedule), callbacks=list(trackers), **trainer_kwargs)
    trainer.fit(module, fixed_loader(x, y, schedule))
    return trainer


def _query_loader(query) -> DataLoader:
    return DataLoader(TensorDataset(*query), batch_size=3, shuffle=False)


def _read_events(log_dir) -> ea.EventAccumulator:
    guidance = {k: 0 for k in (ea.SCALARS, ea.HISTOGRAMS, ea.COMPRESSED_HISTOGRAMS, ea.IMAGES, ea.TENSORS, ea.AUDIO)}
    acc = ea.EventAccumulator(str(log_dir), size_guidance=guidance)
    acc.Reload()
    return acc


def _summary(scores: torch.Tensor) -> dict[str, float]:
    """The per-window scalars, recomputed here from the definition (reporting.py's docstring)."""
    s = scores.to(torch.float64)
    return {
        "helpful_mass": float(s[s > 0].sum()),
        "harmful_mass": float(s[s < 0].sum()),
        "num_harmful": float((s < 0).sum()),
        "strongest": float(s[s.abs().argmax()]),
    }


def _assert_same_windows(loaded, windows) -> None:
    assert len(loaded) == len(windows)
    for got, want in zip(loaded, windows):
        assert (got.query, got.index, got.start_step, got.end_step, got.epoch) == (
            want.query,
            want.index,
            want.start_step,
            want.end_step,
            want.epoch,
        )
        assert torch.equal(got.sample_ids, want.sample_ids)
        assert torch.equal(got.scores.to(want.scores.dtype), want.scores)


# --------------------------------------------------------------------------- telescoping, boundaries


@pytest.mark.parametrize("estimator", ["acc", "first-order", "tracin"])
@pytest.mark.parametrize("config", list(WINDOW_CONFIGS))
def test_windows_telescope_to_the_full_run_score(config, estimator):
    x, y, query = _data()
    kwargs, ends = WINDOW_CONFIGS[config]
    tracker = InfluenceTracker(queries={"val": query}, estimator=estimator, **kwargs)
    trainer = _fit(x, y, _schedule(), tracker)
    assert trainer.global_step == TOTAL_STEPS

    windows = tracker.windows("val")
    assert [w.index for w in windows] == list(range(len(ends)))
    assert [w.end_step for w in windows] == ends
    assert [w.start_step for w in windows] == [0] + ends[:-1]  # contiguous from 0 to the last step
    assert windows[-1].end_step == trainer.global_step
    for w in windows:
        assert w.query == "val"
        assert torch.equal(w.sample_ids, tracker.tracked_ids)
        assert w.scores.dtype == torch.float64 and w.scores.shape == (N,)
        assert bool(torch.isfinite(w.scores).all())
    # the epoch of a window closed by its schedule is the epoch of its last step
    # (the window closed by the end of fit: see test_last_window_epoch below)
    for w in windows[:-1]:
        assert w.epoch == (w.end_step - 1) // STEPS_PER_EPOCH

    full = tracker.influence("val").scores
    summed = torch.stack([w.scores for w in windows]).sum(0)
    assert full.abs().max() > 0
    torch.testing.assert_close(summed, full, rtol=1e-12, atol=1e-13 * float(full.abs().max()))
    if len(windows) > 1:  # the windows are not all the same thing
        assert not torch.allclose(windows[0].scores, windows[-1].scores)


@pytest.mark.parametrize(
    "config, trainer_kwargs",
    [
        pytest.param("every-4-steps", {}, id="closed-by-step-schedule"),
        pytest.param("every-epoch", {}, id="closed-by-epoch-schedule"),
        pytest.param("every-5-steps", {}, id="partial-step-window"),
        pytest.param("every-2-epochs", {}, id="partial-epoch-window"),
        pytest.param("whole-run", {}, id="whole-run"),
        pytest.param("every-5-steps", {"max_steps": 6}, id="max-steps-mid-epoch"),
    ],
)
def test_last_window_epoch(config, trainer_kwargs):
    """``WindowSnapshot.epoch`` is "the training epoch in which the window closed": for the last
    window, the epoch of the run's last optimizer step, whoever closes it (schedule or end of fit)."""
    x, y, query = _data()
    tracker = InfluenceTracker(queries={"val": query}, **WINDOW_CONFIGS[config][0])
    trainer = _fit(x, y, _schedule(), tracker, optimizer="sgd", **trainer_kwargs)
    last = tracker.windows("val")[-1]
    assert last.end_step == trainer.global_step
    assert last.epoch == (trainer.global_step - 1) // STEPS_PER_EPOCH


# --------------------------------------------------------------------------- ground truth


@pytest.mark.parametrize("optimizer", ["adamw", "momentum", "adam-l2-step-lr"])
def test_window_scores_match_finite_differences_at_the_boundaries(optimizer):
    """W_j[s_a, s_b] = −d/dw_j [q(θ_w(s_b)) − q(θ_w(s_a))] at w = 1 ("first-order", central differences
    of two real float64 runs truncated at each boundary; the sign convention of test_exactness)."""
    x, y, query = _data()
    schedule, net = _schedule(), _net()
    make_opt, make_sched = OPTIMIZERS[optimizer]
    tracker = InfluenceTracker(queries={"val": query}, estimator="first-order", window_every_n_steps=5)
    _fit(x, y, schedule, tracker, optimizer=optimizer, net=net)
    windows = tracker.windows("val")
    assert [(w.start_step, w.end_step) for w in windows] == [(0, 5), (5, 10), (10, 12)]

    cache: dict[tuple[int, float, int], float] = {}

    def q_at(j: int, w_j: float, steps: int) -> float:
        if (j, w_j, steps) not in cache:
            w = torch.ones(N, dtype=torch.float64)
            w[j] = w_j
            trained = retrain(net, make_opt, x, y, _truncated(schedule, steps), w, make_sched)
            cache[j, w_j, steps] = mean_loss(trained, *query)
        return cache[j, w_j, steps]

    worst = 0.0
    for window in windows:
        for j in PROBES:
            plus = q_at(j, 1 + EPS, window.end_step) - q_at(j, 1 + EPS, window.start_step)
            minus = q_at(j, 1 - EPS, window.end_step) - q_at(j, 1 - EPS, window.start_step)
            expected = -(plus - minus) / (2 * EPS)
            got = float(window.scores[j])
            rel = abs(got - expected) / abs(expected)
            worst = max(worst, rel)
            assert rel <= 1e-3, (optimizer, window.index, j, got, expected)
    print(f"\n[windows vs finite differences] {optimizer}: max relative error {worst:.2e}")


@pytest.mark.parametrize("optimizer", ["adamw", "momentum"])
def test_cumulative_window_influence_follows_leave_one_out_at_each_boundary(optimizer):
    """I_j(s) = Σ of the windows up to s ("acc") against exact leave-one-out q(θ_-j(s)) − q(θ(s)),
    for every sample and every boundary s."""
    x, y, query = _data()
    schedule, net = _schedule(), _net()
    make_opt, make_sched = OPTIMIZERS[optimizer]
    tracker = InfluenceTracker(queries={"val": query}, estimator="acc", window_every_n_steps=5)
    _fit(x, y, schedule, tracker, optimizer=optimizer, net=net)
    cumulative = torch.zeros(N, dtype=torch.float64)
    measured = []
    for window in tracker.windows("val"):
        cumulative = cumulative + window.scores
        steps = _truncated(schedule, window.end_step)
        base = mean_loss(retrain(net, make_opt, x, y, steps, None, make_sched), *query)
        truth = []
        for j in range(N):
            w = torch.ones(N, dtype=torch.float64)
            w[j] = 0.0
            truth.append(mean_loss(retrain(net, make_opt, x, y, steps, w, make_sched), *query) - base)
        stats = agreement(cumulative, torch.tensor(truth, dtype=torch.float64))
        measured.append((window.end_step, stats))
        print(
            f"\n[cumulative window influence vs LOO] {optimizer} s={window.end_step}: "
            + ", ".join(f"{k} {v:.3f}" for k, v in stats.items())
        )
    for step, stats in measured:  # measured: Spearman ≥ 0.99 and Pearson ≥ 0.99 at every boundary
        assert stats["spearman"] >= 0.9, (step, stats)
        assert stats["pearson"] >= 0.9, (step, stats)


# --------------------------------------------------------------------------- loggers


def test_tensorboard_gets_one_entry_per_window_at_the_end_steps(tmp_path):
    x, y, query = _data()
    queries = {"val": query, "test": _query_loader(query)}  # a batch and a DataLoader
    tracker = InfluenceTracker(queries=queries, window_every_n_steps=5, log_top_k=3, log_figure_every_n_windows=1)
    logger = TensorBoardLogger(save_dir=tmp_path, name="tb")
    _fit(x, y, _schedule(), tracker, logger=logger)
    acc = _read_events(logger.log_dir)
    for name in queries:
        windows = tracker.windows(name)
        ends = [w.end_step for w in windows]
        assert ends == [5, 10, 12]
        logged = [e - 1 for e in ends]  # a window's points sit at its last optimizer step, with the training loss
        assert f"influence/{name}/window" not in acc.Tags()["scalars"]  # the index would draw a straight line
        for scalar in ("helpful_mass", "harmful_mass", "num_harmful", "strongest"):
            events = acc.Scalars(f"influence/{name}/{scalar}")
            assert [e.step for e in events] == logged, scalar
            for e, w in zip(events, windows):
                expected = _summary(w.scores)[scalar]
                assert e.value == pytest.approx(expected, rel=1e-6, abs=1e-30), (scalar, w.index)

        hist = acc.Histograms(f"influence/{name}/window_scores")
        assert [e.step for e in hist] == logged
        for e, w in zip(hist, windows):
            h = e.histogram_value
            assert h.num == N
            assert (h.min, h.max) == (float(w.scores.min()), float(w.scores.max()))
            assert h.sum == pytest.approx(float(w.scores.sum()), rel=1e-9, abs=1e-15)

        text = acc.Tensors(f"influence/{name}/top_samples/text_summary")
        assert [e.step for e in text] == logged
        last_table = text[-1].tensor_proto.string_val[0].decode()
        worst = int(tracker.tracked_ids[windows[-1].scores.argmin()])
        assert f"| 1 | {worst} |" in last_table.split("Most helpful")[0]

        if _has_matplotlib():
            images = acc.Images(f"influence/{name}/strongest_over_windows")
            assert [im.step for im in images] == logged
            assert images[-1].encoded_image_string.startswith(b"\x89PNG")


def test_figures_are_drawn_every_n_windows_and_for_the_last_one(tmp_path):
    """No matplotlib figure per window (a figure costs tens of ms): every 5th here, and the last one at the end."""
    pytest.importorskip("matplotlib")
    x, y, query = _data()
    tracker = InfluenceTracker(queries={"val": query}, window_every_n_steps=1, log_figure_every_n_windows=5)
    logger = TensorBoardLogger(save_dir=tmp_path, name="tb")
    _fit(x, y, _schedule(), tracker, logger=logger)
    acc = _read_events(logger.log_dir)
    assert [e.step for e in acc.Scalars("influence/val/strongest")] == list(range(12))  # every window's scalars
    assert [im.step for im in acc.Images("influence/val/strongest_over_windows")] == [4, 9, 11]


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_csv_logger_gets_the_window_scalars(tmp_path):
    x, y, query = _data()
    tracker = InfluenceTracker(queries={"val": query}, window_every_n_epochs=1)
    logger = CSVLogger(save_dir=tmp_path, name="csv")
    _fit(x, y, _schedule(), tracker, logger=logger)
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("influence/val/strongest")]
    windows = tracker.windows("val")
    assert [int(r["step"]) + 1 for r in rows] == [w.end_step for w in windows] == [4, 8, 12]
    for row, w in zip(rows, windows):
        expected = _summary(w.scores)
        for name, value in expected.items():
            assert float(row[f"influence/val/{name}"]) == pytest.approx(value, rel=1e-12, abs=1e-300), name
    # the CSV logger's folder also holds the artifacts
    _assert_same_windows(load_snapshots(Path(logger.log_dir) / "influence"), windows)


def test_no_logger_runs_and_writes_artifacts_to_the_working_directory(tmp_path):
    x, y, query = _data()
    tracker = InfluenceTracker(queries={"val": query}, window_every_n_steps=5)
    _fit(x, y, _schedule(), tracker, logger=False)  # the autouse fixture made tmp_path the cwd
    folder = tmp_path / "influence"
    assert {p.name for p in folder.iterdir()} == {WINDOWS_FILE, FINAL_FILE}
    _assert_same_windows(load_snapshots(folder), tracker.windows("val"))


# --------------------------------------------------------------------------- artifacts


def test_artifacts_round_trip_the_tracker(tmp_path):
    x, y, query = _data()
    queries = {"val": query, "test": _query_loader((query[0][:5], query[1][:5]))}
    tracker = InfluenceTracker(queries=queries, estimator="first-order", window_every_n_steps=5, track=[3, 0, 17, 9])
    logger = TensorBoardLogger(save_dir=tmp_path, name="tb")
    _fit(x, y, _schedule(), tracker, logger=logger)
    folder = Path(logger.log_dir) / "influence"
    loaded = load_snapshots(folder)
    expected = sorted((w for name in queries for w in tracker.windows(name)), key=lambda w: (w.end_step, w.query))
    _assert_same_windows(loaded, expected)
    assert loaded[0].sample_ids.tolist() == [3, 0, 17, 9]

    final = load_final_scores(folder)
    assert set(final) == set(queries)
    for name in queries:
        result = tracker.influence(name)
        assert torch.equal(final[name].sample_ids, result.sample_ids)
        assert final[name].estimator == "first-order"
        torch.testing.assert_close(final[name].scores, result.scores, rtol=1e-15, atol=0)
        # and the file's windows telescope to the file's final scores
        summed = torch.stack([w.scores for w in loaded if w.query == name]).sum(0)
        atol = 1e-13 * float(result.scores.abs().max())
        torch.testing.assert_close(summed, final[name].scores, rtol=1e-12, atol=atol)


def test_dirpath_is_honoured(tmp_path):
    x, y, query = _data()
    target = tmp_path / "custom" / "place"
    tracker = InfluenceTracker(queries={"val": query}, window_every_n_steps=5, dirpath=target)
    logger = TensorBoardLogger(save_dir=tmp_path, name="tb")
    _fit(x, y, _schedule(), tracker, logger=logger)
    assert {p.name for p in target.iterdir()} == {WINDOWS_FILE, FINAL_FILE}
    assert not (Path(logger.log_dir) / "influence").exists()
    assert not (tmp_path / "influence").exists()
    _assert_same_windows(load_snapshots(target), tracker.windows("val"))
    final = load_final_scores(target)["val"]
    torch.testing.assert_close(final.scores, tracker.influence("val").scores, rtol=1e-15, atol=0)


@pytest.mark.parametrize("with_logger", [False, True])
def test_write_artifacts_false_writes_nothing(tmp_path, with_logger):
    x, y, query = _data()
    tracker = InfluenceTracker(queries={"val": query}, window_every_n_steps=5, write_artifacts=False)
    logger = TensorBoardLogger(save_dir=tmp_path, name="tb") if with_logger else False
    _fit(x, y, _schedule(), tracker, logger=logger)
    assert len(tracker.windows("val")) == 3
    written = [p for p in tmp_path.rglob("*") if p.name in (WINDOWS_FILE, FINAL_FILE) or p.name.startswith("influence")]
    assert written == []
    if with_logger:  # logging does not depend on the artifacts
        assert "influence/val/num_harmful" in _read_events(logger.log_dir).Tags()["scalars"]


def test_two_trackers_write_separate_folders(tmp_path):
    x, y, query = _data()
    first = InfluenceTracker(queries={"val": query}, estimator="acc", window_every_n_steps=5)
    second = InfluenceTracker(queries={"val": query}, estimator="first-order", window_every_n_epochs=1, track=[1, 2, 3])
    _fit(x, y, _schedule(), first, second, logger=False)
    folders = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("influence"))
    assert folders == ["influence_0", "influence_1"]
    for folder, tracker in (("influence_0", first), ("influence_1", second)):
        _assert_same_windows(load_snapshots(tmp_path / folder), tracker.windows("val"))
        final = load_final_scores(tmp_path / folder)["val"]
        assert final.estimator == tracker.estimator
        assert torch.equal(final.sample_ids, tracker.tracked_ids)
        torch.testing.assert_close(final.scores, tracker.influence("val").scores, rtol=1e-15, atol=0)
    assert [w.end_step for w in first.windows("val")] == [5, 10, 12]
    assert [w.end_step for w in second.windows("val")] == [4, 8, 12]


def test_two_trackers_log_under_separate_tags(tmp_path):
    x, y, query = _data()
    first = InfluenceTracker(queries={"val": query}, window_every_n_steps=5)
    second = InfluenceTracker(queries={"val": query}, estimator="first-order", window_every_n_epochs=1)
    logger = TensorBoardLogger(save_dir=tmp_path, name="tb")
    _fit(x, y, _schedule(), first, second, logger=logger)
    acc = _read_events(logger.log_dir)
    for namespace, tracker in (("influence_0", first), ("influence_1", second)):
        events = acc.Scalars(f"{namespace}/val/num_harmful")
        windows = tracker.windows("val")
        assert [e.step for e in events] == [w.end_step - 1 for w in windows]
        assert [e.value for e in events] == [float((w.scores < 0).sum()) for w in windows]
    assert "influence/val/num_harmful" not in acc.Tags()["scalars"]


# --------------------------------------------------------------------------- memory


def test_snapshots_hold_k_floats_and_the_recorder_no_states():
    x, y, query = _data()
    track = [2, 7, 11, 19, 23]
    k = len(track)
    queries = {"val": query, "test": _query_loader(query)}
    tracker = InfluenceTracker(queries=queries, window_every_n_steps=5, track=track)
    _fit(x, y, _schedule(), tracker)
    p = tracker.engine.theta.shape[1]
    assert p > k  # a [k, p] tensor would be told apart from a [k] one

    for name in queries:
        for w in tracker.windows(name):
            assert w.scores.numel() == k and w.scores.dim() == 1
            # not a view into something bigger (e.g. a row of the [k, p] states)
            assert w.scores.untyped_storage().nbytes() == k * w.scores.element_size()
            assert w.sample_ids.untyped_storage().nbytes() == k * w.sample_ids.element_size()

    tensors = []

    def walk(obj):
        if isinstance(obj, torch.Tensor):
            tensors.append(obj)
        elif isinstance(obj, dict):
            for value in obj.values():
                walk(value)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                walk(value)

    walk(tracker.state_dict()["windows"])
    assert all(t.dim() == 1 and t.numel() == k for t in tensors), [tuple(t.shape) for t in tensors]
    # the ids, then per query one [k] of totals at the last boundary and one [k] per window
    num_windows = sum(len(tracker.windows(name)) for name in queries)
    assert len(tensors) == 1 + len(queries) + num_windows


# --------------------------------------------------------------------------- patterns, errors


def test_patterns_label_every_tracked_sample():
    x, y, query = _data()
    tracker = InfluenceTracker(queries={"val": query}, window_every_n_steps=2)
    _fit(x, y, _schedule(), tracker)
    windows = tracker.windows("val")
    assert len(windows) == TOTAL_STEPS // 2
    patterns = tracker.patterns("val")
    assert torch.equal(patterns.sample_ids, tracker.tracked_ids)
    assert len(patterns.labels) == N and set(patterns.labels) <= set(PATTERNS)
    assert patterns.num_windows == len(windows)
    assert sum(patterns.counts().values()) == N
    # thresholds are passed on
    matrix = torch.stack([w.scores for w in windows])
    strict = tracker.patterns("val", fluctuation_threshold=1.0, trend_threshold=1.5)
    direct = classify_patterns(matrix, tracker.tracked_ids, fluctuation_threshold=1.0, trend_threshold=1.5)
    assert strict.labels == direct.labels
    assert patterns.labels == classify_patterns(matrix, tracker.tracked_ids).labels


def test_window_errors():
    x, y, query = _data()
    tracker = InfluenceTracker(queries={"val": query}, window_every_n_steps=5)
    assert tracker.windows("val") == []  # nothing closed yet
    with pytest.raises(RuntimeError, match="patterns"):
        tracker.patterns("val")
    with pytest.raises(KeyError, match="nope"):
        tracker.windows("nope")
    with pytest.raises(KeyError, match="nope"):
        tracker.patterns("nope")
    _fit(x, y, _schedule(), tracker)
    with pytest.raises(KeyError, match="registered: \\['val'\\]"):
        tracker.windows("nope")
    with pytest.raises(KeyError, match="nope"):
        tracker.patterns("nope")
    assert math.isfinite(float(tracker.windows("val")[0].scores.sum()))
