"""Our ``"acc"`` tracker against the official ACC-SGD-IE code on its own Adult experiment (issue 11).

The official code (github.com/Ancientshi/ACC-SGD-IE, ``experiment/Sec71``) is run from a checkout given with
``--official``, never copied into this repository. Its ``shell/exp.sh`` setting: Adult, ``dnn`` (input→8→8→1 ReLU,
BCE with logits), 400 training / 400 validation samples, batch 100, plain SGD with lr 0.1 decayed after every step
(``lr *= sqrt(c / (c + 1))``), alpha = 0, ``--epoch 30`` (120 steps), batches ``np.random.seed(epoch)``;
``array_split(permutation(400), 4)``. Per seed:

1. the official ``train.py`` trains the factual run and all 400 leave-one-out runs, and the official
   ``infl.py --type true`` turns them into the ground truth ``f(θ_-i) − f(θ)`` (f = mean validation loss);
2. the official ``infl.py --type proposed --simpj 0`` (``infl_accumulative_sgd``, "the ACC stage") scores all 400
   samples; it is timed whole (data loading + ``joblib.load`` of the 121 stored models + compute + save) and as
   compute alone (from the end of ``joblib.load`` to the start of the final ``joblib.dump``);
3. our side trains the same network (``torch.manual_seed(seed)`` then the same layers: checked equal to their
   initial weights) on the same features (dumped by their ``DataModule``), the same batches in the same order and
   the same learning rates (checked equal to theirs), float32, through a Lightning Trainer, once bare and once with
   ``InfluenceTracker(track=all 400, queries={"val": ...}, estimator="acc")``. Our time is the tracked fit minus the
   bare fit (least of ``--repeats`` each), plus ``tracker.influence("val")``.

Signs: the truth and the official ACC scores are ``f(θ_-i) − f(θ)``, which is also our score ([concepts.md: The
counterfactual run]; negative = harmful), so no sign is flipped; the script checks that each side correlates positively
with the truth. Both sides run on one thread (``torch.set_num_threads(1)``, and OMP/MKL threads = 1 for the official
code).

The official code hard-codes ``device = 'cuda:%d'`` and imports torchvision. The script copies ``experiment/Sec71``
to a temporary folder, replaces that device line by ``'cpu'`` there, and runs it through a small runner that puts
a stub ``torchvision`` module into ``sys.modules`` (only the Adult loader is used; it needs no torchvision).

Run:  git clone https://github.com/Ancientshi/ACC-SGD-IE /tmp/acc-sgd-ie
      python benchmarks/acc_sgd_ie.py --official /tmp/acc-sgd-ie            (3 seeds, a few minutes on 2 cores)
      python benchmarks/acc_sgd_ie.py --official /tmp/acc-sgd-ie --seeds 6  (all of exp.sh's seeds)
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from overhead import hvp_floor as overhead_floor  # benchmarks/ is the script's directory
from torch import nn

from lightning_influence import InfluenceTracker
from lightning_influence.testing import TinyClassifier, agreement, fixed_loader, lightning_trainer

CLONE = "git clone https://github.com/Ancientshi/ACC-SGD-IE /tmp/acc-sgd-ie"
DEVICE_LINE = "device = 'cuda:%d' % (gpu,)"
SETTING = {"target": "adult", "model": "dnn", "datasize": 400, "batch-size": 100, "lr": 0.1,
           "corrupted": 0, "corruption_sigma": 0, "noise": 0, "noise_rate": 0, "init": 0}  # fmt: skip

RUNNER = r'''"""One stage of the official Sec71 code on the CPU, one thread (written by benchmarks/acc_sgd_ie.py)."""
import json, os, sys, time, types
import numpy as np, torch

mode, seed, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
sys.argv = ["train.py", *json.loads(os.environ["ACC_SGD_IE_ARGS"])]
torch.set_num_threads(1)
tv, tr = types.ModuleType("torchvision"), types.ModuleType("torchvision.transforms")
tr.Compose = tr.ToTensor = tr.Normalize = lambda *a, **k: None
tv.transforms = tr
sys.modules.update({"torchvision": tv, "torchvision.transforms": tr})
sys.path.insert(0, "..")
import joblib, train
args = train.args
folder = "./%s/%s_%s_%s" % (args.datasize, args.target, args.model, train.suffix)
flat = lambda m: torch.cat([p.detach().reshape(-1) for p in m.parameters()]).numpy()
if mode == "train":
    module, (n_tr, n_val, n_test), _, alpha, (lr, decay, epochs, batch) = train.settings_dnn(args.target)
    (x_tr, y_tr), (x_val, y_val), _ = module.fetch(n_tr, n_val, n_test, seed, args=args)
    train.test(args.target, args.model, seed, args.gpu)
    import infl
    infl.infl_true(args.target, args.model, seed, args.gpu)
    res = joblib.load("%s/sgd%03d.dat" % (folder, seed))
    np.savez(out, x_tr=x_tr, y_tr=y_tr, x_val=x_val, y_val=y_val, alpha=alpha, decay=decay, epochs=epochs,
             init=flat(res["models"].models[0]), final=flat(res["models"].models[-1]),
             idx=np.stack([s["idx"] for s in res["info"]]), lrs=np.array([s["lr"] for s in res["info"]]),
             truth=joblib.load("%s/infl_true%03d.dat" % (folder, seed)))
else:
    import infl
    marks = {}
    class Timed:  # the ACC stage's own joblib calls mark where its compute starts and ends
        def load(self, *a, **k):
            r = joblib.load(*a, **k); marks["loaded"] = time.perf_counter(); return r
        def dump(self, *a, **k):
            marks["computed"] = time.perf_counter(); return joblib.dump(*a, **k)
    infl.joblib = Timed()
    t0 = time.perf_counter()
    infl.infl_accumulative_sgd(args.target, args.model, seed, args.gpu)
    total = time.perf_counter() - t0
    np.savez(out, scores=joblib.load("%s/infl_proposed_nosimpj_%03d.dat" % (folder, seed)), total=total,
             compute=marks["computed"] - marks["loaded"], threads=torch.get_num_threads())
'''


# ----------------------------------------------------------------------------- the official side
def prepare(official: Path, workdir: Path) -> Path:
    """A copy of ``experiment/Sec71`` with the CUDA device line mapped to the CPU, and our runner in it."""
    src = official / "experiment" / "Sec71"
    if not (src / "infl.py").is_file():
        raise SystemExit(f"{src} does not hold the official Sec71 code (infl.py); get it with: {CLONE}")
    dst = workdir / "Sec71"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.dat", "__pycache__"))
    for name in ("train.py", "infl.py"):
        text = (dst / name).read_text()
        if DEVICE_LINE not in text:
            raise SystemExit(f"{name}: the line {DEVICE_LINE!r} was not found; has the official code changed?")
        (dst / name).write_text(text.replace(DEVICE_LINE, "device = 'cpu'"))
    (dst / "shell" / "runner.py").write_text(RUNNER)
    return dst / "shell"


def official_stage(shell: Path, mode: str, seed: int, epochs: int) -> dict:
    """Run ``mode`` ("train": training + LOO truth; "acc": the ACC stage) in a 1-thread subprocess."""
    argv = [f"--{k}={v}" for k, v in {**SETTING, "epoch": epochs, "seed": seed}.items()]
    argv += ["--type=proposed", "--simpj=0"]
    env = {**os.environ, "ACC_SGD_IE_ARGS": json.dumps(argv), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = shell / f"{mode}{seed}.npz"
    done = subprocess.run([sys.executable, "runner.py", mode, str(seed), str(out)], cwd=shell, env=env,
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode:
        raise RuntimeError(f"official {mode} stage, seed {seed}, failed:\n{done.stderr[-3000:]}")
    with np.load(out) as data:
        return {k: data[k] for k in data.files}


# ----------------------------------------------------------------------------- our side
def dnn(dim: int, seed: int) -> nn.Module:
    """The experiment's network, initialised as theirs is: ``torch.manual_seed(seed)`` then the layers in order."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(dim, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))


def flat(net: nn.Module) -> np.ndarray:
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()]).numpy()


def optimizer(net: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(net.parameters(), lr=0.1)


def decay(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """Their ``lr_n *= np.sqrt(c / (c + 1))`` after step c = 1, 2, ...: the same float operations."""
    return torch.optim.lr_scheduler.MultiplicativeLR(opt, lambda c: math.sqrt(c / (c + 1)))


def check_lrs(theirs: np.ndarray) -> None:
    opt = optimizer(nn.Linear(1, 1))
    sched, ours = decay(opt), []
    for _ in range(len(theirs)):
        ours.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    if not np.array_equal(np.array(ours), theirs):
        raise RuntimeError(f"learning rates differ from theirs by up to {np.abs(np.array(ours) - theirs).max():.1e}")


def our_problem(ref: dict, seed: int) -> dict:
    """Tensors, network and batch schedule of one seed, checked against the official run's."""
    x, y = torch.from_numpy(ref["x_tr"]).float(), torch.from_numpy(ref["y_tr"]).float()
    net = dnn(x.shape[1], seed)
    if not np.array_equal(flat(net), ref["init"]):
        raise RuntimeError("our initial weights differ from theirs")
    check_lrs(ref["lrs"])
    steps_per_epoch = len(ref["idx"]) // int(ref["epochs"])
    batches = [sorted(int(i) for i in b) for b in ref["idx"]]  # their factual run sorts each batch (setdiff1d)
    sched = [batches[e : e + steps_per_epoch] for e in range(0, len(batches), steps_per_epoch)]
    query = (torch.from_numpy(ref["x_val"]).float(), torch.from_numpy(ref["y_val"]).float())
    return {"x": x, "y": y, "net": net, "sched": sched, "query": query}


def fit(prob: dict, callbacks: list) -> tuple[float, nn.Module]:
    model = TinyClassifier(copy.deepcopy(prob["net"]), optimizer, decay)
    trainer = lightning_trainer(len(prob["sched"]), precision="32-true", callbacks=callbacks)
    loader = fixed_loader(prob["x"], prob["y"], prob["sched"])
    t0 = time.perf_counter()
    trainer.fit(model, loader)
    return time.perf_counter() - t0, model.net


def ours(prob: dict, repeats: int) -> dict:
    """Bare and tracked fits (least of ``repeats`` each); the tracker's work and its scores."""
    bare, tracked = [], []
    for _ in range(repeats):
        seconds, net = fit(prob, [])
        bare.append(seconds)
        tracker = InfluenceTracker(track=list(range(len(prob["x"]))), queries={"val": prob["query"]},
                                   estimator="acc", write_artifacts=False)  # fmt: skip
        seconds, _ = fit(prob, [tracker])
        t0 = time.perf_counter()
        result = tracker.influence("val")
        tracked.append(seconds + time.perf_counter() - t0)
    scores = torch.zeros(len(prob["x"]), dtype=torch.float64)
    scores[result.sample_ids] = result.scores.double()  # the sign of the truth: no flip
    return {"scores": scores, "bare": min(bare), "work": min(tracked) - min(bare), "final": flat(net),
            "floor": hvp_floor(tracker, prob)}  # fmt: skip


def hvp_floor(tracker: InfluenceTracker, prob: dict) -> float:
    """Seconds of the method's floor for one step, as ``overhead.py`` times it (its ``hvp_floor``): the step's
    gradient graph and its HVP with all k states, the cheapest of the tracker's ways, at the final parameters on
    the run's first batch."""
    loss = tracker.engine.loss
    named = dict(loss.module.named_parameters())
    theta = loss.layout.flatten([named[n].detach() for n in loss.layout.names])
    ids = torch.tensor(prob["sched"][0][0])
    return overhead_floor(loss, theta, (prob["x"][ids], prob["y"][ids], ids), tracker.engine.theta, reps=9)


# ----------------------------------------------------------------------------- one seed, the tables
def one_seed(shell: Path, seed: int, epochs: int, repeats: int) -> dict:
    ref = official_stage(shell, "train", seed, epochs)
    acc = official_stage(shell, "acc", seed, epochs)
    mine = ours(our_problem(ref, seed), repeats)
    truth = torch.from_numpy(ref["truth"]).double()
    peer = torch.from_numpy(acc["scores"]).double()
    row = {"seed": seed, "steps": len(ref["lrs"]), "drift": float(np.abs(mine["final"] - ref["final"]).max()),
           "ours": agreement(mine["scores"], truth), "official": agreement(peer, truth),
           "ours vs official": agreement(mine["scores"], peer), "peer_total": float(acc["total"]),
           "peer_compute": float(acc["compute"]), "work": mine["work"], "bare": mine["bare"],
           "floor": mine["floor"]}  # fmt: skip
    for side in ("ours", "official"):
        if row[side]["pearson"] <= 0:
            print(f"# WARNING seed {seed}: {side} scores correlate negatively with the truth (a sign flip?)")
    print(f"# seed {seed} done: ours {row['work']:.2f} s, official ACC compute {row['peer_compute']:.1f} s;"
          f" bare fit ends {row['drift']:.1e} from their final parameters", flush=True)  # fmt: skip
    return row


def fmt(values: list[float], spec: str = ".3f") -> str:
    if len(values) < 2:
        return f"{values[0]:{spec}}"
    return f"{statistics.mean(values):{spec}} ± {statistics.stdev(values):{spec}}"


def timing(row: dict) -> list[float]:
    """peer total s, peer compute s, our work s, our ms/step, compute ratio, total ratio, floor ms/step, the compute
    ratio at the floor, bare fit s."""
    work, floor = row["work"], row["floor"] * row["steps"]
    return [row["peer_total"], row["peer_compute"], work, 1000 * work / row["steps"], row["peer_compute"] / work,
            row["peer_total"] / work, 1000 * row["floor"], row["peer_compute"] / floor, row["bare"]]  # fmt: skip


def accuracy_table(rows: list[dict]) -> None:
    metrics = {"kendall": ".4f", "spearman": ".4f", "pearson": ".4f", "rel_rmse": ".2e"}
    print("### Against exact leave-one-out (their `infl_true`), per seed and mean ± std\n")
    print("| seed | scores | Kendall τ | Spearman | Pearson | rel. RMSE |", "|---|---|---:|---:|---:|---:|", sep="\n")
    for side in ("ours", "official", "ours vs official"):
        for row in rows:
            print(f"| {row['seed']} | {side} | " + " | ".join(f"{row[side][m]:{f}}" for m, f in metrics.items()) + " |")
        vals = [fmt([row[side][m] for row in rows], f) for m, f in metrics.items()]
        print(f"| **mean** | **{side}** | " + " | ".join(vals) + " |")
    print("\nAll scores are f(θ_-i) − f(θ) (f = mean validation loss; negative = harmful): no sign flipped. 'ours vs"
          " official' compares the two estimates with each other (the official one as reference).\n")  # fmt: skip


def time_table(rows: list[dict]) -> None:
    print("### Time (s), 1 thread\n")
    head = "| seed | official ACC stage, total | its compute | our tracker work | ours, ms/step | speed-up (compute)"
    head += " | speed-up (total) | HVP floor, ms/step | speed-up at the floor | bare Lightning fit |"
    print(head, "|---|" + "---:|" * 9, sep="\n")
    cols, digits = [timing(row) for row in rows], [1, 1, 2, 1, 1, 1, 1, 1, 2]
    for row, col in zip(rows, cols):
        print(f"| {row['seed']} | " + " | ".join(f"{v:.{d}f}" for v, d in zip(col, digits)) + " |")
    print("| **mean ± std** | " + " | ".join(fmt([c[i] for c in cols], f".{d}f") for i, d in enumerate(digits)) + " |")
    print(
        "\n- official ACC stage, total: `infl_accumulative_sgd` (`infl.py --type proposed --simpj 0`) in a fresh"
        " process: Adult CSV loading and preprocessing, `joblib.load` of the stored run (121 models), compute, save."
    )
    print(
        "- its compute: from the end of that `joblib.load` to the start of its final `joblib.dump` (validation"
        " gradient, the 400 per-sample states, the backward sweep over the steps)."
    )
    print(
        "- our tracker work: tracked Lightning fit − bare Lightning fit (least of the repeats each), plus"
        ' `tracker.influence("val")`; ms/step divides it by the steps. Speed-up: official time / our work.'
    )
    print(
        "- HVP floor: the step's gradient graph and its HVP with all 400 states alone (the cheapest of the tracker's"
        " ways, timed as in overhead.py, final parameters, one batch of the run). Speed-up at the floor: official"
        " compute / (steps × floor),"
        " the most a tracker that did nothing else could reach."
    )
    print(
        "- Not timed on either side: the official `train.py` run that stores a model per step (their ACC stage"
        " needs it) and our bare fit itself."
    )
    drift = max(row["drift"] for row in rows)
    print(f"\nOur bare fit ends at most {drift:.1e} (max abs) from their factual run's final parameters"
          " (initial weights and learning rates: identical).")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--official", type=Path, help="a checkout of github.com/Ancientshi/ACC-SGD-IE")
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (exp.sh uses 6)")
    ap.add_argument("--epochs", type=int, default=30, help="exp.sh's EPOCHS value (30: 120 steps)")
    ap.add_argument("--repeats", type=int, default=3, help="bare and tracked fits per seed (least is kept)")
    args = ap.parse_args()
    if args.official is None:
        print(f"This benchmark runs the official ACC-SGD-IE code. Get it with\n    {CLONE}\nand run\n"
              "    python benchmarks/acc_sgd_ie.py --official /tmp/acc-sgd-ie")  # fmt: skip
        return
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    started, load = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="acc-sgd-ie-") as workdir:
        shell = prepare(args.official.resolve(), Path(workdir))
        rows = [one_seed(shell, seed, args.epochs, args.repeats) for seed in range(args.seeds)]
    print(f"\n## Ours (`estimator=\"acc\"`) vs the official ACC-SGD-IE code, Adult dnn, n=400,"
          f" {rows[0]['steps']} steps, float32, CPU\n")  # fmt: skip
    print(
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; Python"
        f" {platform.python_version()}, torch {torch.__version__}, {torch.get_num_threads()} thread (both sides).\n"
    )
    accuracy_table(rows)
    time_table(rows)
    print(f"\nTotal wall time {time.perf_counter() - started:.0f} s; 1-minute load average {load:.1f} at the start,"
          f" {os.getloadavg()[0]:.1f} at the end.")  # fmt: skip


if __name__ == "__main__":
    main()
