"""The answers of a record-only tracker (``track=()``, ``record_trajectory=True``), float64:

- ``influence``, ``windows`` and ``patterns`` answer for every sample from the recorded trajectory, without a flag;
  ``self_influence`` with the in-run self-influence of every sample (``definition == "in-run"``); asking for the
  forward-tracked samples (``all_samples=False``) or an audit raises a ValueError naming what to ask for instead;
- ``all_samples=True`` answers of a registered query are replayed once per fit, then read back (``tracker.replays``),
  equal to a fresh replay's; other queries replay every time; a new fit replays again;
- ``tracker.dirpath`` is the resolved artifact folder (None before fit and without files);
- a tracker with forward-tracked samples answers as before.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_influence import InfluenceTracker
from lightning_influence.testing import (
    TinyClassifier,
    fixed_loader,
    lightning_trainer,
    random_classification,
    random_schedule,
)

N, D, C = 16, 3, 2


def _fit(tracker: InfluenceTracker, epochs: int = 2) -> None:
    x, y, _ = random_classification(N, D, C, seed=1)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(D, 4), nn.Tanh(), nn.Linear(4, C)).double()
    module = TinyClassifier(net, lambda m: torch.optim.AdamW(m.parameters(), lr=0.05))
    schedule = random_schedule(N, 4, epochs, seed=2)
    lightning_trainer(epochs, callbacks=[tracker]).fit(module, fixed_loader(x, y, schedule))


def _query():
    return random_classification(N, D, C, seed=1)[2]


def _tracker(tmp_path, **kwargs) -> InfluenceTracker:
    defaults = dict(
        track=(), record_trajectory=True, estimator="first-order", queries={"val": _query()}, window_every_n_steps=3
    )
    return InfluenceTracker(**{**defaults, "dirpath": tmp_path, **kwargs})


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> InfluenceTracker:
    tracker = _tracker(tmp_path_factory.mktemp("record_only"))
    _fit(tracker)
    return tracker


def test_a_record_only_fit_answers_for_every_sample_and_names_what_it_cannot(recorded):
    every = recorded.influence("val")  # nothing forward-tracked: the replay, without a flag
    assert torch.equal(every.sample_ids, torch.arange(N)) and every.estimator == "first-order"
    torch.testing.assert_close(every.scores, recorded.influence("val", all_samples=True).scores)
    windows = recorded.windows("val")
    assert len(windows) > 1 and all(torch.equal(w.sample_ids, torch.arange(N)) for w in windows)
    assert torch.equal(recorded.patterns("val").sample_ids, torch.arange(N))
    per = recorded.influence(_query(), per_example=True)  # any query: replayed
    assert per.per_example is not None and per.per_example.shape == (N, 8)
    asks = r"nothing is forward-tracked \(track=\(\)\)"
    with pytest.raises(ValueError, match=asks + r".*ask influence\('val', all_samples=True\) for every sample's"):
        recorded.influence("val", all_samples=False)
    with pytest.raises(ValueError, match=asks + r".*ask windows\('val', all_samples=True\)"):
        recorded.windows("val", all_samples=False)
    in_run = recorded.self_influence()  # every sample, from the recording (tests/trajectory/test_self_influence.py)
    assert in_run.definition == "in-run" and torch.equal(in_run.sample_ids, torch.arange(N))
    with pytest.raises(ValueError, match=asks + r": audit\(\).*pass track=\[ids\] \(with audit=N\)"):
        recorded.audit("val")
    assert recorded.audit_windows("val") == []  # no audit ran: nothing to report, as before
    with pytest.raises(KeyError, match="No registered query named 'test'"):
        recorded.windows("test")  # a wrong name is still named first


def test_the_replayed_answer_of_a_registered_query_is_cached(tmp_path):
    tracker = _tracker(tmp_path)
    _fit(tracker)
    assert tracker.replays == 0
    first = tracker.influence("val", all_samples=True)
    assert tracker.replays == 1 and first.sample_ids.numel() == N and bool(first.scores.abs().sum() > 0)
    again = tracker.influence("val", all_samples=True)
    assert tracker.replays == 1  # read back, not replayed
    fresh = tracker.replay(progress=False).influence(_query())
    torch.testing.assert_close(again.scores, fresh.scores)  # the sum of the replayed windows
    assert torch.equal(again.sample_ids, fresh.sample_ids) and again.estimator == fresh.estimator == "first-order"
    again.scores.zero_()  # the caller's copy: the cache is untouched
    torch.testing.assert_close(tracker.influence("val", all_samples=True).scores, fresh.scores)

    per = tracker.influence("val", per_example=True, all_samples=True)  # another key: one more replay
    assert tracker.replays == 2 and per.per_example is not None and per.per_example.shape == (N, 8)
    cached = tracker.influence("val", per_example=True, all_samples=True)
    torch.testing.assert_close(cached.per_example, per.per_example)
    assert tracker.replays == 2

    windows = tracker.windows("val", all_samples=True)  # replayed with the final scores, in the same sweep
    assert tracker.replays == 3 - 1 and len(windows) > 1
    fresh_windows = tracker.replay(progress=False).windows("val", _query(), [w.end_step for w in windows])
    for got, want in zip(tracker.windows("val", all_samples=True), fresh_windows):
        assert (got.start_step, got.end_step) == (want.start_step, want.end_step)
        assert torch.equal(got.sample_ids, want.sample_ids) and torch.equal(got.scores, want.scores)
    assert tracker.replays == 2

    tracker.influence(_query(), all_samples=True)  # not a registered query: replayed every time
    tracker.influence(_query(), all_samples=True)
    assert tracker.replays == 4

    _fit(_tracker(tmp_path / "other"))  # another tracker's fit leaves this one's cache alone
    tracker.influence("val", all_samples=True)
    assert tracker.replays == 4


def test_a_new_fit_replays_again(tmp_path):
    tracker = _tracker(tmp_path)
    _fit(tracker, epochs=1)
    one = tracker.influence("val", all_samples=True)
    _fit(tracker, epochs=2)  # a fresh model and Trainer: a new fit, a new trajectory
    two = tracker.influence("val", all_samples=True)
    assert tracker.replays == 2 and not torch.equal(one.scores, two.scores)


def test_forward_tracked_samples_answer_as_before(tmp_path):
    tracker = _tracker(tmp_path, track=[0, 3, 5], audit=2)
    _fit(tracker)
    forward = tracker.influence("val")
    assert forward.sample_ids.tolist() == [0, 3, 5] and bool(forward.scores.abs().sum() > 0)
    assert len(tracker.windows("val")) > 1 and tracker.patterns("val") is not None
    assert tracker.self_influence().scores.numel() == 3 and tracker.audit("val").sample_ids.numel() == 2
    assert tracker.self_influence().definition == "counterfactual"
    replayed = tracker.influence("val", all_samples=True)  # the duality with the forward first-order scores
    torch.testing.assert_close(replayed.scores[[0, 3, 5]], forward.scores, rtol=1e-8, atol=1e-12)


def test_dirpath_is_the_resolved_artifact_folder(tmp_path):
    tracker = _tracker(tmp_path / "given")
    assert tracker.dirpath is None  # before fit
    _fit(tracker, epochs=1)
    assert tracker.dirpath == Path(tracker.artifact_dir) == tmp_path / "given"
    assert os.path.isdir(os.path.join(tracker.dirpath, "trajectory"))
    with pytest.raises(AttributeError):
        tracker.dirpath = "elsewhere"  # type: ignore[misc]

    default = InfluenceTracker(track=[0, 1], queries={"val": _query()})
    x, y, _ = random_classification(N, D, C, seed=1)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(D, 4), nn.Tanh(), nn.Linear(4, C)).double()
    trainer = lightning_trainer(1, callbacks=[default], default_root_dir=tmp_path / "root")
    trainer.fit(TinyClassifier(net, lambda m: torch.optim.SGD(m.parameters(), lr=0.1)),
                fixed_loader(x, y, random_schedule(N, 4, 1, seed=2)))  # fmt: skip
    assert default.dirpath is not None and default.dirpath.is_relative_to(tmp_path / "root")
    assert default.dirpath.name == "influence" and (default.dirpath / "windows.jsonl").is_file()

    silent = _tracker(tmp_path, track=[0, 1], record_trajectory=False, write_artifacts=False)
    _fit(silent, epochs=1)
    assert silent.dirpath is None  # writes no file
