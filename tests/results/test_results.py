"""What a user reads: results as short tables (REPL and notebook), pandas, save/load, compact reprs; and
self-influence, checked against leave-one-out retraining of each sample's own loss."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_influence import InfluenceResult, InfluenceTracker, WindowSnapshot
from lightning_influence.testing import (
    TinyClassifier,
    fixed_loader,
    leave_one_out,
    lightning_trainer,
    random_classification,
    random_schedule,
)


@pytest.fixture
def result() -> InfluenceResult:
    scores = torch.linspace(-1, 1, 25, dtype=torch.float64)
    return InfluenceResult(torch.arange(100, 125), scores, torch.stack([scores, 2 * scores], dim=1), "acc")


def test_the_repr_is_a_short_table(result):
    lines = repr(result).splitlines()
    assert lines[0] == "InfluenceResult(k=25, estimator='acc', harmful=12)"
    assert lines[1].split() == ["sample_id", "score"] and lines[2].split() == ["100", "-1.0000e+00"]
    assert ["…", "…"] in [line.split() for line in lines] and lines[-2].split() == ["124", "+1.0000e+00"]
    assert len(lines) == 14 and "per_example: Tensor[25, 2]" in lines[-1]
    html = result._repr_html_()
    assert html.count("<tr>") == 1 + 21 and "<td>100</td><td>-1.0000e+00</td>" in html


def test_to_pandas(result):
    pytest.importorskip("pandas")
    frame = result.to_pandas()
    assert list(frame.columns) == ["sample_id", "score"] and frame["sample_id"].tolist() == list(range(100, 125))
    assert frame["score"].tolist() == result.scores.tolist()
    long = result.to_pandas(per_example=True)
    assert list(long.columns) == ["sample_id", "query_index", "score"] and len(long) == 50
    assert long[(long.sample_id == 101) & (long.query_index == 1)].score.item() == float(result.per_example[1, 1])
    with pytest.raises(ValueError, match="no per-example scores"):
        InfluenceResult(result.sample_ids, result.scores).to_pandas(per_example=True)


def test_save_and_load_round_trip(result, tmp_path):
    result.save(tmp_path / "r.pt")
    loaded = InfluenceResult.load(tmp_path / "r.pt")
    assert torch.equal(loaded.sample_ids, result.sample_ids) and torch.equal(loaded.scores, result.scores)
    assert torch.equal(loaded.per_example, result.per_example) and loaded.estimator == "acc"
    torch.save({"format": "other"}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not an InfluenceResult file"):
        InfluenceResult.load(tmp_path / "x.pt")


def test_snapshots_print_on_one_line():
    snapshot = WindowSnapshot("val", 2, 8, 12, 1, torch.arange(500), torch.linspace(-1, 0.5, 500))
    assert repr(snapshot) == (
        "WindowSnapshot(query='val', index=2, steps 8–12, epoch 1, k=500, harmful=333, strongest id 0 (-1.000e+00))"
    )


# ------------------------------------------------------------------------------------------- self-influence
N = 16


def _run(estimator: str):
    x, y, query = random_classification(N, 4, 3, seed=9)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    schedule = random_schedule(N, 4, 2, seed=2)

    def adamw(m):
        return torch.optim.AdamW(m.parameters(), lr=0.05)

    tracker = InfluenceTracker(estimator=estimator, queries={"val": query}, window_every_n_epochs=1)
    lightning_trainer(2, callbacks=[tracker]).fit(TinyClassifier(net, adamw), fixed_loader(x, y, schedule))
    torch.manual_seed(0)
    fresh = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    return tracker, (fresh, adamw, x, y, schedule)


def test_exact_self_influence_is_leave_one_out_on_the_samples_own_loss():
    tracker, (net, adamw, x, y, schedule) = _run("exact")
    result = tracker.self_influence(chunk_size=5)
    assert torch.equal(result.sample_ids, torch.arange(N))
    for j in (0, 6, 13):
        loo = leave_one_out(net, adamw, x, y, schedule, (x[j : j + 1], y[j : j + 1]), [j])
        torch.testing.assert_close(result.scores[j : j + 1], loo, rtol=1e-8, atol=1e-13)
    assert (result.scores > 0).float().mean() > 0.5  # removing a sample mostly raises its own loss


def test_first_order_self_influence_is_the_projection_on_each_samples_own_loss():
    tracker, (_, _, x, y, _) = _run("first-order")
    result = tracker.self_influence(chunk_size=7)
    per = tracker.influence((x, y, torch.arange(N)), per_example=True).per_example  # [k, n], row j on example i
    torch.testing.assert_close(result.scores, per.diagonal(), rtol=1e-10, atol=1e-15)


def test_a_named_tracker_logs_under_its_name_and_shows_its_cost_in_the_progress_bar(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    x, y, query = random_classification(N, 4, 3, seed=9)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    tracker = InfluenceTracker(queries={"val": query}, name="mytracker")
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = lightning_trainer(1, callbacks=[tracker], logger=logger)
    trainer.fit(
        TinyClassifier(net, lambda m: torch.optim.SGD(m.parameters(), lr=0.1)),
        fixed_loader(x, y, random_schedule(N, 4, 1)),
    )
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    assert "mytracker/val/harmful_mass" in events.Tags()["scalars"]
    texts = events.Tags()["tensors"]
    assert "mytracker/val/top_samples_cumulative/text_summary" in texts  # next to the window's own table
    assert "custom_scalars__config__" in texts  # the Custom Scalars tab's layout
    assert (tmp_path / "tb" / "version_0" / "mytracker" / "windows.jsonl").is_file()
    assert trainer.progress_bar_metrics["tracker_ms"] > 0
    with pytest.raises(ValueError, match="name must be a non-empty string"):
        InfluenceTracker(name="a/b")


def test_the_most_harmful_and_helpful_samples_are_shown_as_images(tmp_path):
    pytest.importorskip("matplotlib")
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_influence import IndexedDataset

    gen = torch.Generator().manual_seed(0)
    images, labels = (
        torch.randn(16, 1, 6, 6, generator=gen, dtype=torch.float64),
        torch.randint(0, 3, (16,), generator=gen),
    )
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(36, 3)).double()
    dataset = IndexedDataset(TensorDataset(images, labels))
    tracker = InfluenceTracker(
        queries={"val": (images[:4], labels[:4])}, window_every_n_epochs=1, log_figure_every_n_windows=1
    )  # the pictures of a window's samples follow the figure's schedule
    logger = TensorBoardLogger(tmp_path, name="tb")
    lightning_trainer(2, callbacks=[tracker], logger=logger).fit(
        TinyClassifier(net, lambda m: torch.optim.SGD(m.parameters(), lr=0.1)), DataLoader(dataset, batch_size=4)
    )
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()["images"]
    for name in ("most_harmful_samples", "most_helpful_samples", "most_harmful_samples_overall"):
        assert f"influence/val/{name}" in tags, tags
    harmful = events.Images("influence/val/most_harmful_samples")
    assert [e.step for e in harmful] == [3, 7]  # one labelled grid per window
    assert harmful[0].width >= 4 * 64 and harmful[0].height >= 2 * 64  # 8 images of 6×6, enlarged to 66×66
    helpful = tracker.influence("val").most_helpful(5)
    figure = helpful.show(dataset)
    sample_id = int(helpful.sample_ids[0])
    title = figure.axes[0].get_title()
    assert len(figure.axes) == 5 and title.startswith(f"id {sample_id} · label {int(labels[sample_id])}\n")
    assert title.endswith(f"{float(helpful.scores[0]):+.2e}")
    with pytest.raises(ValueError, match="not images"):
        tracker.influence("val").show(IndexedDataset(TensorDataset(torch.randn(16, 36), labels)))
