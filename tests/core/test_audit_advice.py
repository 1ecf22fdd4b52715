"""``AuditReport.advice``: what an audit's numbers mean for this run and what to do, in the report, its text, the
TensorBoard table and the end-of-fit warning."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from lightning_influence import AuditReport, InfluenceTracker
from lightning_influence.reporting.audit import audit_table
from lightning_influence.results.audit import audit_advice, audit_report, poor_agreement_message

IDS = torch.tensor([10, 11, 12, 13])


def report_of(exact, estimated, ids=IDS, **kwargs) -> AuditReport:
    return audit_report("val", ids, torch.tensor(exact, dtype=torch.float64), torch.tensor(estimated), **kwargs)


def test_good_agreement():
    r = report_of([1.0, 2.0, 3.0, 4.0], [1.0, 2.1, 2.9, 4.0], estimator="acc", start_step=0, end_step=20)
    assert not r.is_poor()
    assert r.advice.startswith("Good agreement over steps [0, 20) (4 audited samples): relative error 0.02582")
    assert "the ranking (Spearman 1 ≥ 0.8) and the magnitudes are usable" in r.advice
    assert "What usually helps" not in r.advice
    assert str(r) == f"{r!r}\n{r.advice}"


def test_poor_magnitudes_with_a_usable_ranking():
    r = report_of([1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0, 8.5], estimator="acc", start_step=0, end_step=12)
    assert r.is_poor() and r.spearman == pytest.approx(1.0, abs=1e-5)
    advice = r.advice
    assert advice.startswith("Poor agreement over steps [0, 12) (4 audited samples).")
    assert "Relative error 1.068 over steps [0, 12) (wanted ≤ 0.5): the 'acc' linearisation is far from the" in advice
    assert "so the scores are not predicted loss changes" in advice
    assert "the ranking is still usable (Spearman 1 ≥ 0.8)" in advice
    assert "window_every_n_steps=3: this one spans 12 steps" in advice  # sized from this window
    gaps = 'estimator="exact" for the samples that matter (track=[...]; the largest gaps here: ids [13, 12, 11])'
    assert gaps in advice
    assert "Signs agree" not in advice and 'estimator="acc"' not in advice  # all signs agree; already "acc"


def test_poor_ranking_and_magnitudes():
    r = report_of([-2.0, -1.0, 0.0, 3.0], [2.0, 1.0, 0.0, -3.0], estimator="first-order")
    advice = r.advice
    assert advice.startswith("Poor agreement over the whole run (4 audited samples). Relative error 2 over the whole")
    assert "the ranking is not usable (Spearman -1, wanted ≥ 0.8)." in advice
    assert "Signs agree for only 25%" in advice
    assert 'estimator="acc" rather than "first-order"' in advice
    assert "tracker.audit_windows(name)" in advice  # the whole run: no window to size


def test_close_magnitudes_but_a_poor_ranking():
    r = report_of([0.1, 0.2, 0.3, 10.0], [0.3, 0.2, 0.1, 10.0], estimator="tracin", start_step=4, end_step=6)
    assert r.relative_error < 0.5 and r.spearman < 0.8
    advice = r.advice
    assert "The magnitudes are close (relative error 0.02826 ≤ 0.5, carried by the largest scores)" in advice
    assert f"the ranking is not usable (Spearman {r.spearman:.4g}, wanted ≥ 0.8): only the few largest" in advice
    assert 'estimator="acc" (TracIn is the no-propagation baseline)' in advice
    assert "window_every_n_steps=1: this one spans 2 steps" in advice


def test_thresholds_and_edge_cases():
    r = report_of([1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 5.0], estimator="acc")  # Spearman 0.8, error 0.32
    assert audit_advice(r, min_spearman=0.75).startswith("Good agreement")
    assert audit_advice(r, 0.75, max_relative_error=0.3).startswith("Poor agreement")
    assert "Relative error 0.3162 over the whole run (wanted ≤ 0.3)" in audit_advice(r, 0.75, 0.3)
    assert "the ranking is still usable (Spearman 0.8 ≥ 0.75)" in audit_advice(r, 0.75, 0.3)
    assert report_of([], [], ids=IDS[:0]).advice.startswith("No audited sample over the whole run: nothing to judge.")
    undefined = report_of([1.0, 1.0], [1.0, 1.1], ids=IDS[:2])  # constant exact scores: no Spearman
    assert math.isnan(undefined.spearman)
    assert "the ranking cannot be judged (Spearman undefined" in undefined.advice
    nonfinite = report_of([1.0, 2.0], [float("nan"), 1.0], ids=IDS[:2])
    assert "the scores are not finite" in nonfinite.advice and 'precision="64-true"' in nonfinite.advice


def test_the_warning_and_the_table_carry_the_advice():
    r = report_of([1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0, 8.5], estimator="acc", start_step=0, end_step=12)
    message = poor_agreement_message(r)
    assert "the ranking is still usable (Spearman 1 ≥ 0.8)" in message and "window_every_n_steps=3" in message
    assert message.endswith("This is a measurement on this run, not a bound.")
    assert r.advice in audit_table(r)


@pytest.mark.parametrize(("estimator", "lr", "momentum"), [("acc", 0.1, 0.0), ("tracin", 0.5, 0.9)])
def test_advice_of_a_real_audit(make_trainer, make_model, train_loader, estimator, lr, momentum):
    val = next(iter(train_loader))
    tracker = InfluenceTracker(estimator=estimator, queries={"val": val}, audit=6, write_artifacts=False)
    sgd = lambda net: torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum)  # noqa: E731
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tracker, epochs=2).fit(make_model(make_optimizer=sgd), train_dataloaders=train_loader)
    report = tracker.audit("val")
    poor = [str(w.message) for w in caught if "agrees poorly" in str(w.message)]
    if estimator == "acc":  # a float64 run: "acc" follows the exact counterfactual
        assert not report.is_poor() and not poor
        assert report.advice.startswith("Good agreement over the whole run (6 audited samples)")
    else:  # TracIn models neither the momentum nor the propagation
        assert report.is_poor() and len(poor) == 1
        assert report.advice.startswith("Poor agreement over the whole run (6 audited samples).")
        assert "TracIn (no propagation, no optimizer model) is far from the retrained run" in report.advice
        assert 'What usually helps here: estimator="acc" (TracIn is the no-propagation baseline)' in report.advice
        _, meaning = report.advice.split(". ", 1)
        assert meaning.split(" What usually helps")[0] in poor[0]
        assert f"Spearman {report.spearman:.4g}" in report.advice
