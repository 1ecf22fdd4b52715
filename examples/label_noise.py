"""Label-noise detection: does the harmful end of the influence ranking find flipped labels?

Trains a small MLP (AdamW, no dropout or BatchNorm) on scikit-learn's digits (shipped with
scikit-learn, no download). 10% of the *training* labels are flipped to a different class; the
validation query and the test set stay clean. Two ``InfluenceTracker`` callbacks ride on the
same ``Trainer`` (one training run), with the same validation query and a DIT window per epoch:

- tracker A, estimator ``"acc"`` (accumulative, optimizer-aware; the package default);
- tracker B, estimator ``"tracin"`` (no propagation: the TracIn baseline).

Every training sample is tracked. Three rankings are compared on how well they put the flipped
samples at the harmful end (harmfulness = −score; the sign convention is score = f(θ_-j) − f(θ),
the predicted change of the validation loss if sample j were removed, so negative = harmful):

- ``acc, last window``: tracker A's scores over the last epoch only (the convergence period);
- ``acc, full run``: ``tracker.influence("val")``, the scores over the whole run;
- ``tracin, full run``: tracker B's scores.

Each ranking gets an AUROC (flipped = positive class) and its precision at 10% (the share of
flipped labels among the 10% most harmful samples; 10% of the labels are flipped, so this is also
the recall). Then the model is retrained from the *same initial weights* without a tracker,
after dropping 10% of the training set: flagged by each ranking, the truly flipped samples (an
oracle reference), or a random 10%; the clean test accuracy and loss before and after are
reported, with a model trained on the corrected labels as a further reference.

    python examples/label_noise.py                     # 3 seeds, about 1 minute on 2 idle CPU cores
    python examples/label_noise.py --quick             # smoke run, one seed, < 30 s
    python examples/label_noise.py --out docs/images   # where the figures go
    tensorboard --logdir label_noise_logs              # the */val/* and */val_tracin/* influence tags

Figures (in --out): label_noise_windows.png (window scores of flipped vs clean samples),
label_noise_scores.png (score distributions and ROC curves), label_noise_tensorboard.png (what
TensorBoard shows, read back from the event file of the first seed).
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import time
import warnings

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.functional.classification import binary_auroc, binary_roc

from lightning_influence import IndexedDataset, InfluenceTracker
from lightning_influence.testing import noisy_label_splits

RANKINGS = ("acc, last window", "acc, full run", "tracin, full run")


# --------------------------------------------------------------------------- data and model
def digits_splits(seed: int, n_train: int, n_val: int, flip_fraction: float) -> dict[str, torch.Tensor]:
    """Shuffle digits into train / val / test (the rest); flip ``flip_fraction`` of the training labels."""
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    return noisy_label_splits(x, torch.tensor(y, dtype=torch.long), n_train, n_val, flip_fraction, seed)


class DigitsMLP(pl.LightningModule):
    """64 → hidden → 10 with tanh; no dropout or BatchNorm (they couple samples or add randomness)."""

    def __init__(self, hidden: int = 32, lr: float = 3e-3, weight_decay: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))

    def per_sample_loss(self, batch) -> torch.Tensor:
        """Tensor[B] of per-sample losses; their mean is the training loss (the tracker checks it)."""
        x, y = batch[0], batch[1]
        return F.cross_entropy(self.net(x), y, reduction="none")

    def training_step(self, batch, batch_idx):
        loss = self.per_sample_loss(batch).mean()
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        logits = self.net(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


def train_loader(x: torch.Tensor, y: torch.Tensor, seed: int, batch_size: int) -> DataLoader:
    """Shuffled batches (x, y, ids); the generator seed fixes the batch order."""
    return DataLoader(
        IndexedDataset(TensorDataset(x, y)),
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )


def make_trainer(epochs: int, logger=False, callbacks=(), val_check: bool = True) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=list(callbacks),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=4,
        limit_val_batches=1.0 if val_check else 0,
    )


@torch.no_grad()
def evaluate(model: DigitsMLP, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) on (x, y)."""
    model.eval()
    logits = model.net(x)
    return float((logits.argmax(1) == y).float().mean()), float(F.cross_entropy(logits, y))


def retrain_test(init_state: dict, data: dict, keep: torch.Tensor, args, seed: int, labels: str = "y_tr"):
    """Train a fresh model from ``init_state`` on the kept training samples, no tracker: test (accuracy, loss)."""
    model = DigitsMLP(args.hidden, args.lr, args.weight_decay)
    model.load_state_dict(init_state)
    loader = train_loader(data["x_tr"][keep], data[labels][keep], seed, args.batch_size)
    make_trainer(args.epochs, val_check=False).fit(model, loader)
    return evaluate(model, data["x_te"], data["y_te"])


# --------------------------------------------------------------------------- ranking metrics
def ranking_metrics(scores: torch.Tensor, flipped: torch.Tensor) -> tuple[float, float]:
    """(AUROC, precision at 10%) of harmfulness = −score against the flipped mask."""
    harm = -scores.to(torch.float64)
    auroc = float(binary_auroc(harm, flipped.long()))
    top = torch.topk(harm, flag_count(len(scores))).indices
    return auroc, float(flipped[top].float().mean())


def flag_count(n: int) -> int:
    return int(round(0.10 * n))


def by_id(result_ids: torch.Tensor, scores: torch.Tensor, n: int) -> torch.Tensor:
    """Scores laid out by training id 0..n-1 (the tracker returns them in tracking order)."""
    out = torch.full((n,), float("nan"), dtype=torch.float64)
    out[result_ids] = scores.to(torch.float64)
    assert not torch.isnan(out).any(), "every training sample is tracked"
    return out


# --------------------------------------------------------------------------- one seed
def run_seed(seed: int, args) -> dict:
    t0 = time.perf_counter()
    pl.seed_everything(seed, verbose=False)
    data = digits_splits(seed, args.n_train, args.n_val, args.flip)
    n = args.n_train
    model = DigitsMLP(args.hidden, args.lr, args.weight_decay)
    init_state = {k: v.clone() for k, v in model.state_dict().items()}

    val_query = (data["x_va"], data["y_va"])  # clean validation set: f = its mean loss
    logger = TensorBoardLogger(args.logdir, name=f"seed{seed}")
    acc = InfluenceTracker(
        track=None,  # forward "acc" states for every sample (the default path would replay "first-order")
        queries={"val": val_query},
        window_every_n_epochs=1,
        log_top_k=10,
        dirpath=os.path.join(logger.log_dir, "influence_acc"),  # windows.jsonl, final_scores.json
    )
    # a second tracker on the same Trainer (one training run): the same validation set under its
    # own query name, so that its TensorBoard tags and files are told apart at a glance
    tracin = InfluenceTracker(
        queries={"val_tracin": val_query},
        estimator="tracin",
        window_every_n_epochs=1,
        dirpath=os.path.join(logger.log_dir, "influence_tracin"),
    )
    val_loader = DataLoader(TensorDataset(data["x_va"], data["y_va"]), batch_size=len(data["x_va"]))
    trainer = make_trainer(args.epochs, logger=logger, callbacks=[acc, tracin])
    trainer.fit(model, train_loader(data["x_tr"], data["y_tr"], seed, args.batch_size), val_loader)
    fit_seconds = time.perf_counter() - t0

    windows = acc.windows("val")
    full = acc.influence("val")
    tracin_result = tracin.influence("val_tracin")
    scores = {
        "acc, last window": by_id(windows[-1].sample_ids, windows[-1].scores, n),
        "acc, full run": by_id(full.sample_ids, full.scores, n),
        "tracin, full run": by_id(tracin_result.sample_ids, tracin_result.scores, n),
    }
    # the windows telescope to the full-run score ([concepts.md: Time windows]): a cheap consistency check
    summed = by_id(windows[0].sample_ids, torch.stack([w.scores for w in windows]).sum(0), n)
    telescope_err = float((summed - scores["acc, full run"]).abs().max() / scores["acc, full run"].abs().max())

    flipped = data["flipped"]
    metrics = {name: ranking_metrics(s, flipped) for name, s in scores.items()}
    # diagnostic, not a harmfulness ranking: does the *size* of the last window's score single out
    # the flipped samples, whatever its sign?
    metrics["acc, last window, |score|"] = ranking_metrics(-scores["acc, last window"].abs(), flipped)
    # the classic mislabel detector: each sample's influence on its own loss, largest first (no query needed)
    own = acc.self_influence()
    metrics["acc, self-influence"] = ranking_metrics(-by_id(own.sample_ids, own.scores, n), flipped)

    # retrain from the same initial weights, without a tracker, after dropping 10% of the training set
    k = flag_count(n)
    test_before = evaluate(model, data["x_te"], data["y_te"])
    drops = {name: torch.topk(-s, k).indices for name, s in scores.items()}
    drops["truly flipped (oracle)"] = flipped.nonzero().squeeze(1)
    drops["random 10%"] = torch.randperm(n, generator=torch.Generator().manual_seed(10_000 + seed))[:k]
    test_after = {}
    for name, ids in drops.items():
        keep = torch.ones(n, dtype=torch.bool)
        keep[ids] = False
        test_after[name] = retrain_test(init_state, data, keep, args, seed)
    # the trackers only observe: retraining on the same data without them gives the same model
    same = retrain_test(init_state, data, torch.ones(n, dtype=torch.bool), args, seed)
    retrain_diff = max(abs(same[0] - test_before[0]), abs(same[1] - test_before[1]))
    # reference: every label corrected, nothing dropped (the batches are then the tracked run's batches)
    test_after["labels corrected (reference)"] = retrain_test(
        init_state, data, torch.ones(n, dtype=torch.bool), args, seed, labels="y_tr_clean"
    )

    window_matrix = {
        "acc": torch.stack([by_id(w.sample_ids, w.scores, n) for w in windows]),
        "tracin": torch.stack([by_id(w.sample_ids, w.scores, n) for w in tracin.windows("val_tracin")]),
    }
    patterns = acc.patterns("val")
    pattern_of = patterns.as_dict()
    return {
        "seed": seed,
        "data": data,
        "scores": scores,
        "metrics": metrics,
        "test_before": test_before,
        "test_after": test_after,
        "window_matrix": window_matrix,
        "window_epochs": [w.epoch for w in windows],
        "window_end_steps": [w.end_step for w in windows],
        "patterns": {
            group: _count([pattern_of[j] for j in range(n) if bool(flipped[j]) == is_flipped])
            for group, is_flipped in (("flipped", True), ("clean", False))
        },
        "log_dir": logger.log_dir,
        "telescope_err": telescope_err,
        "retrain_diff": retrain_diff,
        "fit_seconds": fit_seconds,
        "seconds": time.perf_counter() - t0,
    }


def _count(labels: list[str]) -> dict[str, int]:
    out = dict.fromkeys(("stable", "early", "late", "fluctuating"), 0)
    for label in labels:
        out[label] += 1
    return out


# --------------------------------------------------------------------------- printing
def mean_sd(values: list[float], signed: bool = False) -> str:
    v = np.asarray(values, dtype=float)
    m = f"{v.mean():+.3f}" if signed else f"{v.mean():.3f}"
    return m if len(v) == 1 else f"{m} ± {v.std(ddof=1):.3f}"


def print_most_harmful(run: dict, top: int) -> None:
    data, s = run["data"], run["scores"]["acc, full run"]
    hits = int(data["flipped"][torch.argsort(s)[:top]].sum())
    print(
        f"\nSeed {run['seed']}: {top} most harmful training samples, acc full run"
        " (score = predicted Δ val loss if removed; negative = harmful)"
    )
    print(f"{'id':>6} {'label':>6} {'true':>5} {'flipped':>8} {'score':>11} {'last-window':>12} {'tracin':>11}")
    for j in torch.argsort(s)[:top].tolist():
        print(
            f"{j:>6} {int(data['y_tr'][j]):>6} {int(data['y_tr_clean'][j]):>5}"
            f" {'yes' if data['flipped'][j] else '':>8} {float(s[j]):>11.3e}"
            f" {float(run['scores']['acc, last window'][j]):>12.3e}"
            f" {float(run['scores']['tracin, full run'][j]):>11.3e}"
        )
    print(f"{hits} of these {top} have a flipped label.")


def print_tables(runs: list[dict], args) -> None:
    seeds = ", ".join(str(r["seed"]) for r in runs)
    n_flip = int(runs[0]["data"]["flipped"].sum())
    print(f"\n=== Ranking the flipped labels as harmful (harmfulness = −score); seeds {seeds}; mean ± sd ===")
    print(
        f"{n_flip} of {args.n_train} training labels flipped; precision at 10% = flipped share of the"
        f" {flag_count(args.n_train)} most harmful"
    )
    print(f"{'ranking':<26} {'AUROC':>15} {'precision@10%':>15}")
    for name in RANKINGS:
        au = [r["metrics"][name][0] for r in runs]
        pr = [r["metrics"][name][1] for r in runs]
        print(f"{name:<26} {mean_sd(au):>15} {mean_sd(pr):>15}")
    name = "acc, last window, |score|"
    au = [r["metrics"][name][0] for r in runs]
    pr = [r["metrics"][name][1] for r in runs]
    print(f"{name:<26} {mean_sd(au):>15} {mean_sd(pr):>15}   (diagnostic: ranks by size, ignores the sign)")
    name = "acc, self-influence"
    au = [r["metrics"][name][0] for r in runs]
    pr = [r["metrics"][name][1] for r in runs]
    print(f"{name:<26} {mean_sd(au):>15} {mean_sd(pr):>15}   (own loss, largest first: needs no query)")
    print("(chance: AUROC 0.500, precision@10% 0.100)")

    n_test = len(runs[0]["data"]["y_te"])
    print(
        f"\n=== Clean test set ({n_test} samples): retrained from the same initial weights, no tracker;"
        f" seeds {seeds}; mean ± sd ==="
    )
    print(f"{'training set':<38} {'test accuracy':>15} {'Δ accuracy':>15} {'test loss':>15} {'Δ loss':>15}")
    before_acc = [r["test_before"][0] for r in runs]
    before_loss = [r["test_before"][1] for r in runs]
    label = f"all {args.n_train} ({args.flip:.0%} flipped)"
    print(f"{label:<38} {mean_sd(before_acc):>15} {'':>15} {mean_sd(before_loss):>15} {'':>15}")
    for name in (*RANKINGS, "random 10%", "truly flipped (oracle)", "labels corrected (reference)"):
        acc = [r["test_after"][name][0] for r in runs]
        loss = [r["test_after"][name][1] for r in runs]
        d_acc = [a - b for a, b in zip(acc, before_acc)]
        d_loss = [a - b for a, b in zip(loss, before_loss)]
        if name in RANKINGS:
            label = f"− 10% flagged by {name}"
        else:
            label = name if name.startswith("labels") else f"− {name}"
        print(
            f"{label:<38} {mean_sd(acc):>15} {mean_sd(d_acc, signed=True):>15} {mean_sd(loss):>15}"
            f" {mean_sd(d_loss, signed=True):>15}"
        )
    print(
        "(the first row is the tracked model itself; retraining it without the trackers gives the same test"
        f" accuracy and loss up to {max(r['retrain_diff'] for r in runs):.1e})"
    )

    print("\n=== Per seed ===")
    head = " ".join(f"{'AUROC ' + short:>17}" for short in ("acc last", "acc full", "tracin"))
    print(f"{'seed':>4} {head} {'test all':>9} {'−acc full':>10} {'−oracle':>8} {'fit s':>6} {'seed s':>7}")
    for r in runs:
        aus = " ".join(f"{r['metrics'][n][0]:>17.3f}" for n in RANKINGS)
        print(
            f"{r['seed']:>4} {aus} {r['test_before'][0]:>9.3f} {r['test_after']['acc, full run'][0]:>10.3f}"
            f" {r['test_after']['truly flipped (oracle)'][0]:>8.3f} {r['fit_seconds']:>6.1f} {r['seconds']:>7.1f}"
        )

    print(f"\n=== AUROC of each epoch window alone, and of the running sum up to it; seeds {seeds}; mean ===")
    print(f"{'epoch':>5} {'acc window':>11} {'acc cumul.':>11} {'tracin window':>14} {'tracin cumul.':>14}")
    for w in range(len(runs[0]["window_epochs"])):
        cells = []
        for key in ("acc", "tracin"):
            for cumulative in (False, True):
                vals = []
                for r in runs:
                    mat = r["window_matrix"][key]
                    s = mat[: w + 1].sum(0) if cumulative else mat[w]
                    vals.append(float(binary_auroc(-s, r["data"]["flipped"].long())))
                cells.append(float(np.mean(vals)))
        epoch = runs[0]["window_epochs"][w] + 1
        print(f"{epoch:>5} {cells[0]:>11.3f} {cells[1]:>11.3f} {cells[2]:>14.3f} {cells[3]:>14.3f}")

    print("\n=== Influence-dynamics patterns of tracker A (acc) on 'val', summed over seeds ===")
    print(f"{'group':<8} " + " ".join(f"{p:>12}" for p in ("stable", "early", "late", "fluctuating")))
    for group in ("flipped", "clean"):
        counts = {p: sum(r["patterns"][group][p] for r in runs) for p in ("stable", "early", "late", "fluctuating")}
        print(f"{group:<8} " + " ".join(f"{counts[p]:>12}" for p in counts))
    worst = max(r["telescope_err"] for r in runs)
    print(f"\nWindows telescope to the full-run scores: max relative difference {worst:.1e}.")


# --------------------------------------------------------------------------- figures
def plot_windows(run: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    flipped = run["data"]["flipped"]
    epochs = np.asarray(run["window_epochs"]) + 1
    w = run["window_matrix"]["acc"].numpy()
    cum = np.cumsum(w, axis=0)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, mat, title in ((axes[0], w, "window score (one epoch each)"), (axes[1], cum, "cumulative score")):
        for mask, color, label in ((flipped.numpy(), "tab:red", "flipped"), (~flipped.numpy(), "tab:blue", "clean")):
            sub = mat[:, mask]
            lo, med, hi = np.percentile(sub, [25, 50, 75], axis=1)
            ax.plot(epochs, sub.mean(1), color=color, marker="o", ms=3, label=f"{label}: mean")
            ax.plot(epochs, med, color=color, ls=":", label=f"{label}: median")
            ax.fill_between(epochs, lo, hi, color=color, alpha=0.2, label=f"{label}: 25–75%")
        ax.axhline(0, color="0.5", lw=0.8)
        ax.set_xlabel("epoch (window)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("score (− harmful, + helpful)")
        ax.set_title(f"acc, {title}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    ax = axes[2]
    for key, color in (("acc", "tab:green"), ("tracin", "tab:purple")):
        mat = run["window_matrix"][key]
        per = [float(binary_auroc(-mat[i], flipped.long())) for i in range(mat.shape[0])]
        cumu = [float(binary_auroc(-mat[: i + 1].sum(0), flipped.long())) for i in range(mat.shape[0])]
        ax.plot(epochs, per, color=color, marker="o", ms=3, label=f"{key}: this window only")
        ax.plot(epochs, cumu, color=color, ls="--", label=f"{key}: cumulative (= full run at the end)")
    ax.axhline(0.5, color="0.5", lw=0.8)
    ax.set_ylim(0.4, 1.0)
    ax.set_xlabel("epoch (window)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("AUROC, flipped vs clean")
    ax.set_title("how well each window finds the flipped labels")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.suptitle(f"Label noise on digits, seed {run['seed']}: influence on the clean validation loss, per epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_scores(run: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    flipped = run["data"]["flipped"]
    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    for ax, name in zip(axes[:3], RANKINGS):
        harm = -run["scores"][name].numpy()
        lo, hi = np.percentile(harm, [0.5, 99.5])
        bins = np.linspace(lo, hi, 50)
        for mask, color, label in ((~flipped.numpy(), "tab:blue", "clean"), (flipped.numpy(), "tab:red", "flipped")):
            ax.hist(np.clip(harm[mask], lo, hi), bins=bins, alpha=0.6, color=color, label=label, density=True)
        cut = np.sort(harm)[-flag_count(len(harm))]
        ax.axvline(cut, color="k", ls="--", lw=1, label="top-10% cut")
        auroc, prec = run["metrics"][name]
        ax.set_title(f"{name}\nAUROC {auroc:.3f}, precision@10% {prec:.2f}")
        ax.set_xlabel("harmfulness = −score (clipped to 0.5–99.5%)")
        ax.set_yticks([])
        ax.legend(fontsize="small")
    ax = axes[3]
    for name, color in zip(RANKINGS, ("tab:orange", "tab:green", "tab:purple")):
        fpr, tpr, _ = binary_roc(-run["scores"][name], flipped.long())
        ax.plot(fpr.numpy(), tpr.numpy(), color=color, label=f"{name} ({run['metrics'][name][0]:.3f})")
    ax.plot([0, 1], [0, 1], color="0.6", lw=0.8)
    ax.set_xlabel("false positive rate (clean flagged)")
    ax.set_ylabel("true positive rate (flipped flagged)")
    ax.set_title("ROC, flipped = positive")
    ax.legend(fontsize="small", loc="lower right")
    ax.grid(alpha=0.3)
    fig.suptitle(f"Score distributions of flipped vs clean training samples, seed {run['seed']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_tensorboard(log_dir: str, path: str, root: str) -> str | None:
    """A headless picture of what TensorBoard shows for the run in ``log_dir``: the <namespace>/val/*
    scalars, the window_scores histograms (TensorBoard's offset view) and the last
    strongest_over_windows image, all read back from the event file. Returns the last top_samples text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(log_dir, size_guidance={"scalars": 0, "images": 0, "histograms": 0, "tensors": 0})
    ea.Reload()
    tags = ea.Tags()

    def find(kind: str, suffix: str) -> str | None:
        """The tag ending in ``suffix``: with several trackers on one Trainer each tracker's tags get
        their own first part (``influence_0/``, ``influence_1/``, ...), so match on the rest."""
        hits = sorted(t for t in tags[kind] if t == suffix or t.endswith("/" + suffix))
        return hits[0] if hits else None

    names = ("helpful_mass", "harmful_mass", "num_harmful", "strongest")
    scalar_tags = [find("scalars", f"val/{name}") for name in names]
    scalar_tags += [find("scalars", "val_tracin/harmful_mass"), find("scalars", "val_loss")]
    scalar_tags = [t for t in scalar_tags if t is not None]
    print(f"\nTensorBoard tags in {log_dir}:")
    for kind in ("scalars", "histograms", "images", "tensors"):
        print(f"  {kind:<10} " + ", ".join(tags[kind]))
    # the influence scalars of the acc tracker, as TensorBoard's SCALARS tab plots them
    shown = [t for t in scalar_tags if "/val/" in t]
    if shown:
        series = {t: {e.step: e.value for e in ea.Scalars(t)} for t in shown}
        print(f"\n{'step':>5} " + " ".join(f"{t.rsplit('/', 1)[1]:>13}" for t in shown))
        for step in sorted(series[shown[0]]):
            print(f"{step:>5} " + " ".join(f"{series[t].get(step, float('nan')):>13.4g}" for t in shown))

    fig = plt.figure(figsize=(19, 7.4), facecolor="#f5f5f5")
    grid = fig.add_gridspec(
        2, 5, width_ratios=[1, 1, 1, 1.2, 2.9], hspace=0.45, wspace=0.38, left=0.04, right=0.99, top=0.86, bottom=0.08
    )
    fig.text(0.01, 0.975, "TensorBoard", fontsize=15, weight="bold", color="#e65100", va="top")
    fig.text(
        0.105, 0.968, "SCALARS    IMAGES    DISTRIBUTIONS    HISTOGRAMS    TEXT", fontsize=10, color="#555", va="top"
    )
    run_name = os.path.relpath(log_dir, os.path.dirname(os.path.abspath(root)))
    fig.text(
        0.99,
        0.968,
        f"run: {run_name}   (read back from the event file)",
        fontsize=9,
        color="#555",
        va="top",
        ha="right",
    )
    for i, tag in enumerate(scalar_tags):
        ax = fig.add_subplot(grid[i // 3, i % 3])
        events = ea.Scalars(tag)
        ax.plot([e.step for e in events], [e.value for e in events], color="#f57c00", marker="o", ms=2.5, lw=1.3)
        ax.set_title(tag, fontsize=9, loc="left")
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    # HISTOGRAMS tab, offset view: one curve per window (later windows higher and darker). The
    # logged buckets are re-binned onto one even grid so that the curves can be compared.
    ax = fig.add_subplot(grid[:, 3])
    tag = find("histograms", "val/window_scores")
    hists = ea.Histograms(tag) if tag else []
    if hists:
        lo = min(h.histogram_value.min for h in hists)
        hi = max(h.histogram_value.max for h in hists)
        edges = np.linspace(lo, hi, 61)
        unit = 10.0 ** np.floor(np.log10(max(abs(lo), abs(hi), 1e-300)))
        centers = (edges[:-1] + edges[1:]) / 2 / unit
        for i, h in enumerate(hists):
            limits = np.asarray(h.histogram_value.bucket_limit)
            lower = np.concatenate([[h.histogram_value.min], limits[:-1]])
            mid = np.clip((lower + limits) / 2, h.histogram_value.min, h.histogram_value.max)
            counts, _ = np.histogram(mid, bins=edges, weights=np.asarray(h.histogram_value.bucket))
            offset = 0.5 * i
            color = plt.cm.Oranges(0.3 + 0.7 * i / max(1, len(hists) - 1))
            ax.fill_between(
                centers,
                offset,
                offset + counts / max(counts.max(), 1),
                color=color,
                alpha=0.9,
                lw=0.6,
                edgecolor="#8d4004",
                zorder=len(hists) - i,
            )
        every = max(1, len(hists) // 8)
        ax.set_yticks([0.5 * i for i in range(len(hists))][::every])
        ax.set_yticklabels([str(h.step) for h in hists][::every], fontsize=7)
        ax.set_xlabel(f"window score / {unit:.0e} (− harmful, + helpful)", fontsize=8)
    ax.set_title(f"{tag}\n(HISTOGRAMS, offset; one per window)", fontsize=9, loc="left")
    ax.set_ylabel("step (window end)", fontsize=8)
    ax.tick_params(labelsize=7)
    # IMAGES tab: the last strongest_over_windows image the tracker logged, decoded from the PNG
    ax = fig.add_subplot(grid[:, 4])
    tag = find("images", "val/strongest_over_windows")
    images = ea.Images(tag) if tag else []
    if images:
        last = images[-1]
        ax.imshow(mpimg.imread(io.BytesIO(last.encoded_image_string), format="png"))
        ax.set_title(f"{tag}\n(IMAGES, step {last.step} of {images[0].step}..{last.step})", fontsize=9, loc="left")
    ax.axis("off")
    fig.savefig(path, dpi=85, facecolor=fig.get_facecolor())
    plt.close(fig)

    text_tag = find("tensors", "val/top_samples/text_summary")
    if text_tag:
        last = ea.Tensors(text_tag)[-1]
        lines = last.tensor_proto.string_val[0].decode().splitlines()
        # keep the heading and the first 5 rows of each table
        return "\n".join(
            line
            for line in lines
            if not (line.startswith("| ") and line.split("|")[1].strip().isdigit() and int(line.split("|")[1]) > 5)
        )
    return None


# --------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds: --seed, --seed+1, ...")
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--n-val", type=int, default=300, help="the rest of the 1797 digits is the test set")
    parser.add_argument("--flip", type=float, default=0.10, help="fraction of training labels flipped")
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--top", type=int, default=15, help="how many most harmful ids to print")
    parser.add_argument("--logdir", default="label_noise_logs")
    parser.add_argument("--out", default="label_noise_out", help="directory for the figures")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 8 epochs, 500 training samples")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.epochs, args.n_train = 1, 8, 500

    # keep the output to the tables: Lightning's banners and the tracker's cost notes go to the log
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning_influence").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    warnings.filterwarnings("ignore", ".*no `val_dataloader`.*")
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    start = time.perf_counter()
    print(
        f"label_noise: digits, {args.n_train} train / {args.n_val} val / rest test, {args.flip:.0%} of training"
        f" labels flipped, MLP 64-{args.hidden}-10 (AdamW lr {args.lr}, wd {args.weight_decay}),"
        f" {args.epochs} epochs, batch {args.batch_size}, seeds {args.seed}..{args.seed + args.seeds - 1}"
    )
    runs = []
    for seed in range(args.seed, args.seed + args.seeds):
        run = run_seed(seed, args)
        runs.append(run)
        m = run["metrics"]
        print(
            f"seed {seed}: AUROC last-window {m[RANKINGS[0]][0]:.3f}, full-run {m[RANKINGS[1]][0]:.3f},"
            f" tracin {m[RANKINGS[2]][0]:.3f}; fit with 2 trackers {run['fit_seconds']:.1f} s,"
            f" seed total {run['seconds']:.1f} s; TensorBoard: {run['log_dir']}"
        )
    print_most_harmful(runs[0], args.top)
    print_tables(runs, args)

    os.makedirs(args.out, exist_ok=True)
    written = [os.path.join(args.out, f"label_noise_{name}.png") for name in ("windows", "scores", "tensorboard")]
    plot_windows(runs[0], written[0])
    plot_scores(runs[0], written[1])
    text = plot_tensorboard(runs[0]["log_dir"], written[2], args.logdir)
    if text:
        print(f"\n=== TensorBoard TEXT .../val/top_samples, last window, seed {runs[0]['seed']} ===\n{text}")
    print(f"\nFigures: {', '.join(written)}")
    print(f"TensorBoard: tensorboard --logdir {args.logdir}")
    print(f"Total time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
