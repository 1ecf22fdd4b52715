"""The replay shared by several processes (``load_trajectory(path).influence(..., devices=N)``, Lightning Fabric on the
CPU) equals the replay in one process: every sample's scores, per query example, the windows and the in-run
self-influence; whether the processes split the adjoint's rows (as many rows as processes or more) or each step's
batch, its micro-batches shared whole (gradient accumulation) or split by rows (shares of unequal size, a process with
none); and the refusals of what a shared replay cannot split."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_influence import IndexedDataset, InfluenceTracker, ReplayInputError, load_trajectory
from lightning_influence.testing import TinyClassifier, fixed_loader, lightning_trainer

NUM_SAMPLES = 23


def _data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(NUM_SAMPLES, 5, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, 3, (NUM_SAMPLES,), generator=gen)


def _net(batch_norm: bool = False) -> nn.Module:
    torch.manual_seed(0)
    norm = [nn.BatchNorm1d(6)] if batch_norm else []
    return nn.Sequential(nn.Linear(5, 6), *norm, nn.Tanh(), nn.Linear(6, 3)).double()


def _schedule(batch: int, epochs: int = 2) -> list[list[list[int]]]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(epochs):
        order = torch.randperm(NUM_SAMPLES, generator=gen).tolist()
        out.append([order[i : i + batch] for i in range(0, NUM_SAMPLES, batch)])
    return out


SETUPS = {
    # batches of 7 (the last of 2): rows split 3 / 4 (and 1 / 1) between two processes
    "rows-adamw": dict(batch=7, optimizer=lambda p: torch.optim.AdamW(p, lr=0.02, weight_decay=0.1), devices=2),
    # two micro-batches a step: each process replays one whole
    "accumulation-momentum-clip": dict(
        batch=4,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        devices=2,
        trainer={"accumulate_grad_batches": 2, "gradient_clip_val": 0.5},
    ),
    # batches of 2 (the last of 1) on three processes: some hold no row of a step
    "three-processes-empty-shares": dict(batch=2, optimizer=lambda p: torch.optim.Adam(p, lr=0.01), devices=3),
}


def _record(tmp_path, setup: dict, batch_norm: bool = False):
    x, y = _data()
    tracker = InfluenceTracker(track=(), record_trajectory=True, checkpoint_every_n_steps=3, dirpath=str(tmp_path))
    trainer = lightning_trainer(2, callbacks=[tracker], **setup.get("trainer", {}))
    module = TinyClassifier(_net(batch_norm), lambda net: setup["optimizer"](net.parameters()))
    trainer.fit(module, fixed_loader(x, y, _schedule(setup["batch"])))
    return load_trajectory(tmp_path), module, IndexedDataset(TensorDataset(x, y)), (x[:4], y[:4])


def _assert_close(shared: torch.Tensor, single: torch.Tensor, what: str) -> None:
    scale = float(single.abs().max())
    assert scale > 0, what
    assert float((shared - single).abs().max()) <= 1e-10 * scale, what


@pytest.mark.parametrize("name", sorted(SETUPS))
def test_shared_replay_equals_the_single_process_replay(tmp_path, name):
    setup = SETUPS[name]
    trajectory, module, dataset, query = _record(tmp_path, setup)
    n = setup["devices"]

    def both(method: str, *args, **kwargs):
        kwargs["progress"] = False
        single = getattr(trajectory, method)(module, dataset, *args, **kwargs)
        return single, getattr(trajectory, method)(module, dataset, *args, devices=n, accelerator="cpu", **kwargs)

    # one adjoint row (the query's mean loss): each process replays its share of every step's batch
    single, shared = both("influence", query)
    assert torch.equal(shared.sample_ids, single.sample_ids)
    _assert_close(shared.scores, single.scores, f"{name}: scores on {n} processes, the batches split")
    # 4 rows (one per query example): each process sweeps its block of rows over the whole batches
    single, shared = both("influence", query, per_example=True)
    _assert_close(shared.per_example, single.per_example, f"{name}: per-example scores on {n} processes")
    single, shared = both("self_influence")
    _assert_close(shared.scores, single.scores, f"{name}: in-run self-influence on {n} processes")
    single, shared = both("windows", "q", query, [2, 5])
    assert [(w.start_step, w.end_step) for w in shared] == [(w.start_step, w.end_step) for w in single]
    for s, o in zip(shared, single):
        _assert_close(s.scores, o.scores, f"{name}: window ({o.start_step}, {o.end_step}] on {n} processes")


def test_a_model_whose_running_statistics_move_is_refused_before_any_process_starts(tmp_path):
    trajectory, module, dataset, query = _record(tmp_path, SETUPS["rows-adamw"], batch_norm=True)
    with pytest.raises(ReplayInputError, match=r"BatchNorm in train mode.*devices=1"):
        trajectory.influence(module, dataset, query, devices=2, progress=False)


def test_spawned_processes_refuse_what_does_not_pickle_before_starting(tmp_path, monkeypatch):
    """Where processes are spawned (GPUs; a platform without fork), a lambda loss is named before any starts."""
    import multiprocessing

    trajectory, module, dataset, query = _record(tmp_path, SETUPS["rows-adamw"])
    monkeypatch.setattr(multiprocessing, "get_all_start_methods", lambda: ["spawn"])
    with pytest.raises(ValueError, match="pickled: use module-level functions"):
        trajectory.influence(module, dataset, query, loss_fn=lambda m, b: m.per_sample_loss(b), devices=2)


def test_bad_devices_are_refused(tmp_path):
    trajectory, module, dataset, query = _record(tmp_path, SETUPS["rows-adamw"])
    for devices in (0, 1.5, True):
        with pytest.raises(ValueError, match="devices must be a positive integer"):
            trajectory.influence(module, dataset, query, devices=devices)


def test_an_answer_larger_than_a_pipe_buffer_comes_back(tmp_path):
    """400 examples × 23 samples in float64 (74 KiB): more than a pipe holds before its reader reads."""
    trajectory, module, dataset, _ = _record(tmp_path, SETUPS["rows-adamw"])
    gen = torch.Generator().manual_seed(2)
    query = (torch.randn(400, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (400,), generator=gen))
    single = trajectory.influence(module, dataset, query, per_example=True, progress=False)
    shared = trajectory.influence(module, dataset, query, per_example=True, devices=2, progress=False)
    _assert_close(shared.per_example, single.per_example, "400 examples on 2 processes")
