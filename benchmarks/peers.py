"""Our tracker against peer libraries on the faithfulness setups, with exact leave-one-out as ground truth.

Per setup of ``benchmarks/faithfulness.py`` and seed (the same data, initial network and batch schedule:
``faithfulness.draw``), every method scores all training samples for f = mean query loss: Spearman against
``loo_j = f(θ_-j(T)) − f(θ(T))`` (``testing.leave_one_out``) and wall time per answer. Every method's training
run is checked to end at the reference run's parameters (to 1e-9). Sign: scores are read as ours (negative =
harmful). dattri's TracIn and DVEmb and captum's TracInCP score helpful samples positive, as we do: no flip.
dattri-llm's AdamW-influence returns −(predicted change of f on removal): flipped.

Run (in the virtual environment of the ``peers`` extra, see docs/peers.md):
    python benchmarks/peers.py            (5 seeds, about 2 minutes on 2 CPU cores)
    python benchmarks/peers.py --quick    (1 seed)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import logging
import os
import platform
import shutil
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
from functools import partial
from importlib import metadata
from typing import Callable

import torch
from faithfulness import SETUPS, Setup, draw, fmt
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.functional import spearman_corrcoef

from lightning_influence import InfluenceTracker, testing
from lightning_influence.testing import cross_entropy_losses

PACKAGES = ("torch", "lightning", "dattri", "captum", "dattri-llm")


@dataclass
class Problem:
    setup: Setup
    x: torch.Tensor
    y: torch.Tensor
    xq: torch.Tensor
    yq: torch.Tensor
    net: nn.Module
    sched: list
    loo: torch.Tensor
    reference: nn.Module
    t_loo: float = 0.0
    bare_lightning: float = 0.0
    bare_plain: float = 0.0


class Keyed(nn.Module):
    """``net`` with the batch's sample ids as a forward argument (dattri-llm reads ids from there)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x)


def loader(x: torch.Tensor, y: torch.Tensor) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=len(x))


def same_run(prob: Problem, net: nn.Module) -> None:
    drift = max(float((a - b).abs().max()) for a, b in zip(net.parameters(), prob.reference.parameters()))
    if drift > 1e-9:
        raise RuntimeError(f"{prob.setup.name}: this run differs from the reference run by {drift:.2e}.")


# ----------------------------------------------------------------------------- the common training runs
def lightning_fit(prob: Problem, callbacks: list) -> float:
    """The tracked (or bare) Lightning fit of faithfulness.py; its seconds."""
    model = testing.TinyClassifier(copy.deepcopy(prob.net), prob.setup.optimizer)
    trainer = testing.lightning_trainer(len(prob.sched), callbacks=callbacks)
    t0 = time.perf_counter()
    trainer.fit(model, testing.fixed_loader(prob.x, prob.y, prob.sched))
    seconds = time.perf_counter() - t0
    same_run(prob, model.net)
    return seconds


def nothing(*args) -> None:
    pass


def plain_run(prob: Problem, model: Keyed | None = None, opt=None, before=nothing, after=nothing, epoch_end=nothing):
    """``testing.retrain``'s loop (w = 1, the same batches) with the peers' hooks; its seconds."""
    model = model if model is not None else Keyed(copy.deepcopy(prob.net))
    opt = opt if opt is not None else prob.setup.optimizer(model.net)
    t0, step = time.perf_counter(), 0
    for e, epoch in enumerate(prob.sched):
        for ids in epoch:
            idx = torch.as_tensor(ids)
            before(e, idx, opt)
            opt.zero_grad()
            loss = cross_entropy_losses(partial(model, idx=idx), prob.x[idx], prob.y[idx]).sum() / len(idx)
            loss.backward()
            opt.step()
            after(step)
            step += 1
        epoch_end(e, model.net, opt)
    seconds = time.perf_counter() - t0
    same_run(prob, model.net)
    return seconds


def make_problem(setup: Setup, seed: int) -> Problem:
    x, y, xq, yq, net, sched = draw(setup, seed)
    t0 = time.perf_counter()
    loo = testing.leave_one_out(net, setup.optimizer, x, y, sched, (xq, yq), range(len(x)))
    t_loo = time.perf_counter() - t0
    prob = Problem(setup, x, y, xq, yq, net, sched, loo, testing.retrain(net, setup.optimizer, x, y, sched), t_loo)
    prob.bare_lightning = min(lightning_fit(prob, []) for _ in range(3))
    prob.bare_plain = min(plain_run(prob) for _ in range(3))
    return prob


# ----------------------------------------------------------------------------- ours
def ours(estimator: str, prob: Problem) -> tuple[torch.Tensor, float]:
    """``estimator="replay"``: a recording without forward states (``track=()``), then the all-sample replay."""
    replay, dirpath = estimator == "replay", tempfile.mkdtemp()
    how = dict(track=(), record_trajectory=True, dirpath=dirpath) if replay else dict(estimator=estimator)
    tracker = InfluenceTracker(queries={"q": (prob.xq, prob.yq)}, write_artifacts=False, **how)
    t_fit = lightning_fit(prob, [tracker])
    t0 = time.perf_counter()
    result = tracker.replay(progress=False).influence((prob.xq, prob.yq)) if replay else tracker.influence("q")
    seconds = t_fit - prob.bare_lightning + time.perf_counter() - t0
    shutil.rmtree(dirpath)
    return scatter(prob, result.sample_ids, result.scores), seconds


def scatter(prob: Problem, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    out = torch.full((len(prob.x),), float("nan"), dtype=torch.float64)
    out[ids.long()] = scores.double()
    return out


# ----------------------------------------------------------------------------- peers
def dattri_task(model: nn.Module, checkpoints):
    from dattri.task import AttributionTask

    def loss(params, data):  # one sample's loss, torch.func style (dattri vmaps it)
        x, y = data
        net = partial(torch.func.functional_call, model, params)
        return cross_entropy_losses(net, x.unsqueeze(0), y.unsqueeze(0)).sum()

    return AttributionTask(loss_func=loss, model=model, checkpoints=checkpoints)


def dattri_tracin(prob: Problem) -> tuple[torch.Tensor, float]:
    from dattri.algorithm.tracin import TracInAttributor

    ckpts, lrs = [], []

    def keep(e, net, opt):  # the checkpoints dattri takes: state dicts, weighted by the learning rate
        ckpts.append(copy.deepcopy(net.state_dict()))
        lrs.append(opt.param_groups[0]["lr"])

    t_run = plain_run(prob, epoch_end=keep)
    t0 = time.perf_counter()
    task = dattri_task(copy.deepcopy(prob.net), ckpts)
    exact = {"proj_type": "identity"}  # no random projection of the gradients
    attributor = TracInAttributor(task, torch.tensor(lrs), normalized_grad=False, projector_kwargs=exact)
    scores = attributor.attribute(loader(prob.x, prob.y), loader(prob.xq, prob.yq))
    return scores.double().mean(1), t_run - prob.bare_plain + time.perf_counter() - t0


def captum_tracincp(prob: Problem) -> tuple[torch.Tensor, float]:
    from captum.influence import TracInCP

    def summed_loss(out, target):  # captum's batched per-sample gradients want a summed loss, and say so:
        return cross_entropy_losses(lambda z: z, out, target).sum()

    summed_loss.reduction = "sum"

    def load_checkpoint(model, path):  # captum's loader contract: load into model, return the learning rate
        state = torch.load(path)
        model.load_state_dict(state["model"])
        return state["lr"]

    folder, paths = tempfile.mkdtemp(), []

    def save(e, net, opt):
        paths.append(os.path.join(folder, f"epoch{e}.pt"))
        torch.save({"model": net.state_dict(), "lr": opt.param_groups[0]["lr"]}, paths[-1])

    t_run = plain_run(prob, epoch_end=save)
    t0 = time.perf_counter()
    tracin = TracInCP(copy.deepcopy(prob.net), TensorDataset(prob.x, prob.y), paths, load_checkpoint,
                      loss_fn=summed_loss, batch_size=len(prob.x), sample_wise_grads_per_batch=True)  # fmt: skip
    scores = tracin.influence((prob.xq, prob.yq), aggregate=True).reshape(-1).double() / len(prob.xq)
    seconds = t_run - prob.bare_plain + time.perf_counter() - t0
    shutil.rmtree(folder)
    return scores, seconds


def dattri_dvemb(prob: Problem) -> tuple[torch.Tensor, float]:
    from dattri.algorithm.dvemb import DVEmbAttributor

    model = Keyed(copy.deepcopy(prob.net))
    dvemb = DVEmbAttributor(dattri_task(model.net, model.net.state_dict()))

    def cache(e, idx, opt):  # the per-sample gradients at the pre-step parameters, with the step's lr
        dvemb.cache_gradients(e, (prob.x[idx], prob.y[idx]), idx, opt.param_groups[0]["lr"])

    t_run = plain_run(prob, model, before=cache)
    t0 = time.perf_counter()
    dvemb.cache()
    scores = dvemb.attribute(loader(prob.xq, prob.yq))
    return scores.double().mean(1), t_run - prob.bare_plain + time.perf_counter() - t0


def dattri_llm_capture(prob: Problem, folder: str):
    """The training run under dattri-llm's hooks: per-sample gradients to a store, Adam moments around each step."""
    import dattri_llm as dl

    t0 = time.perf_counter()
    model = Keyed(copy.deepcopy(prob.net))
    opt = prob.setup.optimizer(model.net)
    recorder = dl.OptimizerStateCallback(model, opt)  # pre-step moments from the hooks, post-step from record_post
    store = dl.GradientStorageManager(os.path.join(folder, "train"))
    steps = sum(len(epoch) for epoch in prob.sched)
    hooks = dl.HookManager(model, callbacks=[dl.OffloadCallback(steps, store), recorder], sample_id_key="idx")
    with hooks.collect(deregister_on_exit=True):
        plain_run(prob, model, opt, after=recorder.record_post)
    return model, recorder, time.perf_counter() - t0


def dattri_llm_adamw(prob: Problem) -> tuple[torch.Tensor, float]:
    import dattri_llm as dl

    folder = tempfile.mkdtemp()
    try:
        model, recorder, t_run = dattri_llm_capture(prob, folder)
        t0 = time.perf_counter()
        test_store = dl.GradientStorageManager(os.path.join(folder, "test"))
        with dl.HookManager(model, callbacks=[dl.OffloadCallback(1, test_store)], sample_id_key="idx").collect(True):
            model.zero_grad()
            ids = torch.arange(len(prob.xq))
            cross_entropy_losses(partial(model, idx=ids), prob.xq, prob.yq).mean().backward()
        attributor = dl.AdamWInfluenceAttributor(dl.AttributionArguments(output_dir=os.path.join(folder, "out")))
        score = attributor.attribute_from_cache(os.path.join(folder, "train"), test_store.save_dir,
                                                dynamics=recorder.dynamics(), propagation="test")  # fmt: skip
        train_ids, matrix = score.agnostic_matrix()  # rows summed over the steps that used each sample
        seconds = t_run - prob.bare_plain + time.perf_counter() - t0
    finally:
        shutil.rmtree(folder)
    rows = torch.tensor([int(i) for i in train_ids])
    return -scatter(prob, rows, matrix.sum(1)), seconds  # dattri-llm: positive = removal lowers f; ours: negative


METHODS = {  # name: (method, what its time per answer includes; the common training itself is excluded)
    "ours: acc": (partial(ours, "acc"), "tracked Lightning fit − bare Lightning fit, + `tracker.influence`"),
    "ours: tracin": (partial(ours, "tracin"), "tracked Lightning fit − bare Lightning fit, + `tracker.influence`"),
    "ours: replay": (partial(ours, "replay"), "recording fit (`track=()`) − bare Lightning fit, + the adjoint replay"),
    "dattri TracIn": (dattri_tracin, "a state-dict copy at each epoch end, + `TracInAttributor.attribute`"),
    "captum TracInCP": (captum_tracincp, "`torch.save` at each epoch end, + `TracInCP(...).influence`"),
    "dattri DVEmb": (dattri_dvemb, "`cache_gradients` before each step, + `cache()` + `attribute()`"),
    "dattri-llm AdamW-inf.": (dattri_llm_adamw, "hooked run − bare run, + query capture + `attribute_from_cache`"),
}


# ----------------------------------------------------------------------------- the comparison
def attempt(method: Callable, prob: Problem) -> tuple[float, float] | str:
    """(Spearman against leave-one-out, seconds per answer), or why the method could not run."""
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # the peers' progress bars
            scores, seconds = method(prob)
    except ImportError as err:
        return f'not installed ({err.name or err}): pip install -e ".[peers]" (docs/peers.md)'
    except Exception as err:  # a peer that refuses this setup: say why, go on
        return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
    if not torch.isfinite(scores).all():
        return "non-finite or missing scores"
    return float(spearman_corrcoef(scores, prob.loo)), seconds


def run(setups: list[Setup], seeds: int) -> tuple[dict, dict]:
    """{(setup, method): [(Spearman, seconds), ...]} over seeds (method "" holds LOO and training times), and
    {(setup, method): why it did not run}."""
    results: dict[tuple[str, str], list[tuple[float, ...]]] = {}
    failures: dict[tuple[str, str], str] = {}
    warm: set[str] = set()
    for setup in setups:
        started = time.perf_counter()
        for seed in range(seeds):
            prob = make_problem(setup, seed)
            results.setdefault((setup.name, ""), []).append((prob.t_loo, prob.bare_lightning, prob.bare_plain))
            for name, (method, _) in METHODS.items():
                if name not in warm and not isinstance(attempt(method, prob), str):  # imports, first calls: untimed
                    warm.add(name)
                out = attempt(method, prob)
                if isinstance(out, str):
                    failures.setdefault((setup.name, name), out)
                else:
                    results.setdefault((setup.name, name), []).append(out)
        print(f"# done {setup.name} ({seeds} seed(s)) in {time.perf_counter() - started:.0f} s", flush=True)
    return results, failures


def ms(values) -> str:
    return f"{1000 * statistics.median(values):.0f}"


def print_tables(setups: list[Setup], seeds: int, results: dict, failures: dict) -> None:
    names = list(METHODS)
    header, rule = "| setup | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)
    print(f"### Spearman against exact leave-one-out (mean ± std over {seeds} seed(s); higher is better)\n")
    print(header, rule, sep="\n")
    for setup in setups:
        got = [results.get((setup.name, n)) for n in names]
        print(f"| {setup.name} | " + " | ".join(fmt([r[0] for r in g]) if g else "n/a" for g in got) + " |")
    print(f"\n### Wall time per answer, ms (median over {seeds} seed(s))\n")
    print("Last columns: exact leave-one-out (one retraining per sample, plain loop) and the common training itself")
    print("(bare Lightning fit / bare plain PyTorch loop, the least of 3), which no column before them includes.\n")
    print(header[:-1] + "| exact LOO | training: Lightning / plain |", rule + "---:|---:|", sep="\n")
    for setup in setups:
        got = [results.get((setup.name, n)) for n in names]
        loo, fit, plain = zip(*results[(setup.name, "")])
        cols = [ms(r[1] for r in g) if g else "n/a" for g in got] + [ms(loo), f"{ms(fit)} / {ms(plain)}"]
        print(f"| {setup.name} | " + " | ".join(cols) + " |")
    print("\nWhat each time includes:\n")
    for name, (_, timing) in METHODS.items():
        print(f"- **{name}**: {timing}")
    if failures:
        print("\nNot run (n/a above):\n")
        for (setup_name, name), why in failures.items():
            print(f"- {name} on {setup_name}: {why}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=5, help="independent data/init/schedule draws per setup")
    ap.add_argument("--quick", action="store_true", help="one seed")
    ap.add_argument("--setups", nargs="*", default=None, help=f"subset of {[s.name for s in SETUPS]}")
    args = ap.parse_args()
    seeds = 1 if args.quick else args.seeds
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)  # both sides
    setups = [s for s in SETUPS if args.setups is None or s.name in args.setups]
    started, load = time.perf_counter(), os.getloadavg()[0]
    results, failures = run(setups, seeds)
    print(f"\n## Peers on the faithfulness setups (float64 problems, {torch.get_num_threads()} thread)\n")
    have = {d.metadata["Name"].lower(): d.version for d in metadata.distributions()}
    software = [f"Python {platform.python_version()}"] + [f"{p} {have.get(p, 'not installed')}" for p in PACKAGES]
    print(f"Software: {', '.join(software)}.\n")
    print_tables(setups, seeds, results, failures)
    print(f"\nTotal runtime {time.perf_counter() - started:.0f} s; the machine's 1-minute load average was {load:.1f}"
          f" at the start and {os.getloadavg()[0]:.1f} at the end (other jobs than this one count too).")  # fmt: skip


if __name__ == "__main__":
    main()
