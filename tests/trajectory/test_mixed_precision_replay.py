"""A trajectory recorded under mixed precision (``bf16-mixed``, and ``16-mixed`` with a GradScaler) replays: the
recorded autocast (``meta["autocast"]``) is put around the replay's loss, so each recomputed gradient reproduces the
real step's, under ``MIXED_TOLERANCES`` ([concepts.md: Every sample at once]). CPU, float32 parameters, a small MLP.

- the bf16-mixed run replays without mismatch; its replayed scores follow the same run's forward ``"first-order"``
  scores (the forward engine differentiates in float32 outside autocast: they differ by the precision gap);
- the same run in ``32-true``, for reference: how far bf16's replay is from float32's;
- a replay fed a wrong sample still raises :class:`ReplayMismatchError` under bf16; so does a replay without the
  autocast; a CPU-autocast run cannot be replayed as a GPU-autocast one (and the reverse) without a clear error.

``pytest -s`` prints the measured numbers (docs/limitations.md, "Mixed precision").
"""

from __future__ import annotations

import json

import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn
from torchmetrics.functional import spearman_corrcoef

from lightning_influence import InfluenceTracker
from lightning_influence.errors import ReplayInputError
from lightning_influence.testing import (
    TinyClassifier,
    fixed_loader,
    lightning_trainer,
    random_classification,
    random_schedule,
)
from lightning_influence.trajectory import steps
from lightning_influence.trajectory.format import META_FILE
from lightning_influence.trajectory.replay import ReplayMismatchError, TrajectoryReplay

N, D, H, C = 24, 6, 32, 3


def _data():
    return random_classification(N, D, C, seed=4, dtype=torch.float32)


def _run(tmp_path, precision: str | None, plugins=()) -> InfluenceTracker:
    x, y, query = _data()
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, C))
    module = TinyClassifier(net, lambda m: torch.optim.AdamW(m.parameters(), lr=0.03, weight_decay=0.1))
    tracker = InfluenceTracker(
        estimator="first-order",
        queries={"val": query},
        record_trajectory=True,
        checkpoint_every_n_steps=4,
        dirpath=tmp_path,
    )
    trainer = lightning_trainer(3, precision=precision, callbacks=[tracker], plugins=list(plugins))
    trainer.fit(module, fixed_loader(x, y, random_schedule(N, 6, 3, seed=3)))  # 4 steps per epoch, 12 in all
    assert next(module.parameters()).dtype == torch.float32
    return tracker


def _meta(tracker: InfluenceTracker) -> dict:
    return tracker.replay(progress=False).trajectory.meta


def _measured(monkeypatch) -> dict[str, list[float]]:
    """Every fingerprint check's relative difference, by what it compares (the check itself still runs)."""
    seen: dict[str, list[float]] = {"parameters": [], "gradient": []}
    check = steps.FingerprintCheck.check

    def measuring(self, recorded, vector, what, where):
        if recorded:
            seen[what].append(steps._relative_difference(recorded, self.of(vector)))
        return check(self, recorded, vector, what, where)

    monkeypatch.setattr(steps.FingerprintCheck, "check", measuring)
    return seen


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_bf16_mixed_replays_its_steps_and_follows_the_forward_scores(tmp_path, monkeypatch):
    seen = _measured(monkeypatch)
    mixed = _run(tmp_path / "bf16", "bf16-mixed")
    assert _meta(mixed)["autocast"] == {"device_type": "cpu", "dtype": "bfloat16"}
    replayed, forward = mixed.influence("val", all_samples=True).scores, mixed.influence("val").scores
    theta_rtol, grad_rtol = steps.MIXED_TOLERANCES[torch.bfloat16]
    worst = {what: max(values) for what, values in seen.items()}
    assert len(seen["gradient"]) == 12
    spearman, rel = float(spearman_corrcoef(replayed, forward)), _relative(replayed, forward)
    print(
        f"\nbf16-mixed replay: fingerprints off by ≤ {worst['gradient']:.1e} (gradient, tolerance {grad_rtol:g}),"
        f" ≤ {worst['parameters']:.1e} (parameters, tolerance {theta_rtol:g})"
        f"\nbf16-mixed replay vs forward first-order: spearman {spearman:.4f}, relative error {rel:.2e}"
    )
    assert worst["gradient"] <= grad_rtol / 10 and worst["parameters"] <= theta_rtol / 10  # measured 0 and 0
    assert spearman >= 0.99  # measured 0.9991
    assert rel <= 2e-2  # measured 3.4e-3: the forward engine differentiates in float32, the step in bfloat16

    reference = _run(tmp_path / "fp32", "32-true")
    assert "autocast" not in _meta(reference)  # float32 trajectories are written as before
    ref_replayed, ref_forward = reference.influence("val", all_samples=True).scores, reference.influence("val").scores
    torch.testing.assert_close(ref_replayed, ref_forward, rtol=1e-5, atol=1e-7)  # duality, float32
    spearman32, rel32 = float(spearman_corrcoef(replayed, ref_replayed)), _relative(replayed, ref_replayed)
    print(
        f"32-true replay vs forward: relative error {_relative(ref_replayed, ref_forward):.2e}"
        f"\nbf16-mixed replay vs 32-true replay: spearman {spearman32:.4f}, relative error {rel32:.2e}"
    )
    assert spearman32 >= 0.95  # measured 0.9817: two runs whose trajectories drift apart by bf16's rounding
    assert rel32 <= 0.3  # measured 0.117


def test_16_mixed_with_a_grad_scaler_replays(tmp_path, monkeypatch):
    """16-mixed on the CPU needs its plugin passed (Lightning maps precision='16-mixed' to bf16-mixed there); the
    scaled backward differs from the replay's unscaled one by float16 rounding only."""
    seen = _measured(monkeypatch)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    tracker = _run(tmp_path, None, plugins=[plugin])
    assert _meta(tracker)["autocast"] == {"device_type": "cpu", "dtype": "float16"}
    replayed, forward = tracker.influence("val", all_samples=True).scores, tracker.influence("val").scores
    worst = max(seen["gradient"])
    print(
        f"\n16-mixed replay: gradient fingerprints off by ≤ {worst:.1e}; vs forward {_relative(replayed, forward):.2e}"
    )
    assert worst <= steps.MIXED_TOLERANCES[torch.float16][1] / 10  # measured 8.8e-8
    assert _relative(replayed, forward) <= 2e-2  # measured 5.3e-4


def test_a_wrong_sample_still_raises_under_bf16(tmp_path):
    tracker = _run(tmp_path, "bf16-mixed")
    replay = tracker.replay(progress=False)
    dataset = replay.train_dataset

    class OneSampleSwapped(torch.utils.data.Dataset):  # sample 7 is read as sample 8 (its id kept)
        def __len__(self) -> int:
            return len(dataset)

        def __getitem__(self, i: int):
            return (*dataset[8][:2], dataset[7][2]) if i == 7 else dataset[i]

    wrong = TrajectoryReplay(
        replay.trajectory, replay.module, OneSampleSwapped(), collate_fn=replay.collate_fn, progress=False
    )
    with pytest.raises(ReplayMismatchError, match=r"gradient differ.*tolerance 0\.002 for float32 under bfloat16"):
        wrong.influence(_data()[2])


def test_a_replay_without_the_autocast_raises(tmp_path):
    """The tolerance is tight enough that the autocast matters: the same replay in float32 misses."""
    tracker = _run(tmp_path, "bf16-mixed")
    replay = tracker.replay(progress=False)
    replay.step_loss.autocast = None
    with pytest.raises(ReplayMismatchError) as err:
        replay.influence(_data()[2])
    print(f"\nreplay without the autocast: {str(err.value).split(' (tolerance')[0][-60:]}")


def test_an_autocast_of_another_device_type_is_refused(tmp_path):
    tracker = _run(tmp_path, "bf16-mixed")
    path = tracker.replay(progress=False).trajectory.path
    header = json.loads((path / META_FILE).read_text())
    header["meta"]["autocast"]["device_type"] = "cuda"  # as a GPU run records it
    (path / META_FILE).write_text(json.dumps(header))
    with pytest.raises(ReplayInputError, match=r"recorded under cuda autocast.*module\.to\('cuda'\)"):
        tracker.replay(progress=False)
