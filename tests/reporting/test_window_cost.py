"""The per-window savings of issue 24 (benchmarks/window_cost.py) change no logged value: the tables from the running
sum equal those from the whole window matrix, a resumed sink starts from the recorder's sum, the figure drawn with
one layout pass is the same image, and the tables rank ties and NaN as before."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_influence.reporting.window_sink import LoggerSink
from lightning_influence.reporting.windows import (
    log_window,
    render_figure,
    strongest_over_windows_figure,
    top_samples_table,
)
from lightning_influence.results.windows import WindowRecorder


class Writer:
    """A ``SummaryWriter`` that keeps what it is given."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any, int | None]] = []

    def __getattr__(self, method: str):
        def record(tag: Any, value: Any = None, global_step: int | None = None, **kwargs: Any) -> None:
            self.calls.append((method, tag, value, global_step))

        return record


class Board(TensorBoardLogger):
    def __init__(self) -> None:  # no folder, no events file
        self.writer = Writer()

    @property
    def experiment(self) -> Writer:  # type: ignore[override]
        return self.writer

    def log_metrics(self, metrics: Any, step: int | None = None) -> None:
        pass


def texts(board: Board) -> list[tuple[str, str, int | None]]:
    return [(tag, value, step) for method, tag, value, step in board.writer.calls if method == "add_text"]


def recorded_windows(n: int, k: int = 7) -> tuple[WindowRecorder, list]:
    gen = torch.Generator().manual_seed(3)
    recorder = WindowRecorder(torch.arange(100, 100 + k))
    totals, snapshots = torch.zeros(k, dtype=torch.float64), []
    for w in range(n):
        totals = totals + torch.randn(k, generator=gen, dtype=torch.float64)
        snapshots.append(recorder.close("val", w + 1, 0, totals.clone()))
    return recorder, snapshots


def test_the_sinks_tables_from_the_running_sum_equal_those_from_the_whole_matrix():
    recorder, snapshots = recorded_windows(12)
    sink = LoggerSink([Board()], 3, "influence", figure_every=10**6)
    sink_board = sink.loggers[0]
    assert isinstance(sink_board, Board)
    reference = Board()
    for snap in snapshots:
        sink.window(snap, recorder)
        history = torch.stack([s.scores for s in snapshots[: snap.index + 1]])
        log_window([reference], snap, history, 3, namespace="influence", figure=False, step=snap.end_step - 1)
    assert len(texts(sink_board)) == 2 * len(snapshots)
    assert texts(sink_board) == texts(reference)


def test_a_resumed_sink_starts_from_the_recorders_sum():
    recorder, snapshots = recorded_windows(6)
    sink = LoggerSink([Board()], 3, "influence", figure_every=10**6)
    sink.window(snapshots[-1], recorder)  # windows 0-4 closed before the resume
    board = sink.loggers[0]
    assert isinstance(board, Board)
    reference = Board()
    history = torch.stack([s.scores for s in snapshots])
    log_window([reference], snapshots[-1], history, 3, figure=False, step=snapshots[-1].end_step - 1)
    assert texts(board) == texts(reference)


def test_the_figure_needs_one_layout_pass():
    pytest.importorskip("matplotlib")
    _, snapshots = recorded_windows(5)
    history = torch.stack([s.scores for s in snapshots])
    ids = snapshots[0].sample_ids

    def image(tight: bool):
        return render_figure(strongest_over_windows_figure(history, ids, [1, 2, 3, 4, 5], title="t"), tight)

    assert (image(True) == image(False)).all()


def reference_table(ids, scores, cumulative, top_k, by):  # the ranking before issue 24: tensor sorts
    key = cumulative if by == "cumulative" else scores
    harmful = [i for i in torch.argsort(key, stable=True).tolist() if key[i] < 0][:top_k]
    helpful = [i for i in torch.argsort(key, descending=True, stable=True).tolist() if key[i] > 0][:top_k]
    return [ids[i] for i in harmful], [ids[i] for i in helpful]


@pytest.mark.parametrize("by", ["window", "cumulative"])
def test_the_tables_rank_ties_by_position_and_leave_nan_out(by):
    scores = torch.tensor([0.5, -1.0, 0.5, float("nan"), -1.0, 0.0, 2.0, -0.25, 0.5], dtype=torch.float64)
    cumulative = scores.flip(0)
    ids = list(range(20, 29))
    table = top_samples_table(torch.tensor(ids), scores, cumulative, top_k=3, by=by)
    harmful, helpful = reference_table(ids, scores, cumulative, 3, by)
    harmful_text, helpful_text = table.split("Most helpful")
    assert ranked(harmful_text) == harmful and ranked(helpful_text) == helpful


def ranked(text: str) -> list[int]:
    return [int(line.split("|")[2]) for line in text.splitlines() if line.startswith("| ") and "rank" not in line]
