"""``InfluenceTracker`` under ``Trainer(strategy="ddp", accelerator="cpu", devices=2)`` (gloo).

The 2-process run happens once per module in a subprocess (``tests/callbacks/ddp_worker.py``; Lightning's
launcher re-executes that script for rank 1). Here we check that

- the tracker states are identical on both ranks;
- they equal a single-process run over the same global batches (the union of the two ranks'
  per-step batches: with equal per-rank batch sizes the mean of the ranks' means is the union mean);
- windows, loggers and artifacts are handled by rank zero only (one record per window);
- with Lightning's default ``DistributedSampler`` on an odd-sized training set, the sample the
  sampler repeats to equalise the ranks is counted twice in the step it appears in twice (as in
  the real gradient), and leaving it out removes both copies: the scores equal a single-process
  run that sees the two ranks' batches as two accumulated micro-batches, and the exact derivative
  of the retrained query loss with respect to the sample's weight.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lightning_influence import InfluenceTracker
from lightning_influence.sample_ids import SampleIdError
from lightning_influence.testing import TinyClassifier, cross_entropy_losses, fixed_loader, lightning_trainer, retrain

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("ddp_worker.py")
WORKER_TIMEOUT_S = 300  # a healthy run takes ~20 s on 2 CPU cores
# Launcher / cluster detection variables of an enclosing job (torchrun, SLURM, LSF, an outer
# Lightning DDP run) would make Lightning join that job instead of launching its own 2 processes.
_CLUSTER_ENV_PREFIXES = ("SLURM_", "TORCHELASTIC_", "LSB_", "JSM_", "PMI_", "OMPI_")
_CLUSTER_ENV = (
    "LOCAL_RANK",
    "RANK",
    "GROUP_RANK",
    "NODE_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "PL_GLOBAL_SEED",
    "PL_TRAINER_GPUS",
    "KUBERNETES_PORT",
)


def _load_worker():
    spec = importlib.util.spec_from_file_location("ddp_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


W = _load_worker()


@pytest.fixture(autouse=True)
def _one_thread():
    """The references are tiny: on a busy 2-core machine, intra-op threads make each op ~1000× slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _worker_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _CLUSTER_ENV and not k.startswith(_CLUSTER_ENV_PREFIXES)}
    root = str(WORKER.parents[2])  # the repository
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONWARNINGS"] = "ignore"
    return env


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """Run the worker once (both modes); returns ``(outdir, output, seconds)``."""
    out = tmp_path_factory.mktemp("ddp")
    started = time.perf_counter()
    # a new session: on a hang, kill rank 0 *and* the rank-1 process it launched
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), str(out), "--timeout-s", "60"],
        cwd=str(out),
        env=_worker_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"The DDP worker did not finish in {WORKER_TIMEOUT_S} s. Output:\n{output[-6000:]}")
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        pytest.fail(f"The DDP worker failed (exit code {proc.returncode}). Output:\n{output[-6000:]}")
    return out, output, elapsed


def _load(ddp_run, mode: str) -> tuple[dict, dict]:
    out, output, _ = ddp_run
    paths = [out / mode / f"rank{r}.pt" for r in (0, 1)]
    missing = [str(p) for p in paths if not p.exists()]
    assert not missing, f"the worker wrote no {missing}. Output:\n{output[-4000:]}"
    r0, r1 = (torch.load(p, weights_only=False) for p in paths)
    assert (r0["rank"], r1["rank"], r0["world_size"]) == (0, 1, 2)
    return r0, r1


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str) -> None:
    """max |a − e| ≤ rel · max |e| (plus a float64 floor for all-zero blocks)."""
    assert actual.shape == expected.shape, what
    err = float((actual - expected).abs().max()) if actual.numel() else 0.0
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    assert err <= rel * scale + 1e-300, f"{what}: max abs difference {err:.3e} (scale {scale:.3e}, rel {rel:g})"


def _assert_same_on_both_ranks(r0: dict, r1: dict) -> None:
    assert r0["states"].keys() == r1["states"].keys()
    for block in r0["states"]:
        # the ranks apply the same all-reduced updates in the same order: bitwise equal is expected
        _assert_close(r1["states"][block], r0["states"][block], 1e-12, f"state {block!r}, rank 1 vs rank 0")
    _assert_close(r1["scores"], r0["scores"], 1e-12, "influence('val') rank 1 vs rank 0")
    assert torch.equal(r0["tracked_ids"], r1["tracked_ids"])
    assert [(a, b) for a, b, _ in r0["windows"]] == [(a, b) for a, b, _ in r1["windows"]]
    for (_, _, s0), (_, _, s1) in zip(r0["windows"], r1["windows"]):
        _assert_close(s1, s0, 1e-12, "window scores rank 1 vs rank 0")


# ---------------------------------------------------------------------------- shards mode
def test_worker_runtime_and_output(ddp_run):
    out, output, elapsed = ddp_run
    assert "distributed_backend=gloo" in output
    assert "All distributed processes registered. Starting with 2 processes" in output, output[-4000:]
    assert "Traceback" not in output, output[-6000:]
    print(f"DDP worker wall time: {elapsed:.1f} s")


def test_ddp_ranks_consume_their_shards(ddp_run):
    r0, r1 = _load(ddp_run, "shards")
    expected = [batch for epoch in W.global_schedule() for batch in epoch]
    assert len(r0["ids"]) == len(r1["ids"]) == len(expected) == r0["global_step"]
    b = W.SHARDS["per_rank_batch"]
    assert [a + c for a, c in zip(r0["ids"], r1["ids"])] == expected
    assert all(len(a) == len(c) == b for a, c in zip(r0["ids"], r1["ids"]))


def test_ddp_states_identical_on_both_ranks(ddp_run):
    r0, r1 = _load(ddp_run, "shards")
    assert set(r0["states"]) == {"theta", "m", "v"}  # AdamW
    _assert_same_on_both_ranks(r0, r1)
    _assert_close(r1["tracin_scores"], r0["tracin_scores"], 1e-12, "TracIn rank 1 vs rank 0")
    assert r0["unseen"].numel() == 0 and r1["unseen"].numel() == 0  # the seen-mask is all-reduced


def test_ddp_ranks_take_rank_zero_s_hvp_plan_when_theirs_differs(ddp_run):
    """Regression (issue 24): each rank timed the HVP methods itself and could chunk differently, so the per-chunk
    all-reduces no longer matched (gloo's "Connection reset by peer" in 2 of 5 loaded runs). Rank 1 here measures
    another plan on purpose; the fit completes (the ddp_run fixture) and both ranks ran rank zero's."""
    r0, r1 = _load(ddp_run, "shards")
    assert r1["measured_choice"] is not None and r1["measured_choice"] != r0["hvp_choice"]
    assert r1["hvp_choice"] == r0["hvp_choice"]


def test_ddp_equals_single_process_over_union_batches(ddp_run):
    r0, r1 = _load(ddp_run, "shards")
    steps_per_epoch = len(W.global_schedule()[0])
    union = [a + c for a, c in zip(r0["ids"], r1["ids"])]
    schedule = [union[i : i + steps_per_epoch] for i in range(0, len(union), steps_per_epoch)]
    x, y = W.make_data(W.SHARDS["num_samples"])
    tracker = InfluenceTracker(
        queries={"val": W.make_query()}, window_every_n_steps=W.SHARDS["window_every_n_steps"], write_artifacts=False
    )
    tracin = InfluenceTracker(estimator="tracin", queries={"val_tracin": W.make_query()}, write_artifacts=False)
    trainer = lightning_trainer(len(schedule), callbacks=[tracker, tracin])
    trainer.fit(TinyClassifier(W.make_net(), W.adamw), fixed_loader(x, y, schedule))
    assert trainer.global_step == r0["global_step"]

    worst = {}
    for block, ref in tracker.engine.states.items():
        _assert_close(r0["states"][block], ref, 1e-9, f"DDP vs single-process state {block!r}")
        worst[block] = float((r0["states"][block] - ref).abs().max() / ref.abs().max())
    _assert_close(r0["scores"], tracker.influence("val").scores, 1e-9, "DDP vs single-process influence('val')")
    ref_windows = tracker.windows("val")
    assert (
        [(a, b) for a, b, _ in r0["windows"]]
        == [(w.start_step, w.end_step) for w in ref_windows]
        == [(0, 3), (3, 6), (6, 8)]
    )
    for (_, _, s), w in zip(r0["windows"], ref_windows):
        _assert_close(s, w.scores, 1e-9, f"DDP vs single-process window ending at {w.end_step}")
    _assert_close(r0["tracin_scores"], tracin.influence("val_tracin").scores, 1e-9, "DDP vs single-process TracIn")
    print(f"max relative state difference DDP vs single process: {worst}")


def test_ddp_artifacts_and_logs_written_once_by_rank_zero(ddp_run):
    r0, r1 = _load(ddp_run, "shards")
    out = ddp_run[0] / "shards"
    log_dir = Path(r0["log_dir"])
    assert r1["log_dir"] == r0["log_dir"] == str(out / "tb" / "version_0")  # log_dir is broadcast from rank 0
    assert sorted(p.name for p in (out / "tb").iterdir()) == ["version_0"]  # rank 1 made no version_1
    # two trackers with queries, one of them with write_artifacts=False: one artifact folder (influence_0)
    (art,) = [p for p in log_dir.iterdir() if p.is_dir() and p.name.startswith("influence")]
    lines = (art / "windows.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [(r["query"], r["index"], r["start_step"], r["end_step"]) for r in records] == [
        ("val", 0, 0, 3),
        ("val", 1, 3, 6),
        ("val", 2, 6, 8),
    ], "one record per window, written by rank zero only"
    for record, (_, _, scores) in zip(records, r0["windows"]):
        assert record["sample_ids"] == r0["tracked_ids"].tolist()
        assert torch.equal(torch.tensor(record["scores"], dtype=torch.float64), scores.to(torch.float64))
    final = json.loads((art / "final_scores.json").read_text())
    assert torch.equal(torch.tensor(final["queries"]["val"]["scores"], dtype=torch.float64), r0["scores"].double())
    # TensorBoard: a single event file (rank zero's), carrying the window scalars, histogram and table
    events = glob.glob(str(log_dir / "events.out.tfevents.*"))
    assert len(events) == 1, events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(events[0], size_guidance={"scalars": 0, "tensors": 0, "histograms": 0}).Reload()
    tags = acc.Tags()

    def tag(kind: str, suffix: str) -> str:
        # the namespace is "influence", or "influence_<i>" when several trackers log to one Trainer
        (found,) = [t for t in tags[kind] if t.startswith("influence") and t.endswith(suffix)]
        return found

    # at the windows' last optimizer steps (end steps 3, 6, 8), where Lightning logs those steps' training loss
    assert [e.step for e in acc.Scalars(tag("scalars", "/val/strongest"))] == [2, 5, 7]
    assert [e.step for e in acc.Scalars(tag("scalars", "/val_tracin/strongest"))] == [7]  # the TracIn tracker's window
    assert tag("histograms", "/val/window_scores")
    assert tag("tensors", "/val/top_samples/text_summary")
    # CSV: one row per window (rank 1's CSVLogger writes nothing)
    csv_files = glob.glob(str(out / "csv" / "version_*" / "metrics.csv"))
    assert len(csv_files) == 1, csv_files
    import csv

    with open(csv_files[0]) as fh:
        rows = list(csv.DictReader(fh))
    (column,) = [c for c in rows[0] if c.startswith("influence") and c.endswith("/val/strongest")]
    rows = [r for r in rows if r[column]]
    strongest = [float(s[s.abs().argmax()]) for _, _, s in r0["windows"]]
    assert [int(r["step"]) for r in rows] == [2, 5, 7]  # the windows' last steps
    assert [float(r[column]) for r in rows] == pytest.approx(strongest, rel=1e-6)


def test_ddp_gradient_accumulation_and_clipping_equal_single_process(ddp_run):
    """accumulate_grad_batches=2 under DDP: every local micro-batch weighs 1/(2·2); the norm clipping
    acts on the all-reduced gradient. Reference: one process accumulating the union micro-batches."""
    from lightning.pytorch.callbacks import Callback

    r0, r1 = _load(ddp_run, "accumulate")
    _assert_same_on_both_ranks(r0, r1)
    cfg = W.ACCUMULATE
    micro = [batch for epoch in W.global_schedule(cfg) for batch in epoch]
    assert [a + c for a, c in zip(r0["ids"], r1["ids"])] == micro
    assert r0["global_step"] == len(micro) // 2
    per_epoch = len(W.global_schedule(cfg)[0])
    schedule = [micro[i : i + per_epoch] for i in range(0, len(micro), per_epoch)]

    class GradNorms(Callback):
        def __init__(self) -> None:
            self.norms: list[float] = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.norms.append(float(torch.cat([p.grad.flatten() for p in pl_module.parameters()]).norm()))

    norms = GradNorms()
    x, y = W.make_data(cfg["num_samples"])
    tracker = InfluenceTracker(queries={"val": W.make_query()}, write_artifacts=False)
    trainer = lightning_trainer(
        len(schedule), callbacks=[tracker, norms], accumulate_grad_batches=2, gradient_clip_val=cfg["clip"]
    )
    trainer.fit(TinyClassifier(W.make_net(), W.sgd_momentum_accumulate), fixed_loader(x, y, schedule))
    assert trainer.global_step == r0["global_step"]
    assert sum(n > cfg["clip"] for n in norms.norms) >= 2, norms.norms  # the clipping really acted
    for block, ref in tracker.engine.states.items():
        _assert_close(r0["states"][block], ref, 1e-9, f"DDP vs single-process state {block!r} (accumulate + clip)")
    _assert_close(
        r0["scores"], tracker.influence("val").scores, 1e-9, "DDP vs single-process scores (accumulate + clip)"
    )


def test_ddp_recorded_trajectory_replays_to_the_single_process_first_order(ddp_run):
    """The trajectory rank zero recorded holds both ranks' micro-batches; replayed offline in this process it
    gives every sample's first-order scores, equal to a single-process forward run over the union micro-batches."""
    from torch.utils.data import TensorDataset

    from lightning_influence import IndexedDataset, load_trajectory

    out, _, _ = ddp_run
    trajectory = load_trajectory(out / "accumulate" / "recorded")
    cfg = W.ACCUMULATE
    micro = [batch for epoch in W.global_schedule(cfg) for batch in epoch]
    assert trajectory.meta["world_size"] == 2 and len(trajectory.steps) == len(micro) // 2
    b = cfg["per_rank_batch"]
    # per step: rank 0's two micro-batches, then rank 1's, each weighted 1/(2·2)
    assert [ids for ids, _ in trajectory.steps[0].micro_batches] == [
        micro[0][:b],
        micro[1][:b],
        micro[0][b:],
        micro[1][b:],
    ]
    assert {w for s in trajectory.steps for _, w in s.micro_batches} == {0.25}

    per_epoch = len(W.global_schedule(cfg)[0])
    schedule = [micro[i : i + per_epoch] for i in range(0, len(micro), per_epoch)]
    x, y = W.make_data(cfg["num_samples"])
    reference = InfluenceTracker(estimator="first-order", write_artifacts=False)
    trainer = lightning_trainer(
        len(schedule), callbacks=[reference], accumulate_grad_batches=2, gradient_clip_val=cfg["clip"]
    )
    trainer.fit(TinyClassifier(W.make_net(), W.sgd_momentum_accumulate), fixed_loader(x, y, schedule))
    replayed = trajectory.influence(
        TinyClassifier(W.make_net(seed=5), None), IndexedDataset(TensorDataset(x, y)), W.make_query(), progress=False
    )
    assert torch.equal(replayed.sample_ids, torch.arange(cfg["num_samples"]))
    _assert_close(replayed.scores, reference.influence(W.make_query()).scores, 1e-8, "DDP-recorded replay vs forward")
    # replayed after the fit by both processes, each its rank's micro-batches, the products all-reduced
    r0, r1 = _load(ddp_run, "accumulate")
    assert r0["replay_processes"] == r1["replay_processes"] == 2
    assert torch.equal(r0["replayed"], r1["replayed"])
    _assert_close(r0["replayed"], replayed.scores, 1e-6, "replay shared by the DDP processes vs one process")


def test_ddp_default_path_replays_every_sample_at_the_end_of_fit_shared_by_the_ranks(ddp_run):
    """80 samples (> 64): the default path records the DDP run and replays it once at the end of fit, shared by
    both processes; every rank answers for every sample, the offline one-process replay's numbers."""
    from torch.utils.data import TensorDataset

    from lightning_influence import IndexedDataset, load_trajectory

    out, _, _ = ddp_run
    r0, r1 = _load(ddp_run, "default")
    n = W.DEFAULT["num_samples"]
    assert r0["replays"] == r1["replays"] == 1 and 0 < r0["live"].numel() < n
    assert r0["processes"] == r1["processes"] == 2
    assert torch.equal(r0["ids"], torch.arange(n)) and torch.equal(r1["ids"], torch.arange(n))
    assert torch.equal(r0["scores"], r1["scores"])
    x, y = W.make_data(n)
    offline = load_trajectory(out / "default" / "run").influence(
        TinyClassifier(W.make_net(seed=5), None), IndexedDataset(TensorDataset(x, y)), W.make_query(), progress=False
    )
    _assert_close(r0["scores"], offline.scores, 1e-6, "end-of-fit replay shared by the DDP ranks vs one process")
    assert [w[:2] for w in r0["windows"]] == [(0, 5), (5, 10), (10, 15), (15, 20)]
    assert (out / "default" / "run" / "all_samples").is_dir()


def test_ddp_exact_estimator_equals_leave_one_out_retraining(ddp_run):
    """estimator="exact" under DDP (each rank's share of the gradient differences all-reduced), with gradient
    accumulation and norm clipping: the scores are the true leave-one-out differences of retraining."""
    from lightning_influence.testing import leave_one_out

    r0, r1 = _load(ddp_run, "accumulate")
    _assert_close(r1["exact_scores"], r0["exact_scores"], 1e-12, "exact scores rank 1 vs rank 0")
    cfg = W.ACCUMULATE
    micro = [batch for epoch in W.global_schedule(cfg) for batch in epoch]
    per_epoch = len(W.global_schedule(cfg)[0])
    schedule = [micro[i : i + per_epoch] for i in range(0, len(micro), per_epoch)]
    x, y = W.make_data(cfg["num_samples"])
    query = W.make_query()[:2]
    loo = leave_one_out(
        W.make_net(), W.sgd_momentum_accumulate, x, y, schedule, query, W.EXACT_IDS, accumulate=2, clip_norm=cfg["clip"]
    )
    _assert_close(r0["exact_scores"], loo, 1e-8, "DDP exact vs leave-one-out retraining")


# ---------------------------------------------------------------------------- padded DistributedSampler mode
def _padded(ddp_run):
    r0, r1 = _load(ddp_run, "padded")
    n = W.PADDED["num_samples"]
    assert len(r0["ids"]) == len(r1["ids"]) == W.PADDED["epochs"] == r0["global_step"]  # one step per epoch
    duplicated = []
    for a, c in zip(r0["ids"], r1["ids"]):
        assert len(a) == len(c) == (n + 1) // 2
        union = a + c
        assert set(union) == set(range(n)) and len(union) == n + 1
        (dup,) = {i for i in union if union.count(i) == 2}
        # DistributedSampler pads the permutation with its own first index: rank 0 holds it first,
        # rank 1 holds the copy last, both in this same optimizer step
        assert a[0] == c[-1] == dup
        duplicated.append(dup)
    return r0, r1, duplicated


def test_padded_sampler_states_identical_on_both_ranks(ddp_run):
    r0, r1, duplicated = _padded(ddp_run)
    assert set(r0["states"]) == {"theta", "buf"}  # SGD with momentum
    _assert_same_on_both_ranks(r0, r1)
    assert r0["unseen"].numel() == 0
    assert torch.isfinite(r0["scores"]).all()


def test_padded_sampler_counts_the_duplicate_twice(ddp_run):
    """A single process that accumulates the two ranks' batches as two micro-batches reproduces
    the DDP step exactly (w = 1/2 each, mean of means), duplicate included. The union as one batch
    is refused (an id repeated within a batch)."""
    r0, r1, _ = _padded(ddp_run)
    x, y = W.make_data(W.PADDED["num_samples"])
    schedule = [[a, c] for a, c in zip(r0["ids"], r1["ids"])]  # epoch e: rank 0's batch, rank 1's batch
    tracker = InfluenceTracker(estimator="first-order", queries={"val": W.make_query()}, write_artifacts=False)
    trainer = lightning_trainer(len(schedule), callbacks=[tracker], accumulate_grad_batches=2)
    trainer.fit(TinyClassifier(W.make_net(), W.sgd_momentum), fixed_loader(x, y, schedule))
    assert trainer.global_step == r0["global_step"]
    for block, ref in tracker.engine.states.items():
        _assert_close(r0["states"][block], ref, 1e-9, f"DDP vs accumulated single-process state {block!r}")
    _assert_close(r0["scores"], tracker.influence("val").scores, 1e-9, "DDP vs accumulated single-process scores")

    union = [[a + c] for a, c in zip(r0["ids"], r1["ids"])]
    single = InfluenceTracker(estimator="first-order", write_artifacts=False)
    with pytest.raises(SampleIdError, match="more than once in one batch"):
        lightning_trainer(1, callbacks=[single]).fit(
            TinyClassifier(W.make_net(), W.sgd_momentum), fixed_loader(x, y, union)
        )


def test_padded_sampler_scores_match_weight_derivative(ddp_run):
    """Ground truth independent of the tracker: retrain in plain PyTorch on the union batches
    (duplicate rows included, |B| = n + 1 kept) with sample j's weight 1 ± ε on *every* copy.
    For SGD with momentum the first-order estimator is the exact derivative:
    score_j = −∂f/∂w_j (removing j = w_j: 1 → 0)."""
    r0, r1, duplicated = _padded(ddp_run)
    n = W.PADDED["num_samples"]
    x, y = W.make_data(n)
    qx, qy, _ = W.make_query()
    schedule = [[a + c] for a, c in zip(r0["ids"], r1["ids"])]  # the real per-step gradient: mean over n + 1 rows
    net = W.make_net()

    def query_loss(weights):
        trained = retrain(net, W.sgd_momentum, x, y, schedule, weights)
        with torch.no_grad():
            return float(cross_entropy_losses(trained, qx, qy).mean())

    eps = 1e-4  # measured: max relative difference ≈ 2e-10 at this step size
    fd = []
    for j in r0["tracked_ids"].tolist():
        plus, minus = torch.ones(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64)
        plus[j], minus[j] = 1 + eps, 1 - eps
        fd.append(-(query_loss(plus) - query_loss(minus)) / (2 * eps))
    fd = torch.tensor(fd, dtype=torch.float64)
    _assert_close(r0["scores"], fd, 1e-7, "DDP first-order scores vs −∂f/∂w_j (central differences)")
    assert len(set(duplicated)) >= 2  # the check covered several different duplicated samples
