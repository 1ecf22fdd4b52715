"""The audit ([concepts.md: The exact counterfactual]): agreement metrics, logging to Lightning loggers, and the
``audit.jsonl`` file."""

from __future__ import annotations

import csv
import json
import math
import sys
import warnings

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from tensorboard.backend.event_processing import event_accumulator as ea

from lightning_influence import AuditReport, load_audit
from lightning_influence.io.audit import AUDIT_FILE, AUDIT_FORMAT, AuditWriter
from lightning_influence.reporting.audit import AUDIT_SCALARS, audit_key, audit_scatter_figure, log_audit
from lightning_influence.results.audit import audit_report, poor_agreement_message

IDS = torch.tensor([10, 11, 12, 13])


def report_of(exact, estimated, ids=IDS, **kwargs) -> AuditReport:
    return audit_report("val", ids, torch.tensor(exact, dtype=torch.float64), torch.tensor(estimated), **kwargs)


def read_events(log_dir) -> ea.EventAccumulator:
    guidance = {k: 0 for k in (ea.SCALARS, ea.HISTOGRAMS, ea.COMPRESSED_HISTOGRAMS, ea.IMAGES, ea.TENSORS, ea.AUDIO)}
    acc = ea.EventAccumulator(str(log_dir), size_guidance=guidance)
    acc.Reload()
    return acc


# --------------------------------------------------------------------------- metrics


def test_perfect_agreement():
    r = report_of([-2.0, -1.0, 0.0, 3.0], [-2.0, -1.0, 0.0, 3.0])
    assert r.spearman == pytest.approx(1.0, abs=1e-5)  # torchmetrics adds 1e-6 to the denominator
    assert r.pearson == pytest.approx(1.0, abs=1e-12)
    assert (r.relative_error, r.sign_agreement) == (0.0, 1.0)
    assert not r.is_poor()
    assert r.sample_ids.dtype == torch.long and r.exact_scores.dtype == r.estimated_scores.dtype == torch.float64


def test_hand_computed_values():
    exact, est = [1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 5.0]
    r = report_of(exact, est)
    # Spearman: rank differences (0, 1, 1, 0) -> 1 − 6·2 / (4·15) = 0.8.
    assert r.spearman == pytest.approx(0.8, abs=1e-5)
    # Pearson: deviations (−1.5, −.5, .5, 1.5) and (−1.75, .25, −.75, 2.25): 5.5 / sqrt(5 · 8.75).
    assert r.pearson == pytest.approx(5.5 / math.sqrt(5 * 8.75), rel=1e-12)
    assert r.relative_error == pytest.approx(math.sqrt(3 / 30), rel=1e-12)
    assert r.sign_agreement == 1.0
    # Gaps (0, 1, 1, 1): the three ties keep the id order, the exact match comes last.
    assert r.worst == [(11, 2.0, 3.0), (12, 3.0, 2.0), (13, 4.0, 5.0), (10, 1.0, 1.0)]
    assert r.is_poor(min_spearman=0.9) and not r.is_poor(min_spearman=0.75) and r.is_poor(0.75, 0.3)


def test_sign_flip():
    r = report_of([-2.0, -1.0, 0.0, 3.0], [2.0, 1.0, 0.0, -3.0])
    assert r.spearman == pytest.approx(-1.0, abs=1e-5)
    assert r.pearson == pytest.approx(-1.0, abs=1e-12)
    assert r.relative_error == pytest.approx(2.0, rel=1e-12)
    assert r.sign_agreement == 0.25  # only the exact 0, estimated 0 agrees
    assert r.is_poor()
    assert [w[0] for w in r.worst] == [13, 10, 11, 12]


def test_constant_inputs_give_nan_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        constant_exact = report_of([1.0, 1.0, 1.0], [1.0, 2.0, 3.0], ids=IDS[:3])
        constant_est = report_of([1.0, 2.0, 3.0], [5.0, 5.0, 5.0], ids=IDS[:3])
    for r in (constant_exact, constant_est):
        assert math.isnan(r.spearman) and math.isnan(r.pearson)
    assert constant_exact.relative_error == pytest.approx(math.sqrt(5 / 3), rel=1e-12)
    assert constant_exact.sign_agreement == 1.0
    assert constant_exact.is_poor()  # by its relative error; the nan Spearman is no evidence either way
    assert not report_of([1.0, 1.0], [1.0, 1.0], ids=IDS[:2]).is_poor()


def test_one_sample():
    r = report_of([-0.5], [-0.25], ids=torch.tensor([7]))
    assert math.isnan(r.spearman) and math.isnan(r.pearson)
    assert (r.relative_error, r.sign_agreement, r.worst) == (0.5, 1.0, [(7, -0.5, -0.25)])
    assert not r.is_poor()


def test_zero_exact_scores():
    assert report_of([0.0, 0.0], [0.0, -0.0], ids=IDS[:2]).relative_error == 0.0
    r = report_of([0.0, 0.0], [0.0, 1e-9], ids=IDS[:2])
    assert r.relative_error == math.inf and r.sign_agreement == 0.5 and r.is_poor()


def test_empty_and_non_finite():
    empty = audit_report("val", torch.zeros(0, dtype=torch.long), torch.zeros(0), torch.zeros(0))
    assert empty.num_samples == 0 and empty.worst == [] and empty.relative_error == 0.0
    assert math.isnan(empty.spearman) and math.isnan(empty.sign_agreement) and not empty.is_poor()
    r = report_of([1.0, float("nan"), 3.0], [1.0, 2.0, 4.0], ids=IDS[:3])
    assert math.isnan(r.spearman) and math.isnan(r.relative_error) and r.is_poor()
    assert r.worst[0][0] == 11 and r.sign_agreement == pytest.approx(2 / 3)


def test_worst_keeps_five_largest_gaps_in_order():
    ids = torch.arange(100, 108)
    exact = torch.zeros(8)
    est = torch.tensor([0.1, -0.7, 0.3, 0.0, 0.5, -0.2, 0.9, 0.4], dtype=torch.float32)
    r = audit_report("q", ids, exact, est)
    assert [w[0] for w in r.worst] == [106, 101, 104, 107, 102]
    assert r.worst[0] == (106, 0.0, float(torch.tensor(0.9, dtype=torch.float32)))
    assert all(type(v) is float for _, ex, est in r.worst for v in (ex, est))


def test_sequences_are_read_as_float64():
    r = audit_report("q", [1, 2], [0.1, 0.2], [0.1, 0.2])
    assert r.exact_scores.tolist() == [0.1, 0.2] and r.relative_error == 0.0


@pytest.mark.parametrize(
    "ids, exact, estimated, match",
    [
        (IDS, torch.zeros(4, 1), torch.zeros(4), r"exact must be a 1-D tensor \[N\], got shape \(4, 1\)"),
        (IDS, torch.zeros(4), torch.zeros(3), r"sample_ids \(4,\), exact \(4,\), estimated \(3,\)"),
        (IDS[:3], torch.zeros(4), torch.zeros(4), r"sample_ids \(3,\), exact \(4,\)"),
        (IDS.float(), torch.zeros(4), torch.zeros(4), "sample_ids must hold integers"),
        (IDS, torch.zeros(4, dtype=torch.bool), torch.zeros(4), "exact must hold real numbers"),
        (IDS, torch.zeros(4), [[1.0], [2.0, 3.0]], "estimated must be"),
    ],
)
def test_shapes_are_validated(ids, exact, estimated, match):
    with pytest.raises(ValueError, match=match):
        audit_report("val", ids, exact, estimated)


def test_window_and_query_are_validated():
    with pytest.raises(ValueError, match="end_step"):
        audit_report("val", IDS, torch.zeros(4), torch.zeros(4), start_step=10, end_step=5)
    with pytest.raises(ValueError, match="start_step"):
        audit_report("val", IDS, torch.zeros(4), torch.zeros(4), start_step=True)
    with pytest.raises(ValueError, match="query"):
        audit_report(3, IDS, torch.zeros(4), torch.zeros(4))


def test_repr_is_one_line_summary():
    text = repr(report_of([1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 5.0], estimator="acc", start_step=0, end_step=50))
    assert "\n" not in text
    for part in ("'val'", "'acc'", "steps [0, 50)", "N=4", "spearman=0.8", "pearson=0.8315", "relative_error=0.3162"):
        assert part in text
    assert "sign_agreement=1" in text
    assert "whole run" in repr(report_of([1.0], [1.0], ids=IDS[:1]))


def test_poor_agreement_message():
    r = report_of([-2.0, -1.0, 0.0, 3.0], [2.0, 1.0, 0.0, -3.0], estimator="first-order", start_step=0, end_step=40)
    message = poor_agreement_message(r)
    for part in ("'val'", "steps [0, 40)", "4 audited samples", "'first-order'", "Spearman -1", "Pearson -1"):
        assert part in message
    assert "relative error 2 " in message and "25%" in message and "id 13" in message
    for hint in ("learning rate", "window", 'precision="64-true"', 'estimator="exact"', "track=[", 'estimator="acc"'):
        assert hint in message
    assert "nan" in poor_agreement_message(report_of([1.0, 1.0], [1.0, 5.0], ids=IDS[:2]))


# --------------------------------------------------------------------------- loggers

REPORTS = [
    report_of([1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 5.0], estimator="acc", start_step=0, end_step=10),
    report_of([-2.0, -1.0, 0.0, 3.0], [2.0, 1.0, 0.0, -3.0], estimator="acc", start_step=10, end_step=20),
]


def test_no_logger_does_nothing():
    assert log_audit([], REPORTS[0]) is None
    assert log_audit(None, REPORTS[0]) is None


def test_tensorboard_scalars_image_and_text(tmp_path):
    pytest.importorskip("matplotlib")
    logger = TensorBoardLogger(save_dir=tmp_path, name="tb")
    for report in REPORTS:
        log_audit([logger], report)
    logger.finalize("success")
    acc = read_events(logger.log_dir)
    tags = acc.Tags()
    assert set(tags["scalars"]) == {f"influence/val/audit/{name}" for name in AUDIT_SCALARS}
    for name in AUDIT_SCALARS:
        events = acc.Scalars(audit_key("val", name))
        assert [e.step for e in events] == [10, 20]
        assert [e.value for e in events] == pytest.approx([getattr(r, name) for r in REPORTS], rel=1e-6)
    images = acc.Images("influence/val/audit/scatter")
    assert [im.step for im in images] == [10, 20]
    assert images[0].encoded_image_string.startswith(b"\x89PNG") and images[0].width > 100
    texts = acc.Tensors(audit_key("val", "worst_samples") + "/text_summary")
    assert [e.step for e in texts] == [10, 20]
    last = texts[-1].tensor_proto.string_val[0].decode()
    assert "steps [10, 20)" in last and "Spearman -1" in last
    assert "| 1 | 13 | +3.0000e+00 | -3.0000e+00 | -6.0000e+00 |" in last


def test_scatter_figure_draws_diagonal_and_labels_worst():
    pytest.importorskip("matplotlib")
    fig = audit_scatter_figure(REPORTS[0])
    (ax,) = fig.axes
    (diagonal,) = [line for line in ax.get_lines() if line.get_label() == "estimate = exact"]
    x, y = diagonal.get_data()
    assert list(x) == list(y)
    assert {t.get_text() for t in ax.texts} == {"id 10", "id 11", "id 12", "id 13"}


def test_step_and_namespace_override(tmp_path):
    logger = TensorBoardLogger(save_dir=tmp_path, name="tb")
    log_audit(logger, REPORTS[0], namespace="influence_1", step=99)
    logger.finalize("success")
    acc = read_events(logger.log_dir)
    assert [e.step for e in acc.Scalars("influence_1/val/audit/spearman")] == [99]


def test_missing_matplotlib_only_skips_the_image(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    logger = TensorBoardLogger(save_dir=tmp_path, name="tb")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        log_audit([logger], REPORTS[0])
    logger.finalize("success")
    tags = read_events(logger.log_dir).Tags()
    assert tags["images"] == [] and audit_key("val", "worst_samples") + "/text_summary" in tags["tensors"]


def test_csv_logger_gets_the_scalars(tmp_path):
    csv_logger = CSVLogger(save_dir=tmp_path, name="csv")
    single = report_of([0.5], [0.25], ids=IDS[:1], end_step=30)
    for report in [*REPORTS, single]:
        log_audit([csv_logger], report)
    csv_logger.finalize("success")
    with open(f"{csv_logger.log_dir}/metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert set(rows[0]) == {"step"} | {audit_key("val", name) for name in AUDIT_SCALARS}
    assert [int(r["step"]) for r in rows] == [10, 20, 30]
    for row, report in zip(rows, [*REPORTS, single]):
        for name in AUDIT_SCALARS:
            assert float(row[audit_key("val", name)]) == pytest.approx(getattr(report, name), rel=1e-12, nan_ok=True)


def test_only_rank_zero_logs(tmp_path, monkeypatch):
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    logger = CSVLogger(save_dir=tmp_path, name="csv")
    log_audit([logger], REPORTS[0])
    assert not list(tmp_path.rglob("metrics.csv"))


# --------------------------------------------------------------------------- audit.jsonl


def assert_same(got: AuditReport, want: AuditReport) -> None:
    for field in ("query", "start_step", "end_step", "estimator"):
        assert getattr(got, field) == getattr(want, field)
    assert got.sample_ids.dtype == torch.long and torch.equal(got.sample_ids, want.sample_ids)
    for field in ("exact_scores", "estimated_scores"):
        a, b = getattr(got, field), getattr(want, field)
        assert a.dtype == torch.float64 and torch.equal(torch.isnan(a), torch.isnan(b))
        assert torch.equal(a[~torch.isnan(a)], b[~torch.isnan(b)])
        assert torch.equal(torch.signbit(a), torch.signbit(b))  # −0.0 stays −0.0
    for field in ("spearman", "pearson", "relative_error", "sign_agreement"):
        a, b = getattr(got, field), getattr(want, field)
        assert type(a) is float and (a == b or (math.isnan(a) and math.isnan(b)))
    assert len(got.worst) == len(want.worst)
    for (i, ex, est), (j, ex2, est2) in zip(got.worst, want.worst):
        assert i == j and repr(ex) == repr(ex2) and repr(est) == repr(est2)


def awkward_reports() -> list[AuditReport]:
    values = torch.tensor([1 / 3, -1e-300, 5e-324, -0.0, 1e300, 0.1], dtype=torch.float64)
    ids = torch.tensor([7, 0, 3, 100, 2, 55])
    return [
        audit_report("val", ids, values, values * 0.5 + 1e-3, "acc", 0, 10),
        audit_report("test", ids, values, torch.randn(6, generator=torch.Generator().manual_seed(0)).float(), "acc"),
        report_of([0.0, float("nan")], [1.0, float("-inf")], ids=IDS[:2], end_step=20),  # inf, nan metrics
        report_of([0.0, 0.0], [0.0, 2.0], ids=IDS[:2], start_step=20, end_step=30),  # relative_error inf
        audit_report("val", torch.zeros(0, dtype=torch.long), torch.zeros(0), torch.zeros(0), "exact"),
    ]


def test_round_trip_exactly(tmp_path):
    written = awkward_reports()
    assert written[3].relative_error == math.inf and math.isnan(written[2].relative_error)
    writer = AuditWriter(tmp_path / "nested" / "influence")
    for report in written:
        writer.write(report)
    path = tmp_path / "nested" / "influence" / AUDIT_FILE
    for line in path.read_text().splitlines():  # strict JSON: no NaN / Infinity tokens
        record = json.loads(line, parse_constant=lambda token: pytest.fail(f"non-standard JSON {token}"))
        assert (record["format"], record["version"]) == (AUDIT_FORMAT, 1)
    for source in (path, path.parent):
        loaded = load_audit(source)
        assert len(loaded) == len(written)
        for got, want in zip(loaded, written):
            assert_same(got, want)


def test_truncate_keeps_the_first_reports(tmp_path):
    writer = AuditWriter(tmp_path)
    writer.truncate(3)  # no file: nothing to do
    assert not writer.path.exists()
    written = awkward_reports()
    for report in written:
        writer.write(report)
    writer.truncate(10)
    assert len(load_audit(tmp_path)) == 5
    writer.truncate(2)
    assert [r.query for r in load_audit(tmp_path)] == ["val", "test"]
    writer.write(written[3])
    loaded = load_audit(tmp_path)
    assert len(loaded) == 3 and loaded[2].relative_error == math.inf
    writer.truncate(0)
    assert writer.path.read_text() == ""
    with pytest.raises(ValueError, match="keep"):
        writer.truncate(-1)


def test_partial_last_line(tmp_path):
    written = awkward_reports()
    writer = AuditWriter(tmp_path)
    writer.write(written[0])
    writer.write(written[1])
    with open(writer.path, "a", encoding="utf-8") as f:
        f.write('{"format": "lightning-influence/audit", "ver')
    with pytest.warns(UserWarning, match="truncated last record"):
        assert len(load_audit(tmp_path)) == 2
    with pytest.warns(UserWarning, match="partial last line"):
        AuditWriter(tmp_path).write(written[2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = load_audit(tmp_path)
    assert [r.query for r in loaded] == ["val", "test", "val"]
    assert_same(loaded[2], written[2])


def test_corrupt_or_foreign_files_raise(tmp_path):
    writer = AuditWriter(tmp_path)
    writer.write(awkward_reports()[0])
    lines = writer.path.read_text()
    writer.path.write_text("{not json\n" + lines)
    with pytest.raises(ValueError, match="line 1: not valid JSON"):
        load_audit(tmp_path)
    writer.path.write_text(lines.replace('"version":1', '"version":2'))
    with pytest.raises(ValueError, match="newer"):
        load_audit(tmp_path)
    writer.path.write_text(lines.replace("lightning-influence/audit", "lightning-influence/windows"))
    with pytest.raises(ValueError, match="expected format"):
        load_audit(tmp_path)
    writer.path.write_text(lines.replace('"spearman":', '"spearman_":'))
    with pytest.raises(ValueError, match="lacks spearman"):
        load_audit(tmp_path)
    with pytest.raises(FileNotFoundError, match=AUDIT_FILE):
        load_audit(tmp_path / "elsewhere")


def test_start_moves_an_earlier_run_aside(tmp_path):
    writer = AuditWriter(tmp_path)
    writer.write(awkward_reports()[0])
    with pytest.warns(UserWarning, match="moved to audit.1.jsonl"):
        AuditWriter(tmp_path).start(None)
    assert not writer.path.exists() and (tmp_path / "audit.1.jsonl").exists()
