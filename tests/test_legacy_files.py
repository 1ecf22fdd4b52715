"""Files written by release 0.1.0 (the flat package, before the subpackages) still load, and say what the current
code says about the same run: the artifacts, the audit, the trajectory and a Lightning checkpoint to resume from.

``tests/fixtures/make_release_0_1_0.py`` wrote them with that release's code; ``fixtures/legacy_setup.py`` is the run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from lightning_influence import InfluenceTracker, load_audit, load_final_scores, load_snapshots, load_trajectory
from lightning_influence.testing import lightning_trainer

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
import legacy_setup as legacy  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "release_0_1_0"


@pytest.fixture(scope="module")
def current(tmp_path_factory):
    """The same run under the current code: (tracker, its artifact folder)."""
    x, y, query = legacy.data()
    out = tmp_path_factory.mktemp("current")
    tracker = InfluenceTracker(**legacy.tracker_kwargs(query, out))
    lightning_trainer(legacy.EPOCHS, callbacks=[tracker]).fit(legacy.module(), legacy.loader(x, y))
    return tracker, out


def test_release_0_1_0_artifacts_load_and_match_the_current_run(current):
    _, out = current
    old, new = load_snapshots(FIXTURE / "artifacts"), load_snapshots(out)
    assert [(s.query, s.start_step, s.end_step) for s in old] == [(s.query, s.start_step, s.end_step) for s in new]
    for a, b in zip(old, new):
        assert torch.equal(a.sample_ids, b.sample_ids)
        torch.testing.assert_close(a.scores, b.scores, rtol=1e-9, atol=1e-12)
    old_final, new_final = load_final_scores(FIXTURE / "artifacts"), load_final_scores(out)
    torch.testing.assert_close(old_final["val"].scores, new_final["val"].scores, rtol=1e-9, atol=1e-12)


def test_release_0_1_0_audit_loads_and_matches_the_current_run(current):
    old, new = load_audit(FIXTURE / "artifacts"), load_audit(current[1])
    assert len(old) == len(new) > 0
    for a, b in zip(old, new):
        assert (a.query, a.start_step, a.end_step) == (b.query, b.start_step, b.end_step)
        torch.testing.assert_close(a.exact_scores, b.exact_scores, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(a.estimated_scores, b.estimated_scores, rtol=1e-9, atol=1e-12)


def test_release_0_1_0_trajectory_replays_to_the_current_runs_scores(current):
    x, y, query = legacy.data()
    dataset = legacy.loader(x, y).dataset
    old = load_trajectory(FIXTURE / "artifacts" / "trajectory").influence(legacy.module(), dataset, query)
    new = load_trajectory(current[1] / "trajectory").influence(legacy.module(), dataset, query)
    assert torch.equal(old.sample_ids, new.sample_ids)
    torch.testing.assert_close(old.scores, new.scores, rtol=1e-9, atol=1e-12)


def test_release_0_1_0_checkpoint_resumes_to_the_uninterrupted_runs_scores(current, tmp_path):
    x, y, query = legacy.data()
    resumed = InfluenceTracker(**legacy.tracker_kwargs(query, tmp_path))
    trainer = lightning_trainer(legacy.EPOCHS, callbacks=[resumed])
    trainer.fit(legacy.module(), legacy.loader(x, y), ckpt_path=FIXTURE / "epoch1.ckpt")
    full = current[0].influence("val")
    after = resumed.influence("val")
    assert torch.equal(after.sample_ids, full.sample_ids)
    torch.testing.assert_close(after.scores, full.scores, rtol=1e-9, atol=1e-12)
