"""Ours against the peers on digits: LDS (same seed and fresh seed), flipped-label AUROC and cost, in one run.

1,000 of scikit-learn's digits with 10% of the labels flipped (``default_path.digits``), 200 test examples as the
per-example query, float32, AdamW (lr 3e-3, weight decay 1e-2), batch 64; two models: the tanh CNN of
``benchmarks/default_path.py`` (5 epochs) and a digits MLP (64 → 32 → 10, tanh, 15 epochs, as
``benchmarks/many_queries.py``). Every method attributes the same training run (same initial weights, same batches:
each recording fit is checked to end at the plain fit's parameters) and gives a [1000 train × 200 test] score matrix
with our sign, ``score = f(θ_-j) − f(θ)`` (negative = harmful), plus a self-influence per training sample where it
offers one.

- LDS: M random halves of the training set (``results.lds.subset_masks``), one model retrained on each by
  ``callbacks.datamodels.subset_query_losses`` (the removed half at weight 0), once with the common run's seed
  (``same-seed``: same initial weights and batch order) and once with a new seed per model (``fresh-seed``); every
  method is scored against the same retrained losses (``predicted_changes``, ``lds_from``: mean over the 200 test
  examples ± bootstrap standard error over the subsets).
- AUROC (torchmetrics ``binary_auroc``) of the flipped labels: from the self-influence (larger = flipped) and from the
  harm to the mean test loss (the mean of a sample's 200 scores; more negative = flipped).
- Cost: what the method adds to the plain fit (its recording fit − the plain fit, the least of 3) plus the time to
  produce the score matrix; its self-influence time apart.

Sign: the dattri attributors (TracIn, TRAK, influence function, DVEmb) and kronfluence score a sample that helps the
query positive, as we do: none is flipped (docs/peers.md says why for each).

Run in the peers' virtual environment (docs/peers.md; in the project's ``.venv`` the peers show as n/a):
    python benchmarks/lds.py            # both models, 32 subsets per variant: about 6 min on 2 CPU cores (375 s)
    python benchmarks/lds.py --quick    # the MLP, 8 subsets per variant: about 1.5 min
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
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from typing import Callable

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from default_path import cnn, digits
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset
from torchmetrics.functional.classification import binary_auroc

from lightning_influence import IndexedDataset, InfluenceTracker
from lightning_influence.callbacks.datamodels import subset_query_losses
from lightning_influence.results.lds import lds_from, predicted_changes, subset_masks
from lightning_influence.testing import TinyClassifier

PACKAGES = ("torch", "lightning", "dattri", "kronfluence")
INSTALL = {  # how to install a missing peer
    "dattri": 'pip install -e ".[peers]" (docs/peers.md)',
    "kronfluence": "pip install --no-deps kronfluence, then its dependencies but torchvision (docs/peers.md)",
}
SEED = 0  # the common run's seed; fresh-seed subset model m uses SEED + 1 + m
NUM_TEST = 200
BATCH = 64
IF_DAMPING = 0.1  # dattri IFAttributorCG: regularization λ (H + λI), with its default max_iter=10 (see docs/peers.md)
IF_CHUNK = 10  # dattri IFAttributorCG: right-hand sides per CG solve (≈ 3 GB at its peak on the CNN)
TRAK_PROJ_DIM = 512  # dattri's default projection dimension
TRAK_MODELS = 5  # TRAK's ensemble: the common run and 4 more full-data runs
TRAK_SEED = 1000  # their seeds, TRAK_SEED + 1.., apart from the fresh-seed subset models' seeds
ENERGY = 0.99  # ours: the query sketch's energy


def mlp() -> nn.Module:
    """The digits MLP of benchmarks/many_queries.py (64 → 32 → 10, tanh), on the 8×8 images."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))


ARCHS = {"cnn": ("digits CNN", cnn, 5), "mlp": ("digits MLP", mlp, 15)}  # key: (name, architecture, epochs)


def adamw(net: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-2)


class MakeModule:
    """``(seed) -> TinyClassifier``: the architecture with its initial weights drawn from ``seed``.

    ``default_path.cnn()`` seeds the global generator itself; the weights are drawn again from ``seed`` here, so the
    fresh-seed models get new initial weights, and the global generator (which the training loader's shuffle draws
    from) is left in a state that depends on ``seed`` only: same seed, same batches."""

    def __init__(self, arch: Callable[[], nn.Module]) -> None:
        self.arch = arch

    def __call__(self, seed: int) -> TinyClassifier:
        net = self.arch()
        torch.manual_seed(seed)
        for layer in net.modules():
            if layer is not net and hasattr(layer, "reset_parameters"):
                layer.reset_parameters()
        return TinyClassifier(net, adamw)


@dataclass
class Problem:
    name: str
    epochs: int
    make_module: MakeModule
    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    flipped: torch.Tensor
    loader: DataLoader = field(init=False)
    reference: dict = field(default_factory=dict)  # the plain fit's final parameters
    plain: float = 0.0  # the plain fit's seconds (least of 3)
    final_losses: torch.Tensor | None = None  # the plain fit's training loss of each sample (a baseline detector)

    def __post_init__(self) -> None:  # shuffled from the global generator, which seed_everything seeds
        self.loader = DataLoader(IndexedDataset(TensorDataset(*self.train)), batch_size=BATCH, shuffle=True)

    def trainer(self, callbacks: list | None = None) -> pl.Trainer:
        return pl.Trainer(max_epochs=self.epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, callbacks=callbacks or [])  # fmt: skip

    def fit(self, callbacks: list | None = None, seed: int = SEED, check: bool = True) -> tuple[TinyClassifier, float]:
        """The common run (``seed``), with ``callbacks``: the module and the fit's seconds; checked against the plain
        fit's final parameters."""
        pl.seed_everything(seed, verbose=False)
        module = self.make_module(seed)
        trainer = self.trainer(callbacks)
        started = time.perf_counter()
        trainer.fit(module, self.loader)
        seconds = time.perf_counter() - started
        if check and self.reference:
            drift = max(float((p - self.reference[n]).abs().max()) for n, p in module.net.named_parameters())
            if drift > 0:
                raise RuntimeError(f"this fit ends {drift:.1e} away from the plain fit: not the same run")
        return module, seconds


def make_problem(key: str) -> Problem:
    name, arch, epochs = ARCHS[key]
    train, val, flipped = digits(1000, 0.1)
    prob = Problem(name, epochs, MakeModule(arch), train, (val[0][:NUM_TEST], val[1][:NUM_TEST]), flipped)
    prob.fit()  # warm-up: the first fit pays for first calls
    fits = [prob.fit() for _ in range(3)]
    prob.plain = min(s for _, s in fits)
    prob.reference = {n: p.detach().clone() for n, p in fits[0][0].net.named_parameters()}
    module = fits[0][0].eval()
    with torch.no_grad():
        prob.final_losses = module.per_sample_loss((*prob.train, torch.arange(len(prob.train[0]))))
    return prob


@dataclass
class Scores:
    per_example: torch.Tensor  # float64 [num_train, num_test], our sign
    seconds: float  # recording fit − plain fit + the answer
    own: torch.Tensor | None = None  # self-influence [num_train], larger = more likely flipped
    own_seconds: float = float("nan")
    note: str = ""


def timed(fn: Callable):
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


def batch_loader(x: torch.Tensor, y: torch.Tensor, size: int | None = None) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=size or len(x))


# ----------------------------------------------------------------------------- ours
def ours(prob: Problem) -> dict[str, Scores]:
    """One recording fit (``track=(), record_trajectory=True``), then the replay: one adjoint row per test example,
    the query sketch, and the in-run self-influence."""
    folder = tempfile.mkdtemp()
    try:
        tracker = InfluenceTracker(track=(), record_trajectory=True, dirpath=folder, write_artifacts=False)
        module, fit_s = prob.fit([tracker])
        record = fit_s - prob.plain
        replay, open_s = timed(lambda: tracker.replay(progress=False))
        rows, rows_s = timed(lambda: replay.influence(prob.test, per_example=True))
        sketch, sketch_s = timed(lambda: replay.influence(prob.test, per_example=True, energy=ENERGY))
        own, own_s = timed(replay.self_influence)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    n = len(prob.train[0])
    own_scores = scatter(own.sample_ids, own.scores, n)
    directions = (sketch.approximation or "").split("query sketch: ")[-1].split(" ")[0]
    exact = Scores(scatter(rows.sample_ids, rows.per_example, n), record + open_s + rows_s, own_scores, own_s)
    sketched = Scores(scatter(sketch.sample_ids, sketch.per_example, n), record + open_s + sketch_s, own_scores, own_s)
    sketched.note = f"{directions} directions + 4 exact rows (the error check)"
    return {"ours: replay, one row per example": exact, f"ours: replay, query sketch (energy {ENERGY:g})": sketched}


def scatter(ids: torch.Tensor, scores: torch.Tensor, n: int) -> torch.Tensor:
    """Scores by sample id (NaN for an id without one, which the LDS then refuses)."""
    out = torch.full((n, *scores.shape[1:]), float("nan"), dtype=torch.float64)
    out[ids.long()] = scores.detach().double()
    return out


# ----------------------------------------------------------------------------- dattri
def dattri_task(net: nn.Module, checkpoints, loss: Callable | None = None):
    from dattri.task import AttributionTask

    return AttributionTask(loss_func=loss or cross_entropy_of(net), model=net, checkpoints=checkpoints)


def cross_entropy_of(net: nn.Module) -> Callable:
    """dattri's loss, torch.func style: one sample's loss (vmapped by dattri) or a batch's mean loss (the Hessian of
    the influence function)."""

    def loss(params, data):
        x, y = data
        if x.dim() == 3:  # one 1×8×8 image
            x, y = x.unsqueeze(0), y.unsqueeze(0)
        return F.cross_entropy(torch.func.functional_call(net, params, (x,)), y)

    return loss


def dattri_tracin(prob: Problem) -> Scores:
    """TracInCP: one checkpoint per epoch end, weighted by the learning rate, exact gradients (no projection)."""
    from dattri.algorithm.tracin import TracInAttributor

    class EpochEnds(pl.Callback):
        def __init__(self) -> None:
            self.states: list[dict] = []
            self.lrs: list[float] = []

        def on_train_epoch_end(self, trainer, module):
            self.states.append(copy.deepcopy(module.net.state_dict()))
            self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    saver = EpochEnds()
    module, fit_s = prob.fit([saver])
    started = time.perf_counter()
    task = dattri_task(copy.deepcopy(module.net), saver.states)
    tracin = TracInAttributor(task, torch.tensor(saver.lrs), normalized_grad=False,
                              projector_kwargs={"proj_type": "identity"})  # fmt: skip
    scores = tracin.attribute(batch_loader(*prob.train), batch_loader(*prob.test))
    seconds = fit_s - prob.plain + time.perf_counter() - started
    own, own_s = timed(lambda: tracin.self_attribute(batch_loader(*prob.train)))
    return Scores(scores.double(), seconds, own.double().reshape(-1), own_s)


def margin_of(net: nn.Module) -> Callable:
    """TRAK's model output for a classifier, one sample: the log-odds of the label, logit_y − logsumexp(others)."""

    def margin(params, data):
        x, y = data
        logits = torch.func.functional_call(net, params, (x.unsqueeze(0),))[0]
        label = torch.arange(logits.shape[0]) == y
        others = torch.where(label, torch.full_like(logits, float("-inf")), logits)
        return (logits * label).sum() - torch.logsumexp(others, 0)

    return margin


def probability_of(net: nn.Module) -> Callable:
    """TRAK's correct_probability_func: the probability of the label, one sample."""

    def probability(params, data):
        x, y = data
        logits = torch.func.functional_call(net, params, (x.unsqueeze(0),))[0]
        return (torch.softmax(logits, 0) * (torch.arange(logits.shape[0]) == y)).sum()

    return probability


def dattri_trak(models: int, prob: Problem) -> Scores:
    """TRAK on ``models`` models: the common run's, plus full-data runs from seeds TRAK_SEED + 1.. (their fits are part
    of its cost)."""
    from dattri.algorithm.trak import TRAKAttributor

    module, _ = prob.fit()  # the common run's final model (a plain fit: no recording)
    started = time.perf_counter()
    states = [copy.deepcopy(module.net.state_dict())]
    for seed in range(TRAK_SEED + 1, TRAK_SEED + models):
        states.append(copy.deepcopy(prob.fit(seed=seed, check=False)[0].net.state_dict()))
    net = copy.deepcopy(module.net)

    def attributor():
        task = dattri_task(net, states, loss=margin_of(net))
        return TRAKAttributor(task, probability_of(net), projector_kwargs={"proj_dim": TRAK_PROJ_DIM, "device": "cpu"})

    trak = attributor()
    trak.cache(batch_loader(*prob.train))
    scores = trak.attribute(batch_loader(*prob.test))
    seconds = time.perf_counter() - started
    own, own_s = timed(lambda: attributor().self_attribute(batch_loader(*prob.train)))
    return Scores(scores.double(), seconds, own.double().reshape(-1), own_s)


def dattri_if(prob: Problem) -> Scores:
    """The influence function at the final parameters, (H + λI)⁻¹ by conjugate gradient, H the Hessian of the mean
    training loss (all 1,000 samples in one batch: dattri sums the inverse-HVPs of separate batches); the query
    gradients are solved for IF_CHUNK at a time (200 at once, vmapped, ran the CNN out of memory)."""
    from dattri.algorithm.influence_function import IFAttributorCG

    module, _ = prob.fit()
    started = time.perf_counter()
    net = copy.deepcopy(module.net)
    attributor = IFAttributorCG(dattri_task(net, net.state_dict()), regularization=IF_DAMPING)
    attributor.cache(batch_loader(*prob.train))
    scores = attributor.attribute(batch_loader(*prob.train), batch_loader(*prob.test, size=IF_CHUNK))
    seconds = time.perf_counter() - started

    def own():  # self_attribute chunk by chunk: one CG solve for IF_CHUNK right-hand sides each
        parts = []
        for start in range(0, len(prob.train[0]), IF_CHUNK):
            chunk = Subset(TensorDataset(*prob.train), range(start, start + IF_CHUNK))
            parts.append(attributor.self_attribute(DataLoader(chunk, batch_size=IF_CHUNK)))
        return torch.cat(parts)

    own_scores, own_s = timed(own)
    return Scores(scores.double(), seconds, own_scores.double(), own_s)


def dattri_dvemb(prob: Problem) -> Scores:
    """Data value embeddings: the per-sample gradients of every step cached before the step (with the step's learning
    rate), then ``cache()``; no projection, no factorisation. Self-influence: the diagonal of its train × train
    scores."""
    from dattri.algorithm.dvemb import DVEmbAttributor

    class BeforeSteps(pl.Callback):
        def __init__(self) -> None:
            self.dvemb = None

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if self.dvemb is None:  # the module of this very fit: DVEmb reads its parameters at each step
                self.dvemb = DVEmbAttributor(dattri_task(module.net, module.net.state_dict()))
            x, y, ids = batch
            self.dvemb.cache_gradients(trainer.current_epoch, (x, y), ids, trainer.optimizers[0].param_groups[0]["lr"])

    hook = BeforeSteps()
    _, fit_s = prob.fit([hook])
    dvemb = hook.dvemb
    started = time.perf_counter()
    dvemb.cache()
    scores = dvemb.attribute(batch_loader(*prob.test))
    seconds = fit_s - prob.plain + time.perf_counter() - started
    own, own_s = timed(lambda: dvemb.attribute(batch_loader(*prob.train)).diagonal())
    return Scores(scores.double(), seconds, own.double().reshape(-1), own_s)


# ----------------------------------------------------------------------------- kronfluence
def kronfluence_task():
    from kronfluence.task import Task

    class Classification(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if sample:  # the true Fisher: labels drawn from the model's own predictions
                with torch.no_grad():
                    y = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            return F.cross_entropy(model(x), y, reduction="sum")

    return Classification()


def kronfluence_ekfac(prob: Problem) -> Scores:
    """EK-FAC influence at the final parameters (every Linear and Conv2d), damping by its heuristic (0.1 × the mean
    eigenvalue, ``damping_factor=None``). Pairwise scores [test × train] and self scores."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    module, _ = prob.fit()
    folder = tempfile.mkdtemp()
    try:
        started = time.perf_counter()
        task = kronfluence_task()
        model = prepare_model(copy.deepcopy(module.net), task)
        analyzer = Analyzer("lds", model, task, cpu=True, disable_tqdm=True, output_dir=folder)
        train, test = TensorDataset(*prob.train), TensorDataset(*prob.test)
        n = len(train)
        analyzer.fit_all_factors("ekfac", train, per_device_batch_size=n, factor_args=FactorArguments(strategy="ekfac"))
        score_args = ScoreArguments(damping_factor=None)
        analyzer.compute_pairwise_scores("pairwise", "ekfac", test, train, per_device_query_batch_size=NUM_TEST,
                                         per_device_train_batch_size=n, score_args=score_args)  # fmt: skip
        scores = analyzer.load_pairwise_scores("pairwise")["all_modules"]  # [test, train]
        seconds = time.perf_counter() - started
        started = time.perf_counter()
        analyzer.compute_self_scores("self", "ekfac", train, per_device_train_batch_size=n, score_args=score_args)
        own = analyzer.load_self_scores("self")["all_modules"]
        own_s = time.perf_counter() - started
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return Scores(scores.T.double(), seconds, own.double().reshape(-1), own_s)


def with_models(models: int) -> Callable[[Problem], Scores]:
    return lambda prob: dattri_trak(models, prob)


PEERS = {  # name: method
    "dattri TracIn": dattri_tracin,
    "dattri TRAK (1 model)": with_models(1),
    f"dattri TRAK ({TRAK_MODELS} models)": with_models(TRAK_MODELS),
    "dattri IF (CG)": dattri_if,
    "dattri DVEmb": dattri_dvemb,
    "kronfluence EK-FAC": kronfluence_ekfac,
}


# ----------------------------------------------------------------------------- the comparison
def attempt(method: Callable, prob: Problem):
    """The method's scores, or why it could not run."""
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):  # progress bars
            return method(prob)
    except ImportError as err:
        how = INSTALL.get((err.name or "").split(".")[0], "docs/peers.md")
        return f"not installed ({err.name or err}): {how}"
    except Exception as err:  # a peer that refuses: say why, go on
        return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"


def retrain(prob: Problem, masks: torch.Tensor) -> dict[str, torch.Tensor]:
    """The test examples' losses of the subset models [M, num_test], per variant."""
    weights = masks.to(torch.float64)
    num = len(masks)
    seeds = {"same-seed": [SEED] * num, "fresh-seed": [SEED + 1 + m for m in range(num)]}
    with contextlib.redirect_stderr(io.StringIO()):
        return {v: subset_query_losses(weights, s, prob.loader, prob.test, prob.make_module, prob.trainer)
                for v, s in seeds.items()}  # fmt: skip


def same_seed_check(prob: Problem) -> float:
    """How far a full-data subset model (every weight 1, the common seed) ends from the plain fit on the test losses:
    0 when the subset models' same-seed runs are the common run."""
    full = subset_query_losses(torch.ones(1, len(prob.train[0])), [SEED], prob.loader, prob.test, prob.make_module,
                               prob.trainer)[0]  # fmt: skip
    module = prob.make_module(SEED)
    module.net.load_state_dict(prob.reference)
    module.eval()
    with torch.no_grad():
        plain = module.per_sample_loss(prob.test).double()
    return float((full - plain).abs().max())


def times(ratio: float) -> str:
    return f"{ratio:.1f}" if ratio < 10 else f"{ratio:.0f}"


def row(name: str, scores: Scores, prob: Problem, masks: torch.Tensor, actual: dict) -> list[str]:
    if not torch.isfinite(scores.per_example).all():
        raise ValueError(f"{name}: non-finite or missing scores")
    cells = []
    predicted = predicted_changes(scores.per_example, masks)
    for variant in ("same-seed", "fresh-seed"):
        report = lds_from(predicted, actual[variant], 0.5, variant)
        cells.append(f"{report.mean:.3f} ± {report.stderr:.3f}")
    target = prob.flipped.long()
    own = "n/a" if scores.own is None else f"{float(binary_auroc(scores.own.float(), target)):.3f}"
    harm = float(binary_auroc(-scores.per_example.mean(1).float(), target))
    own_s = "n/a" if scores.own is None else f"{scores.own_seconds:.1f}"
    cells += [own, f"{harm:.3f}", f"{scores.seconds:.1f}", times(scores.seconds / prob.plain), own_s]
    return cells


def run_model(key: str, num_subsets: int, peers: dict) -> tuple[list, dict, Problem, dict]:
    prob = make_problem(key)
    masks = subset_masks(len(prob.train[0]), num_subsets, 0.5, seed=0)
    (actual, retrain_s) = timed(lambda: retrain(prob, masks))
    check = same_seed_check(prob)
    results: dict[str, Scores | str] = {}
    got = attempt(ours, prob)
    results.update(got if isinstance(got, dict) else {"ours": got})
    for peer, method in peers.items():
        results[peer] = attempt(method, prob)
    table, failures = [], {}
    for method, scores in results.items():
        if isinstance(scores, str):
            failures[method] = scores
            table.append([method] + ["n/a"] * 7)
            continue
        try:
            table.append([method] + row(method, scores, prob, masks, actual))
        except ValueError as err:
            failures[method] = str(err)
            table.append([method] + ["n/a"] * 7)
    notes = {m: s.note for m, s in results.items() if isinstance(s, Scores) and s.note}
    info = {"retrain_s": retrain_s, "check": check, "notes": notes, "num_subsets": num_subsets}
    return table, failures, prob, info


def print_model(table: list, failures: dict, prob: Problem, info: dict) -> None:
    params = sum(p.numel() for p in prob.make_module(SEED).net.parameters())
    print(f"\n### {prob.name} ({params} parameters, {prob.epochs} epochs)\n")
    print(f"Plain fit {prob.plain:.2f} s (the least of 3). {info['num_subsets']} subset models per variant, each"
          f" keeping half of the samples, retrained in {info['retrain_s']:.0f} s for both variants. Same-seed check: a"
          f" full-data subset model ends {info['check']:.1e} from the plain fit (max |Δ test loss|).\n")  # fmt: skip
    print("| method | LDS same-seed | LDS fresh-seed | AUROC self | AUROC harm | seconds | × plain fit |"
          " self-influence s |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for cells in table:
        print("| " + " | ".join(cells) + " |")
    for method, note in info["notes"].items():
        print(f"\n{method}: {note}.")
    if prob.final_losses is not None:
        baseline = float(binary_auroc(prob.final_losses.float(), prob.flipped.long()))
        print(f"\nBaseline without attribution: each sample's training loss at the end of the plain fit finds the"
              f" flipped labels with AUROC {baseline:.3f} (larger = flipped).")  # fmt: skip
    if failures:
        print("\nNot run (n/a above):\n")
        for method, why in failures.items():
            print(f"- {method}: {why}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--subsets", type=int, default=32, help="subset models per LDS variant")
    ap.add_argument("--quick", action="store_true", help="the MLP only, 8 subsets per variant")
    ap.add_argument("--models", nargs="*", default=list(ARCHS), choices=list(ARCHS), help="which models")
    args = ap.parse_args()
    subsets, models = (8, ["mlp"]) if args.quick else (args.subsets, args.models)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    logging.getLogger("kronfluence").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)  # every method alike, as benchmarks/peers.py
    started, load = time.perf_counter(), os.getloadavg()
    print(f"Load average at the start (1, 5, 15 min): {load[0]:.1f}, {load[1]:.1f}, {load[2]:.1f}", flush=True)
    outputs = []
    for key in models:
        outputs.append(run_model(key, subsets, PEERS))
        print(f"# done {ARCHS[key][0]} after {time.perf_counter() - started:.0f} s", flush=True)
    have = {d.metadata["Name"].lower(): d.version for d in metadata.distributions()}
    software = [f"Python {platform.python_version()}"] + [f"{p} {have.get(p, 'not installed')}" for p in PACKAGES]
    print(f"\n## LDS and flipped-label detection on digits ({torch.get_num_threads()} thread)\n")
    print(f"Software: {', '.join(software)}. Scores: [1000 train × {NUM_TEST} test], our sign (negative = harmful).")
    print("LDS: mean over the test examples ± bootstrap standard error over the subsets. AUROC self: from the"
          " self-influence (larger = flipped); AUROC harm: from the mean of a sample's scores (more negative ="
          " flipped). seconds: recording fit − plain fit + the score matrix; self-influence s: the self-influence"
          " alone, after that.")  # fmt: skip
    for output in outputs:
        print_model(*output)
    end = os.getloadavg()
    print(f"\nTotal runtime {time.perf_counter() - started:.0f} s; load average at the end (1, 5, 15 min):"
          f" {end[0]:.1f}, {end[1]:.1f}, {end[2]:.1f} (other jobs than this one count too).")  # fmt: skip


if __name__ == "__main__":
    main()
