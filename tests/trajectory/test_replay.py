"""The replay of a recorded trajectory ([concepts.md: Every sample at once]) against the forward ``"first-order"``
engine, on runs recorded with a plain training loop (float64, no Lightning): every sample's scores at every boundary,
windows, per-example and callable queries, gaps, recorded batches, a changed dataset, one segment in memory, and a new
process."""

from __future__ import annotations

import dataclasses
import gc
import subprocess
import sys
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset, default_collate

from lightning_influence.autodiff.functional import FlatParameters, FunctionalLoss
from lightning_influence.estimators.engine import InfluenceEngine
from lightning_influence.optimizers import OptimizerStep, flat_optimizer_state, model_optimizer, read_step_groups
from lightning_influence.optimizers.clipping import NormClip, ValueClip
from lightning_influence.records import MicroBatch
from lightning_influence.testing import cross_entropy_losses
from lightning_influence.trajectory.reader import StepEntry, TrajectoryWriter, fingerprint, load_trajectory
from lightning_influence.trajectory.replay import ReplayMismatchError, TrajectoryReplay

NUM_SAMPLES, UNSEEN, STEPS, EVERY, EPOCH_LEN = 12, 11, 10, 3, 3  # sample 11 is in no batch; 3 steps an epoch
PRINT = {"seed": 5, "size": 4}


def loss_fn(module, batch):
    """Per-sample cross-entropy of ``(x, y, ...)``; extra elements (the ids of a recorded batch) are ignored."""
    return cross_entropy_losses(module, batch[0], batch[1])


def _sgd(**kw):
    return lambda groups: torch.optim.SGD(groups, **{"lr": 0.1, **kw})


def _adam(cls=torch.optim.Adam, **kw):
    return lambda groups: cls(groups, **{"lr": 0.01, **kw})


@dataclass
class Run:
    optimizer: Callable[[list[dict]], torch.optim.Optimizer]
    groups: tuple[dict, dict] | None = None  # per-layer param groups, or one group
    scheduler: Callable | None = None
    clip: tuple[str, float] | None = None
    micro_sizes: tuple[int, ...] = (4,)
    skip: tuple[int, ...] = ()  # steps a GradScaler would skip: no update, no entry
    record_batches: bool = False
    regularizer: Callable | None = None
    windows: dict = dataclasses.field(default_factory=lambda: {"every_n_steps": None, "every_n_epochs": None})


RUNS = {
    "sgd": Run(_sgd()),
    "momentum": Run(_sgd(momentum=0.9, dampening=0.1)),
    "nesterov": Run(_sgd(momentum=0.9, nesterov=True, weight_decay=0.01)),
    "adam": Run(_adam(weight_decay=0.1)),
    "adamw": Run(_adam(torch.optim.AdamW, weight_decay=0.1)),
    "two-groups": Run(
        _adam(torch.optim.AdamW), ({"lr": 0.02, "weight_decay": 0.1, "betas": (0.8, 0.99)}, {"weight_decay": 0.0})
    ),
    "two-groups-sgd": Run(_sgd(), ({"momentum": 0.9}, {"lr": 0.05, "weight_decay": 0.1})),
    "step-lr": Run(_sgd(momentum=0.5), scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 2, gamma=0.7)),
    "norm-clip": Run(_adam(), clip=("norm", 0.7)),
    "value-clip": Run(_sgd(momentum=0.9), clip=("value", 0.05)),
    "accumulation": Run(_adam(torch.optim.AdamW, weight_decay=0.1), micro_sizes=(3, 2)),
    "regularizer": Run(_sgd(momentum=0.9), regularizer=lambda m: 0.05 * m[0].weight.pow(2).sum()),
    "gap": Run(_adam(), skip=(3, 7)),
    "gap-momentum": Run(_sgd(momentum=0.9), skip=(0, 4)),
    "record-batches": Run(_adam(torch.optim.AdamW), record_batches=True),
}


def _mlp(seed: int, dtype=torch.float64) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(dtype)


@dataclass
class Recorded:
    """A recorded run and the forward engine's I_j(s) for s = 0..STEPS: ``totals[name]: Tensor[STEPS+1, N]``
    (``"examples"``: ``Tensor[STEPS+1, N, n]``)."""

    path: Path
    run: Run
    dataset: TensorDataset
    query: tuple[torch.Tensor, torch.Tensor]
    logit: Callable[[nn.Module], torch.Tensor]
    totals: dict[str, torch.Tensor]
    clipped: list[bool]  # per step, whether the clip changed the gradient


class _Training:
    """A plain training loop that writes a trajectory (the recorder's contract) and drives the forward engine."""

    def __init__(self, run: Run, path: Path, dtype: torch.dtype, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.run, self.gen, self.dtype, self.clipped = run, gen, dtype, []
        x = torch.randn(NUM_SAMPLES, 3, generator=gen, dtype=torch.float64).to(dtype)
        self.dataset = TensorDataset(x, torch.randint(0, 3, (NUM_SAMPLES,), generator=gen))
        self.query = (torch.randn(4, 3, generator=gen, dtype=torch.float64).to(dtype), torch.randint(0, 3, (4,)))
        self.net = net = _mlp(seed, dtype)
        layers = [list(net[0].named_parameters()), list(net[2].named_parameters())]
        named = [[(f"{i}.{n}", p) for n, p in layer] for i, layer in zip((0, 2), layers)]
        if run.groups is None:
            named = [named[0] + named[1]]
        groups = [{"params": [p for _, p in g], **kw} for g, kw in zip(named, run.groups or ({},))]
        self.opt = run.optimizer(groups)
        self.sched = run.scheduler(self.opt) if run.scheduler else None
        self.layout = FlatParameters.from_groups(named)
        self.tracked_groups = [[p for _, p in g] for g in named]
        self.tracked = [p for g in self.tracked_groups for p in g]
        self.loss = FunctionalLoss(net, loss_fn, self.layout, run.regularizer)
        self.engine = InfluenceEngine(
            self.loss, model_optimizer(self.opt).jacobian, NUM_SAMPLES, "first-order", NUM_SAMPLES, dtype, "cpu"
        )
        self.writer = TrajectoryWriter(path, self._meta(path))

    def _meta(self, path: Path) -> dict:
        kind = {torch.optim.SGD: "sgd", torch.optim.Adam: "adam", torch.optim.AdamW: "adamw"}[type(self.opt)]
        momentum = any(g.get("momentum", 0) for g in self.opt.param_groups)
        lay = self.layout
        return {
            "layout": {
                "names": list(lay.names),
                "shapes": [list(s) for s in lay.shapes],
                "group_slices": [[s.start, s.stop] for s in lay.group_slices],
            },
            "optimizer": {"kind": kind, "momentum": momentum},
            "dtype": str(self.dtype).replace("torch.", ""),
            "num_samples": NUM_SAMPLES,
            "checkpoint_every_n_steps": EVERY,
            "fingerprint": PRINT,
            "world_size": 1,
            "record_batches": self.run.record_batches,
            "windows": self.run.windows,
        }

    def logit(self, module: nn.Module) -> torch.Tensor:
        return module(self.query[0][:2])[:, 0].sum()

    def theta(self) -> torch.Tensor:
        return self.layout.flatten([p.detach() for p in self.tracked]).clone()

    def _flat_grad(self, value: torch.Tensor) -> torch.Tensor:
        return self.layout.flatten(torch.autograd.grad(value, self.tracked))

    def query_vectors(self) -> dict[str, torch.Tensor]:
        """Query gradients at the current parameters by plain autograd: ``{name: Tensor[n, p]}``."""
        xq, yq = self.query
        examples = torch.stack(
            [self._flat_grad(loss_fn(self.net, (xq[i : i + 1], yq[i : i + 1])).sum()) for i in range(4)]
        )
        return {
            "query": examples.mean(0, keepdim=True),
            "logit": self._flat_grad(self.logit(self.net))[None],
            "examples": examples,
        }

    def micro_batches(self, t: int) -> list[tuple[list, torch.Tensor, float]]:
        """The step's micro-batches ``(collated batch, ids, weight)``; a recorded batch carries the ids last."""
        out = []
        for size in self.run.micro_sizes:
            ids = torch.randperm(UNSEEN, generator=self.gen)[:size]
            batch = default_collate([self.dataset[int(i)] for i in ids])
            out.append(([*batch, ids] if self.run.record_batches else batch, ids, 1.0 / len(self.run.micro_sizes)))
        return out

    def backward(self, micro) -> torch.Tensor:
        self.opt.zero_grad()
        for batch, _, weight in micro:
            loss = loss_fn(self.net, batch).mean() + (self.run.regularizer(self.net) if self.run.regularizer else 0.0)
            (weight * loss).backward()
        return self.layout.flatten([p.grad for p in self.tracked]).clone()

    def clip(self, raw: torch.Tensor):
        if self.run.clip is None:
            return None, None
        kind, c = self.run.clip
        if kind == "norm":
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), c)
            clip, record = NormClip(raw, c), {"kind": "norm", "max_norm": c, "other_sq_norm": 0.0}
        else:
            torch.nn.utils.clip_grad_value_(self.net.parameters(), c)
            clip, record = ValueClip(raw, c), {"kind": "value", "clip_value": c}
        # norm: whether this step was clipped; value: whether some but not all coordinates were
        changed = clip.clipped != raw
        self.clipped.append(bool(changed.any()) if kind == "norm" else bool(changed.any() and not changed.all()))
        return clip, record

    def step(self, t: int) -> None:
        theta = self.theta()
        if t % EVERY == 0:
            self.writer.write_checkpoint(t, theta, flat_optimizer_state(self.opt, self.tracked), {})
        micro = self.micro_batches(t)
        raw = self.backward(micro)
        if t in self.run.skip:
            return
        clip, clip_record = self.clip(raw)
        groups = read_step_groups(self.opt, self.tracked_groups, self.layout.group_slices)
        records = [{k: v for k, v in dataclasses.asdict(g).items() if k != "region"} for g in groups]
        prints = {"theta": fingerprint(theta, **PRINT), "grad": fingerprint(raw, **PRINT)}
        entry = StepEntry(t, t // EPOCH_LEN, records, [(ids.tolist(), w) for _, ids, w in micro], clip_record, prints)
        grad = self.layout.flatten([p.grad for p in self.tracked]).clone()
        self.opt.step()
        post = flat_optimizer_state(self.opt, self.tracked, ("exp_avg", "exp_avg_sq"))
        opt_step = OptimizerStep(groups, theta, grad, post["exp_avg"], post["exp_avg_sq"])
        parts = [MicroBatch(b, ids.numel(), ids, torch.arange(ids.numel()), w) for b, ids, w in micro]
        self.engine.step(parts, opt_step, frozen=None, clip=clip)
        self.writer.write_step(entry, [b for b, _, _ in micro] if self.run.record_batches else None)
        if self.sched:
            self.sched.step()


def record(run: Run, path: Path, dtype: torch.dtype = torch.float64) -> Recorded:
    """Train STEPS steps, writing the trajectory; the forward engine's I_j(s) at every s = 0..STEPS."""
    training = _Training(run, path, dtype)
    totals: dict[str, list[torch.Tensor]] = {"query": [], "logit": [], "examples": []}
    for t in range(STEPS + 1):
        for name, vectors in training.query_vectors().items():
            scores = training.engine.project(vectors)  # [N, n]
            totals[name].append(scores if name == "examples" else scores[:, 0])
        if t < STEPS:
            training.step(t)
    training.writer.write_final(STEPS, training.theta(), {})
    training.writer.close()
    stacked = {name: torch.stack(v) for name, v in totals.items()}
    return Recorded(path, run, training.dataset, training.query, training.logit, stacked, training.clipped)


def replay(rec: Recorded, dataset=None, **kwargs) -> TrajectoryReplay:
    module = _mlp(seed=123, dtype=rec.query[0].dtype)  # another initialisation: only the architecture is used
    dataset = rec.dataset if dataset is None else dataset
    return TrajectoryReplay(
        rec.path, module, dataset, loss_fn=loss_fn, regularizer=rec.run.regularizer, progress=False, **kwargs
    )


def _assert_same(got: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-8) -> None:
    assert expected.abs().max() > 0
    torch.testing.assert_close(got, expected, rtol=rtol, atol=rtol * float(expected.abs().max()))


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> dict[str, Recorded]:
    return {}


def _recorded(cache: dict, name: str, tmp_path_factory) -> Recorded:
    if name not in cache:
        cache[name] = record(RUNS[name], tmp_path_factory.mktemp(name) / "trajectory")
    return cache[name]


@pytest.mark.parametrize("name", list(RUNS))
def test_replay_scores_equal_the_forward_first_order_scores(name, recorded, tmp_path_factory):
    rec = _recorded(recorded, name, tmp_path_factory)
    trajectory = load_trajectory(rec.path)
    assert [e.step for e in trajectory.steps] == [t for t in range(STEPS) if t not in rec.run.skip]
    if rec.run.clip:  # the clip must be active, and not everywhere
        assert any(rec.clipped) and (rec.run.clip[0] == "value" or not all(rec.clipped)), rec.clipped
        assert rec.run.clip[0] == "norm" or all(rec.clipped)
    rep = replay(rec)
    module_before = [p.detach().clone() for p in rep.module.parameters()]
    # every boundary s = 0..STEPS at once, two queries (a batch, a callable) in the same backward pass
    got = rep.scores({"query": rec.query, "logit": rec.logit}, list(range(STEPS + 1)))
    for q in ("query", "logit"):
        assert got[q].shape == (STEPS + 1, NUM_SAMPLES)
        _assert_same(got[q], rec.totals[q])
        assert not got[q][:, UNSEEN].any()
    result = rep.influence(rec.query)
    assert result.estimator == "first-order"
    assert torch.equal(result.sample_ids, torch.arange(UNSEEN))
    _assert_same(result.scores, rec.totals["query"][STEPS, :UNSEEN])
    assert all(torch.equal(a, b) for a, b in zip(module_before, rep.module.parameters()))


@pytest.mark.parametrize("name", ["adamw", "gap"])
def test_windows_are_differences_of_the_forward_scores(name, recorded, tmp_path_factory):
    rec = _recorded(recorded, name, tmp_path_factory)
    ids = torch.arange(UNSEEN)
    start = 1 if 0 in rec.run.skip else 0
    windows = replay(rec).windows("q", rec.query, boundaries=[4, 8, STEPS])
    last_steps = [max(t for t in range(b) if t not in rec.run.skip) for b in (4, 8, STEPS)]
    assert [(w.index, w.start_step, w.end_step, w.epoch) for w in windows] == [
        (0, start, 4, last_steps[0] // EPOCH_LEN),
        (1, 4, 8, last_steps[1] // EPOCH_LEN),
        (2, 8, STEPS, last_steps[2] // EPOCH_LEN),
    ]
    totals = rec.totals["query"]
    for w in windows:
        assert w.query == "q" and torch.equal(w.sample_ids, ids)
        _assert_same(w.scores, (totals[w.end_step] - totals[w.start_step])[ids])
    _assert_same(sum(w.scores for w in windows), totals[STEPS, ids])


@pytest.mark.parametrize(
    ("schedule", "ends"), [({"every_n_steps": 4, "every_n_epochs": None}, [4, 8, 10]), ({"every_n_epochs": 2}, [6, 10])]
)
def test_default_window_boundaries_follow_the_recorded_schedule(schedule, ends, tmp_path):
    run = dataclasses.replace(RUNS["momentum"], windows=schedule)
    rec = record(run, tmp_path / "trajectory")
    windows = replay(rec).windows("q", rec.query)
    assert [w.end_step for w in windows] == ends
    assert [w.epoch for w in windows] == [(b - 1) // EPOCH_LEN for b in ends]
    totals = rec.totals["query"]
    for w in windows:
        _assert_same(w.scores, (totals[w.end_step] - totals[w.start_step])[:UNSEEN])


def test_per_example_and_loader_queries(recorded, tmp_path_factory):
    rec = _recorded(recorded, "accumulation", tmp_path_factory)
    rep = replay(rec)
    xq, yq = rec.query
    loader = [(xq[:1], yq[:1]), (xq[1:], yq[1:])]
    got = rep.scores({"examples": rec.query, "loader": loader}, [STEPS, 5], per_example=True)
    assert got["examples"].shape == (2, 4, NUM_SAMPLES)
    expected = rec.totals["examples"][[STEPS, 5]].transpose(1, 2)  # [2, n, N]
    _assert_same(got["examples"], expected)
    _assert_same(got["loader"], expected)
    mean = rep.scores({"loader": loader}, [STEPS])["loader"][0]
    _assert_same(mean, rec.totals["query"][STEPS])
    result = rep.influence(rec.query, per_example=True)
    assert result.per_example.shape == (UNSEEN, 4)
    _assert_same(result.per_example, rec.totals["examples"][STEPS, :UNSEEN])
    _assert_same(result.scores, rec.totals["query"][STEPS, :UNSEEN])


def test_recorded_batches_replace_the_dataset(recorded, tmp_path_factory):
    rec = _recorded(recorded, "record-batches", tmp_path_factory)
    assert load_trajectory(rec.path).batches(0)[0][-1].dtype == torch.long  # the ids ride along
    result = replay(rec, dataset=[]).influence(rec.query)  # the dataset is never read
    _assert_same(result.scores, rec.totals["query"][STEPS, :UNSEEN])


def _first_replayed_step_with(path: Path, sample: int) -> int:
    """The step the replay meets first that trains on ``sample`` (segments from the last, steps in order)."""
    for _, entries in reversed(load_trajectory(path).segments()):
        for entry in entries:
            if any(sample in ids for ids, _ in entry.micro_batches):
                return entry.step
    raise AssertionError


@pytest.mark.parametrize("name", ["adam", "record-batches"])
def test_a_changed_dataset_is_a_mismatch_unless_the_batches_were_recorded(name, recorded, tmp_path_factory):
    rec = _recorded(recorded, name, tmp_path_factory)
    x, y = rec.dataset.tensors
    changed = x.clone()
    changed[2] += 0.5
    rep = replay(rec, dataset=TensorDataset(changed, y))
    if rec.run.record_batches:
        _assert_same(rep.influence(rec.query).scores, rec.totals["query"][STEPS, :UNSEEN])
        return
    step = _first_replayed_step_with(rec.path, 2)
    with pytest.raises(ReplayMismatchError, match=rf"step {step} \(epoch \d+\) the gradient") as info:
        rep.influence(rec.query)
    message = str(info.value)
    assert "relative to their norm" in message and "record_batches=True" in message and "augmentation" in message


def test_only_one_segment_is_held_at_a_time(recorded, tmp_path_factory, monkeypatch):
    rec = _recorded(recorded, "adam", tmp_path_factory)
    alive, sizes = [], []
    original = TrajectoryReplay._replay

    def spy(self, entries, *args):
        gc.collect()
        assert all(ref() is None for ref in alive), "an earlier segment's steps are still alive"
        steps, theta, frozen = original(self, entries, *args)
        sizes.append(len(steps))
        alive.extend(weakref.ref(x) for s in steps for x in (s, s.opt_step))
        return steps, theta, frozen

    monkeypatch.setattr(TrajectoryReplay, "_replay", spy)
    replay(rec).influence(rec.query)
    assert sizes == [1, 3, 3, 3]  # segments from the last: steps 9 | 6-8 | 3-5 | 0-2
    gc.collect()
    assert all(ref() is None for ref in alive)


_SCRIPT = """
import sys, torch
from torch import nn
from torch.utils.data import TensorDataset
from lightning_influence.trajectory.replay import TrajectoryReplay
from lightning_influence.testing import cross_entropy_losses
data = torch.load(sys.argv[1])
net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
replay = TrajectoryReplay(sys.argv[2], net, TensorDataset(data["x"], data["y"]),
                          loss_fn=lambda m, b: cross_entropy_losses(m, b[0], b[1]), progress=False)
torch.save(replay.scores({"q": (data["xq"], data["yq"])}, [5, 10])["q"], sys.argv[3])
"""


def test_a_new_process_replays_to_the_same_scores(recorded, tmp_path_factory, tmp_path):
    rec = _recorded(recorded, "momentum", tmp_path_factory)
    x, y = rec.dataset.tensors
    torch.save({"x": x, "y": y, "xq": rec.query[0], "yq": rec.query[1]}, tmp_path / "data.pt")
    out = tmp_path / "scores.pt"
    root = Path(__file__).resolve().parents[2]
    args = [sys.executable, "-c", _SCRIPT, str(tmp_path / "data.pt"), str(rec.path), str(out)]
    subprocess.run(args, check=True, cwd=root, capture_output=True, timeout=300)
    here = replay(rec).scores({"q": rec.query}, [5, 10])["q"]
    torch.testing.assert_close(torch.load(out), here, rtol=1e-12, atol=1e-15)
    _assert_same(here, rec.totals["query"][[5, 10]])


def test_float32_trajectory_replays_within_its_tolerance(tmp_path):
    rec = record(RUNS["adamw"], tmp_path / "trajectory", dtype=torch.float32)
    result = replay(rec).influence(rec.query)
    assert result.scores.dtype == torch.float32
    _assert_same(result.scores, rec.totals["query"][STEPS, :UNSEEN], rtol=1e-3)


def test_a_module_of_another_architecture_or_without_loss_is_refused(recorded, tmp_path_factory):
    rec = _recorded(recorded, "sgd", tmp_path_factory)
    wrong = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    with pytest.raises(ValueError, match=r"0\.weight has shape \(5, 3\), recorded \(4, 3\)"):
        TrajectoryReplay(rec.path, wrong, rec.dataset, loss_fn=loss_fn)
    extra = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3), nn.Linear(3, 3)).double()
    with pytest.raises(ValueError, match="3.weight is trainable but was not recorded"):
        TrajectoryReplay(rec.path, extra, rec.dataset, loss_fn=loss_fn)
    with pytest.raises(ValueError, match="per_sample_loss"):
        TrajectoryReplay(rec.path, _mlp(0), rec.dataset)
    with pytest.raises(ValueError, match="outside the recorded run"):
        replay(rec).scores({"q": rec.query}, [STEPS + 1])


def test_the_trajectory_delegates_to_the_replay(recorded, tmp_path_factory):
    rec = _recorded(recorded, "two-groups", tmp_path_factory)
    trajectory = load_trajectory(rec.path)
    kwargs = {"loss_fn": loss_fn, "progress": False}
    result = trajectory.influence(_mlp(7), rec.dataset, rec.query, per_example=True, **kwargs)
    _assert_same(result.per_example, rec.totals["examples"][STEPS, :UNSEEN])
    windows = trajectory.windows(_mlp(7), rec.dataset, "q", rec.query, boundaries=[5, STEPS], **kwargs)
    assert [(w.start_step, w.end_step) for w in windows] == [(0, 5), (5, STEPS)]
    _assert_same(windows[1].scores, (rec.totals["query"][STEPS] - rec.totals["query"][5])[:UNSEEN])


def test_a_replay_that_does_not_end_on_the_recorded_parameters_is_a_mismatch(tmp_path):
    rec = record(RUNS["momentum"], tmp_path / "trajectory")
    final = torch.load(rec.path / "final.pt", weights_only=True)
    final["theta"] = final["theta"] * (1 + 1e-6)
    torch.save(final, rec.path / "final.pt")
    pattern = rf"after replaying step {STEPS - 1}, compared with the final parameters \(step {STEPS}\), the parameters"
    with pytest.raises(ReplayMismatchError, match=pattern):
        replay(rec).influence(rec.query)


def test_a_module_of_another_dtype_is_used_through_a_cast_copy(recorded, tmp_path_factory):
    rec = _recorded(recorded, "sgd", tmp_path_factory)
    module = _mlp(3, torch.float32)
    before = [p.detach().clone() for p in module.parameters()]
    rep = TrajectoryReplay(rec.path, module, rec.dataset, loss_fn=loss_fn, progress=False)
    assert rep.module is not module
    _assert_same(rep.influence(rec.query).scores, rec.totals["query"][STEPS, :UNSEEN])
    assert all(p.dtype == torch.float32 and torch.equal(p, b) for p, b in zip(module.parameters(), before))
