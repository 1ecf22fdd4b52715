"""Issue 22 ("what users see"): the TensorBoard previews of the most harmful and most helpful samples are one readable,
labelled picture per set; the labels come from the training items."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import TensorDataset

from lightning_influence import IndexedDataset
from lightning_influence.reporting.window_sink import LoggerSink
from lightning_influence.results.previews import image_preview, labelled_grid, sample_labels
from lightning_influence.results.windows import WindowRecorder

PIL = pytest.importorskip("PIL")  # the captions need Pillow (installed with matplotlib)


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


def digits(n: int = 20) -> IndexedDataset:
    gen = torch.Generator().manual_seed(0)
    return IndexedDataset(TensorDataset(torch.rand(n, 1, 8, 8, generator=gen), torch.arange(n) % 10))


def images_logged(board: Board) -> dict[str, list[torch.Tensor]]:
    found: dict[str, list[torch.Tensor]] = {}
    for method, tag, value, _ in board.writer.calls:
        if method in ("add_image", "add_images") and "samples" in tag:
            found.setdefault(tag, []).append(value)
    return found


def test_the_grid_enlarges_each_image_and_leaves_room_for_the_captions():
    images = torch.rand(8, 1, 8, 8)
    grid = labelled_grid(images, list(range(8)), [-1.0] * 8, [3] * 8, title="t")
    assert grid.dtype == torch.uint8 and grid.shape[0] == 3
    # 4 columns of cells at least 64 px wide; 2 rows of 64 px images, each with 3 caption lines under it
    assert grid.shape[2] >= 4 * 64 and grid.shape[1] >= 2 * (64 + 3 * 12)
    plain = labelled_grid(images, list(range(8)), [-1.0] * 8)  # no labels: a line less per cell
    assert plain.shape[2] == grid.shape[2] and plain.shape[1] < grid.shape[1]
    assert labelled_grid(torch.rand(1, 3, 32, 32), [0], [1.0]).shape[2] >= 64  # 32 px: doubled
    with pytest.raises(ValueError, match="sample ids"):
        labelled_grid(images, [1, 2], [0.0, 0.0])


def test_the_grid_draws_each_image_nearest_neighbour():
    checker = ((torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2).float()  # 0 (black) at the top left
    grid = labelled_grid(checker[None, None], [7], [-1.0], [1], title="t")
    black = (grid == 0).all(0)  # only the image is pure black (the captions are grey, red or blue)
    rows, cols = black.nonzero(as_tuple=True)
    top, left = int(rows.min()), int(cols.min())
    assert (int(rows.max()) - top + 1, int(cols.max()) - left + 1) == (64, 64)
    expected = (checker.repeat_interleave(8, 0).repeat_interleave(8, 1) * 255).to(torch.uint8)
    assert torch.equal(grid[:, top : top + 64, left : left + 64], expected.expand(3, -1, -1))


def test_labels_are_the_element_after_the_input():
    ds = digits()
    assert sample_labels(ds, [3, 12]) == [3, 2]
    assert sample_labels(ds.dataset, [3]) == [3]
    # (x,) items: IndexedDataset adds the index after x, which is no label
    assert sample_labels(IndexedDataset(torch.rand(4, 8, 8)), [1, 2]) == [None, None]
    assert sample_labels(IndexedDataset(TensorDataset(torch.rand(4, 2), torch.rand(4))), [0]) == [None]  # float
    assert sample_labels([{"x": torch.rand(2), "label": 5}, {"x": torch.rand(2)}], [0, 1]) == [5, None]
    assert sample_labels(None, [0]) == [None]
    assert sample_labels([], [3]) == [None]  # unreadable: no label, no error


def test_the_sink_logs_one_labelled_grid_per_set():
    k = 12
    recorder = WindowRecorder(torch.arange(k))
    scores = torch.tensor([-5.0, 4.0, -3.0, 2.0, 0.0, float("nan"), -1.0, 1.0, -0.5, 0.5, -0.25, 3.0])
    snapshot = recorder.close("val", 1, 0, scores.to(torch.float64))
    shown: list[list[int]] = []

    def preview(dataset: Any, ids: Any) -> torch.Tensor | None:
        shown.append(list(ids))
        return image_preview(dataset, ids)

    sink = LoggerSink([Board()], 3, "influence", figure_every=1, preview=preview, dataset=digits(k))
    sink.window(snapshot, recorder)
    # most harmful first, then most helpful first; zero and NaN in neither set (as in the top_samples tables)
    assert shown == [[0, 2, 6, 8, 10], [1, 11, 3, 7, 9]]
    board = sink.loggers[0]
    assert isinstance(board, Board)
    found = images_logged(board)
    assert set(found) == {"influence/val/most_harmful_samples", "influence/val/most_helpful_samples"}
    for grids in found.values():
        assert len(grids) == 1  # one picture per set
        (grid,) = grids
        assert grid.dim() == 4 and grid.shape[:2] == (1, 3)  # a batch of one RGB picture
        assert grid.shape[3] >= 4 * 64 and grid.shape[2] >= 64 + 64  # 5 images a set: 2 rows of 64 px
    assert sink.final(None, None) is None
    found = images_logged(board)
    assert len(found["influence/val/most_harmful_samples_overall"]) == 1


def test_a_side_without_samples_logs_no_picture():
    recorder = WindowRecorder(torch.arange(4))
    snapshot = recorder.close("val", 1, 0, torch.tensor([1.0, 2.0, 0.0, 3.0], dtype=torch.float64))
    sink = LoggerSink([Board()], 3, "influence", figure_every=1, preview=image_preview, dataset=digits(4))
    sink.window(snapshot, recorder)
    board = sink.loggers[0]
    assert isinstance(board, Board)
    assert set(images_logged(board)) == {"influence/val/most_helpful_samples"}


def test_a_failing_preview_logs_nothing_and_training_goes_on():
    def broken(dataset: Any, ids: Any) -> torch.Tensor:
        raise RuntimeError("no")

    recorder = WindowRecorder(torch.arange(4))
    snapshot = recorder.close("val", 1, 0, torch.tensor([-1.0, 2.0, 0.0, 3.0], dtype=torch.float64))
    for preview in (broken, lambda dataset, ids: torch.rand(len(ids), 5, 8, 8)):  # raises; 5 channels
        sink = LoggerSink([Board()], 3, "influence", figure_every=1, preview=preview, dataset=digits(4))
        sink.window(snapshot, recorder)
        board = sink.loggers[0]
        assert isinstance(board, Board)
        assert images_logged(board) == {}


def test_the_window_pictures_follow_the_figures_schedule():
    """Pictures cost more than the rest of a window's reporting: like the figure, every ``figure_every``-th window
    and the last one at the end of fit (with the whole run's, by cumulative score)."""
    gen = torch.Generator().manual_seed(2)
    recorder = WindowRecorder(torch.arange(10))
    snapshots = [recorder.close("val", w + 1, 0, torch.randn(10, generator=gen, dtype=torch.float64)) for w in range(5)]
    sink = LoggerSink([Board()], 3, "influence", figure_every=2, preview=image_preview, dataset=digits(10))
    for snapshot in snapshots:
        sink.window(snapshot, recorder)
    board = sink.loggers[0]
    assert isinstance(board, Board)

    def steps(tag: str) -> list[int | None]:
        return [step for method, key, _, step in board.writer.calls if method == "add_images" and key == tag]

    assert steps("influence/val/most_harmful_samples") == [1, 3]  # windows 1 and 3 (logger step = end step - 1)
    sink.final(None, None)
    assert steps("influence/val/most_harmful_samples") == [1, 3, 4]  # and the last window, at the end
    assert steps("influence/val/most_helpful_samples_overall") == [4]
