"""Window reporting to loggers (``reporting``) and the on-disk artifacts (``artifacts``)."""

from __future__ import annotations

import csv
import json
import math
import sys
import warnings

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing import event_accumulator as ea

from lightning_influence.io.artifacts import (
    FINAL_FILE,
    WINDOWS_FILE,
    SnapshotWriter,
    load_final_scores,
    load_snapshots,
    snapshots_by_query,
)
from lightning_influence.reporting.windows import (
    SCALAR_NAMES,
    log_window,
    metric_key,
    strongest_cumulative,
    strongest_over_windows_figure,
    top_samples_table,
    window_summary,
)
from lightning_influence.results.result import InfluenceResult
from lightning_influence.results.windows import WindowSnapshot

IDS = torch.tensor([10, 11, 12, 13, 14])
# Window scores per query, one row per window (end steps 10, 20, 30).
SCORES = {
    "val": torch.tensor(
        [[-1.5, 2.0, 0.0, -0.25, 0.75], [0.5, -3.0, 1.0, -0.5, 0.25], [-2.0, 1.0, -1.0, 4.0, 0.0]],
        dtype=torch.float64,
    ),
    "test": torch.tensor(
        [[0.1, 0.2, 0.3, 0.4, 0.5], [-0.1, -0.2, -0.3, -0.4, -0.5], [1.0, -1.0, 2.0, -2.0, 0.5]],
        dtype=torch.float64,
    ),
}
END_STEPS = [10, 20, 30]


def make_snapshots(scores: dict[str, torch.Tensor] = SCORES, ids: torch.Tensor = IDS) -> list[WindowSnapshot]:
    """The windows of every query, in the order a tracker closes them (time, then query)."""
    snaps = []
    for w, end in enumerate(END_STEPS):
        for query, rows in scores.items():
            start = 0 if w == 0 else END_STEPS[w - 1]
            snaps.append(WindowSnapshot(query, w, start, end, w // 2, ids, rows[w]))
    return snaps


def log_all(loggers, top_k: int = 2) -> None:
    for snap in make_snapshots():
        history = SCORES[snap.query][: snap.index + 1]
        log_window(loggers, snap, history, top_k=top_k, end_steps=END_STEPS[: snap.index + 1])


def read_events(log_dir) -> ea.EventAccumulator:
    guidance = {k: 0 for k in (ea.SCALARS, ea.HISTOGRAMS, ea.COMPRESSED_HISTOGRAMS, ea.IMAGES, ea.TENSORS, ea.AUDIO)}
    acc = ea.EventAccumulator(str(log_dir), size_guidance=guidance)
    acc.Reload()
    return acc


# --------------------------------------------------------------------------- pure helpers


def test_window_summary_matches_hand_computed_values():
    assert window_summary(torch.tensor([-1.5, 2.0, 0.0, -0.25, 0.75])) == {
        "helpful_mass": 2.75,
        "harmful_mass": -1.75,
        "num_harmful": 2.0,
        "strongest": 2.0,
    }
    # The strongest score keeps its sign; float32 input is summed in float64.
    summary = window_summary(torch.tensor([0.5, -3.0, 2.0], dtype=torch.float32))
    assert summary == {"helpful_mass": 2.5, "harmful_mass": -3.0, "num_harmful": 1.0, "strongest": -3.0}
    assert window_summary(torch.zeros(0)) == dict.fromkeys(
        ("helpful_mass", "harmful_mass", "num_harmful", "strongest"), 0.0
    )


def test_top_samples_table_ranks_harmful_and_helpful_by_window_score():
    scores = torch.tensor([-1.0, 3.0, -2.0, 0.5, 0.0])
    cumulative = torch.tensor([-4.0, 5.0, -6.0, 7.0, 8.0])
    table = top_samples_table(IDS, scores, cumulative, top_k=2, title="T")
    harmful, helpful = table.split("**Most helpful in this window**")
    assert table.startswith("T\n\n**Most harmful in this window**")
    assert "| 1 | 12 | -2.0000e+00 | -6.0000e+00 |" in harmful
    assert "| 2 | 10 | -1.0000e+00 | -4.0000e+00 |" in harmful
    assert "| 1 | 11 | +3.0000e+00 | +5.0000e+00 |" in helpful
    assert "| 2 | 13 | +5.0000e-01 | +7.0000e+00 |" in helpful
    assert "| 14 |" not in table  # a zero score is neither harmful nor helpful
    only_helpful = top_samples_table(IDS, scores.abs(), cumulative, top_k=1)
    assert "**Most harmful in this window**\n\n_none_" in only_helpful
    assert only_helpful.count("| 1 |") == 1


def test_figure_plots_the_strongest_cumulative_samples():
    pytest.importorskip("matplotlib")
    fig = strongest_over_windows_figure(SCORES["val"], IDS, END_STEPS, num_per_side=1)
    (ax,) = fig.axes
    lines = {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}
    # Cumulative after 3 windows: [-3.0, 0.0, 0.0, 3.25, 1.0] -> id 10 harmful, id 13 helpful.
    assert set(lines) == {"id 10 (harmful)", "id 13 (helpful)"}
    assert list(lines["id 13 (helpful)"].get_xdata()) == [0, 10, 20, 30]
    assert list(lines["id 13 (helpful)"].get_ydata()) == [0.0, -0.25, -0.75, 3.25]
    assert ax.get_xlabel() == "optimizer step"
    assert strongest_over_windows_figure(SCORES["val"], IDS).axes[0].get_xlabel() == "windows closed"


def test_the_figure_plots_what_its_title_says():
    """The title promises the top samples on each side by cumulative score, and their cumulative scores: the
    lines are those samples (most negative, most positive cumulative score after the last window), nothing else."""
    pytest.importorskip("matplotlib")
    gen = torch.Generator().manual_seed(1)
    history = torch.randn(6, 40, generator=gen, dtype=torch.float64)
    ids = torch.arange(500, 540)
    fig = strongest_over_windows_figure(history, ids, num_per_side=3, title="val, after window 5")
    (ax,) = fig.axes
    assert ax.get_title(loc="left") == "val, after window 5\ntop 3 harmful (< 0) and helpful (> 0) by cumulative score"
    assert ax.get_ylabel() == "cumulative score"
    total = history.sum(0)
    harmful, helpful = strongest_cumulative(history, 3)
    assert harmful == total.argsort()[:3].tolist() and helpful == total.argsort(descending=True)[:3].tolist()
    lines = {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}
    expected = [f"id {500 + j} (harmful)" for j in harmful] + [f"id {500 + j} (helpful)" for j in helpful]
    assert list(lines) == expected
    for j in harmful + helpful:
        kind = "harmful" if j in harmful else "helpful"
        ydata = list(lines[f"id {500 + j} ({kind})"].get_ydata())
        assert ydata == pytest.approx([0.0, *history[:, j].cumsum(0).tolist()])


def test_strongest_cumulative_leaves_zero_and_nan_out():
    history = torch.tensor([[1.0, -2.0, 0.0, float("nan"), 3.0], [1.0, 0.5, 0.0, 1.0, -4.0]])
    assert strongest_cumulative(history, 2) == ([1, 4], [0])
    assert strongest_cumulative(history[0], 1) == ([1], [4])  # one window as Tensor[k]


# --------------------------------------------------------------------------- loggers


def test_no_logger_does_nothing(tmp_path):
    snap = make_snapshots()[0]
    assert log_window([], snap, snap.scores[None]) is None
    assert log_window(None, snap, snap.scores[None]) is None
    assert list(tmp_path.iterdir()) == []


def test_history_shape_is_checked(tmp_path):
    snap = make_snapshots()[0]
    logger = CSVLogger(tmp_path)
    with pytest.raises(ValueError, match="history"):
        log_window([logger], snap, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="end_steps"):
        log_window([logger], snap, snap.scores[None], end_steps=[10, 20])


def test_tensorboard_scalars_histograms_and_text(tmp_path):
    logger = TensorBoardLogger(save_dir=tmp_path, name="tb")
    log_all([logger], top_k=2)
    logger.finalize("success")
    acc = read_events(logger.log_dir)
    tags = acc.Tags()

    names = ("helpful_mass", "harmful_mass", "num_harmful", "strongest")  # no "window": the index is no chart
    assert SCALAR_NAMES == names
    assert set(tags["scalars"]) == {metric_key(q, name) for q in SCORES for name in names}
    for query, rows in SCORES.items():
        for name in names:
            events = acc.Scalars(metric_key(query, name))
            assert [e.step for e in events] == END_STEPS
            expected = [window_summary(rows[w])[name] for w in range(3)]
            assert [e.value for e in events] == pytest.approx(expected, rel=1e-6)

    assert set(tags["histograms"]) == {metric_key(q, "window_scores") for q in SCORES}
    for query, rows in SCORES.items():
        events = acc.Histograms(metric_key(query, "window_scores"))
        assert [e.step for e in events] == END_STEPS
        for e, row in zip(events, rows):
            h = e.histogram_value
            assert (h.num, h.min, h.max) == (5, float(row.min()), float(row.max()))
            assert h.sum == pytest.approx(float(row.sum()))
            assert h.sum_squares == pytest.approx(float((row**2).sum()))

    text_tags = {metric_key(q, "top_samples") + "/text_summary" for q in SCORES}
    assert text_tags <= set(tags["tensors"])
    events = acc.Tensors(metric_key("val", "top_samples") + "/text_summary")
    assert [e.step for e in events] == END_STEPS
    last = events[-1].tensor_proto.string_val[0].decode()
    harmful, helpful = last.split("Most helpful")
    # Window 2 of "val": scores [-2, 1, -1, 4, 0], cumulative [-3, 0, 0, 3.25, 1].
    assert "window 2: optimizer steps 20–29" in harmful
    assert "| 1 | 10 | -2.0000e+00 | -3.0000e+00 |" in harmful
    assert "| 2 | 12 | -1.0000e+00 | +0.0000e+00 |" in harmful
    assert "| 1 | 13 | +4.0000e+00 | +3.2500e+00 |" in helpful
    assert "| 2 | 11 | +1.0000e+00 | +0.0000e+00 |" in helpful


def test_tensorboard_figure(tmp_path):
    pytest.importorskip("matplotlib")
    logger = TensorBoardLogger(save_dir=tmp_path, name="tb")
    log_all([logger])
    logger.finalize("success")
    acc = read_events(logger.log_dir)
    assert set(acc.Tags()["images"]) == {metric_key(q, "strongest_over_windows") for q in SCORES}
    images = acc.Images(metric_key("val", "strongest_over_windows"))
    assert [im.step for im in images] == END_STEPS
    assert images[-1].encoded_image_string.startswith(b"\x89PNG")
    assert images[-1].width > 100 and images[-1].height > 100


def test_missing_matplotlib_only_skips_the_figure(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib...` raise ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    logger = TensorBoardLogger(save_dir=tmp_path, name="tb")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        log_all([logger])
    logger.finalize("success")
    tags = read_events(logger.log_dir).Tags()
    assert tags["images"] == []
    assert metric_key("val", "window_scores") in tags["histograms"]


def test_csv_logger_gets_the_scalars(tmp_path):
    tb, csv_logger = TensorBoardLogger(save_dir=tmp_path, name="tb"), CSVLogger(save_dir=tmp_path, name="csv")
    log_all([tb, csv_logger])
    csv_logger.finalize("success")
    tb.finalize("success")
    with open(f"{csv_logger.log_dir}/metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for query, scores in SCORES.items():
        mine = [r for r in rows if r.get(metric_key(query, "strongest"))]
        assert [int(r["step"]) for r in mine] == END_STEPS
        for w, row in enumerate(mine):
            for name, value in window_summary(scores[w]).items():
                assert float(row[metric_key(query, name)]) == pytest.approx(value, rel=1e-12)
    # Only the scalars went to the CSV file.
    assert {key for key in rows[0] if key != "step"} <= {metric_key(q, n) for q in SCORES for n in SCALAR_NAMES}


# --------------------------------------------------------------------------- artifacts


def in_time_order(snaps: list[WindowSnapshot]) -> list[WindowSnapshot]:
    return sorted(snaps, key=lambda s: (s.end_step, s.query))


def assert_same_snapshots(loaded: list[WindowSnapshot], written: list[WindowSnapshot]) -> None:
    assert len(loaded) == len(written)
    for got, want in zip(loaded, written):
        assert (got.query, got.index, got.start_step, got.end_step, got.epoch) == (
            want.query,
            want.index,
            want.start_step,
            want.end_step,
            want.epoch,
        )
        assert got.sample_ids.dtype == torch.long and torch.equal(got.sample_ids, want.sample_ids)
        assert got.scores.dtype == torch.float64
        assert torch.equal(got.scores.to(want.scores.dtype), want.scores)


def test_snapshots_round_trip_exactly(tmp_path):
    gen = torch.Generator().manual_seed(0)
    awkward = torch.tensor([1 / 3, -1e-300, 5e-324, -0.0, 1e300, 0.1], dtype=torch.float64)
    scores = {
        "b": torch.randn(3, 6, generator=gen, dtype=torch.float64) * awkward.abs().clamp(min=1e-3),
        "a": torch.randn(3, 6, generator=gen).to(torch.float32),
    }
    scores["b"][1] = awkward
    ids = torch.tensor([7, 0, 3, 100, 2, 55])
    written = make_snapshots(scores, ids)  # "b" is written before "a" at each step
    writer = SnapshotWriter(tmp_path / "nested" / "influence")
    for snap in written:
        writer.write(snap)
    expected = in_time_order(written)
    assert [s.query for s in expected[:2]] == ["a", "b"]
    assert_same_snapshots(load_snapshots(tmp_path / "nested" / "influence"), expected)
    assert_same_snapshots(load_snapshots(writer.windows_path), expected)
    assert torch.equal(load_snapshots(writer.dirpath)[3].scores.view(torch.int64), awkward.view(torch.int64))

    lines = writer.windows_path.read_text().splitlines()
    assert len(lines) == len(written)
    record = json.loads(lines[0])
    assert record["format"] == "lightning-influence/windows" and record["version"] == 1
    assert set(record) == {
        "format",
        "version",
        "query",
        "index",
        "start_step",
        "end_step",
        "epoch",
        "sample_ids",
        "scores",
    }

    grouped = snapshots_by_query(load_snapshots(writer.dirpath))
    assert list(grouped) == ["a", "b"]
    assert [s.index for s in grouped["b"]] == [0, 1, 2]


def test_truncated_last_line_is_skipped_with_a_warning_and_repaired(tmp_path):
    writer = SnapshotWriter(tmp_path)
    snaps = make_snapshots()
    for snap in snaps[:3]:
        writer.write(snap)
    full = writer.windows_path.read_text()
    writer.windows_path.write_text(full + full.splitlines()[0][:40])  # crash in the middle of a write
    with pytest.warns(UserWarning, match="truncated last record"):
        loaded = load_snapshots(tmp_path)
    assert_same_snapshots(loaded, in_time_order(snaps[:3]))

    # A writer appending to the file (resumed run) first cuts the partial line.
    resumed = SnapshotWriter(tmp_path)
    with pytest.warns(UserWarning, match="partial last line"):
        resumed.write(snaps[3])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_same_snapshots(load_snapshots(tmp_path), in_time_order(snaps[:4]))


def test_corruption_before_the_last_line_raises(tmp_path):
    writer = SnapshotWriter(tmp_path)
    for snap in make_snapshots()[:3]:
        writer.write(snap)
    lines = writer.windows_path.read_text().splitlines()
    lines[1] = lines[1][:30]
    writer.windows_path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="line 2.*not valid JSON"):
        load_snapshots(tmp_path)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"format": "something-else"}, "expected format 'lightning-influence/windows'"),
        ({"version": 2}, "version 2 is newer"),
        ({"version": "1"}, "invalid format version"),
    ],
)
def test_unknown_format_or_version_raises(tmp_path, change, message):
    writer = SnapshotWriter(tmp_path)
    for snap in make_snapshots()[:2]:
        writer.write(snap)
    lines = writer.windows_path.read_text().splitlines()
    record = json.loads(lines[-1])
    record.update(change)
    lines[-1] = json.dumps(record)  # even on the last line: this is no interrupted write
    writer.windows_path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message):
        load_snapshots(tmp_path)


def test_missing_fields_raise(tmp_path):
    writer = SnapshotWriter(tmp_path)
    writer.write(make_snapshots()[0])
    record = json.loads(writer.windows_path.read_text())
    del record["end_step"]
    writer.windows_path.write_text(json.dumps(record) + "\n")
    with pytest.raises(ValueError, match="line 1: the record lacks end_step"):
        load_snapshots(tmp_path)


def test_truncate_keeps_the_first_windows_of_each_query(tmp_path):
    writer = SnapshotWriter(tmp_path)
    snaps = make_snapshots({**SCORES, "other": SCORES["val"]})
    for snap in snaps:
        writer.write(snap)
    writer.truncate({"val": 2, "test": 1})  # "other" is not in the checkpoint: dropped
    kept = [s for s in snaps if (s.query == "val" and s.index < 2) or (s.query == "test" and s.index < 1)]
    assert_same_snapshots(load_snapshots(tmp_path), in_time_order(kept))
    # The resumed run appends its windows after the kept ones, without duplicates.
    for snap in snaps:
        if (snap.query, snap.index) in {("val", 2), ("test", 1), ("test", 2)}:
            writer.write(snap)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = load_snapshots(tmp_path)
    assert [(s.query, s.index) for s in loaded] == [
        ("test", 0),
        ("val", 0),
        ("test", 1),
        ("val", 1),
        ("test", 2),
        ("val", 2),
    ]
    writer.truncate({})
    assert load_snapshots(tmp_path) == []
    SnapshotWriter(tmp_path / "empty").truncate({"val": 1})  # no file yet: nothing to do


def test_duplicate_windows_warn(tmp_path):
    writer = SnapshotWriter(tmp_path)
    snap = make_snapshots()[0]
    writer.write(snap)
    writer.write(snap)
    with pytest.warns(UserWarning, match="appears more than once"):
        assert len(load_snapshots(tmp_path)) == 2


def test_final_scores_round_trip(tmp_path):
    results = {
        "val": InfluenceResult(IDS, torch.tensor([-1 / 3, 0.1, 2.5, -7e-12, 0.0], dtype=torch.float64)),
        "single": InfluenceResult(
            IDS[:2], torch.tensor([0.25, -0.5], dtype=torch.float32), per_example=torch.tensor([[0.25], [-0.5]])
        ),
    }
    writer = SnapshotWriter(tmp_path)
    writer.write_final(results, metadata={"global_step": 30, "steps": torch.tensor([10, 20, 30])})
    loaded = load_final_scores(tmp_path)
    assert list(loaded) == ["val", "single"]
    for name, want in results.items():
        got = loaded[name]
        assert torch.equal(got.sample_ids, want.sample_ids) and got.scores.dtype == torch.float64
        assert torch.equal(got.scores.to(want.scores.dtype), want.scores)
        assert got.estimator == "acc"
    assert loaded["val"].per_example is None
    assert torch.equal(loaded["single"].per_example.float(), results["single"].per_example)
    document = json.loads((tmp_path / FINAL_FILE).read_text())
    assert (document["format"], document["version"], document["estimator"]) == ("lightning-influence/final", 1, "acc")
    assert document["metadata"] == {"global_step": 30, "steps": [10, 20, 30]}
    assert set(document["queries"]["val"]) >= {"sample_ids", "scores"}

    # Rewriting replaces the file atomically and leaves no temporary file behind.
    writer.write_final({"val": results["val"]})
    assert sorted(p.name for p in tmp_path.iterdir()) == [FINAL_FILE]
    assert list(load_final_scores(tmp_path / FINAL_FILE)) == ["val"]


def test_missing_and_wrong_files_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match=WINDOWS_FILE):
        load_snapshots(tmp_path)
    with pytest.raises(FileNotFoundError, match="influence"):
        load_snapshots(tmp_path / "nowhere.jsonl")
    with pytest.raises(FileNotFoundError, match=FINAL_FILE):
        load_final_scores(tmp_path)
    (tmp_path / FINAL_FILE).write_text(json.dumps({"format": "lightning-influence/windows", "version": 1}))
    with pytest.raises(ValueError, match="expected format 'lightning-influence/final'"):
        load_final_scores(tmp_path)
    (tmp_path / FINAL_FILE).write_text('{"format": ')
    with pytest.raises(ValueError, match="not valid JSON"):
        load_final_scores(tmp_path)
    # The windows file of a final-scores directory is not confused with it.
    SnapshotWriter(tmp_path).write(make_snapshots()[0])
    assert math.isclose(float(load_snapshots(tmp_path)[0].scores[1]), 2.0)
