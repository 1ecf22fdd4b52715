"""Measured agreement of the tracker with ground truth, for the models people train (float64, CPU).

Every number follows the method of the tests (tests/estimators/test_random_draws.py, test_batch_norm.py,
test_recurrent.py, tests/optimizers/test_more_optimizers_end_to_end.py): the model trains through a Lightning
``Trainer`` from ``seeded_fit`` (``pl.seed_everything(11)``), so runs with per-sample weights w_j draw the dropout
masks of the tracked run and move the BatchNorm running buffers as it does; the query loss is read in eval mode
(``eval_query_loss``), as Lightning validates.

- Table 1: ``estimator="first-order"`` against central finite differences of the same seeded run,
  ``−(f(w_j = 1 + ε) − f(w_j = 1 − ε)) / 2ε`` (ε = 1e-5 for SGD with momentum, 1e-6 for the Adam-type and adaptive
  optimizers): the maximum over the probe samples of ``|s_j − d_j| / |d_j|`` (and of ``|s_j − d_j|``, with the
  smallest ``|d_j|``, which a relative error divides by).
- Table 2: ``estimator="exact"`` against the retrained run with w_j = 0: ``f(w_j = 0) − f``, same error.
- Table 3: the replay of a recorded run (``record_trajectory=True``, then ``load_trajectory(...).influence(...)``)
  against the forward ``"first-order"`` scores of Table 1: maximum absolute and relative difference.

The tests assert ≤ 1e-4 (Table 1), ≤ 1e-6 (Table 2) and rtol 1e-6 (Table 3). A cell "refused" is a configuration the
tracker refuses with an ``InfluenceError``, "fails" one where it raises another error (the messages are printed
under the tables). Times are seconds per row.

Run:  python benchmarks/ground_truth.py            (every other sample and the tests' probes; about 2–3 minutes on
                                                   2 CPU cores)
      python benchmarks/ground_truth.py --quick    (the tests' 3 probes per model; about a minute)
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from lightning_influence import InfluenceError, InfluenceTracker, load_trajectory
from lightning_influence.testing import (
    OptimizerFactory,
    TinyClassifier,
    eval_query_loss,
    random_classification,
    random_schedule,
    seeded_fit,
)

N, D, C = 16, 4, 3
DRAWS_SCHEDULE = [[[3, 7, 1, 12, 0, 9, 14, 5], [2, 10, 4, 15, 6, 11, 8, 13]]] * 2  # 2 epochs of 2 batches
T, V = 5, 10  # recurrent models: sequence length, vocabulary
REFUSALS: dict[str, list[str]] = {}  # message -> the cells it refused


# ----------------------------------------------------------------------------- the models of the tests
def dropout_mlp() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(D, 12), nn.Tanh(), nn.Dropout(0.4), nn.Linear(12, C)).double()


class Encoder(nn.Module):
    """A transformer encoder layer with its default dropout (0.1) over D tokens of width 1 → 8; ``attention_dropout``
    False sets the attention's dropout and the residual dropouts after it to 0, keeping the feed-forward dropout (the
    fix the tracker's refusal of exact and replay names)."""

    def __init__(self, attention_dropout: bool = True) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.embed = nn.Linear(1, 8)
        self.layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True)
        self.head = nn.Linear(8, C)
        if not attention_dropout:
            self.layer.self_attn.dropout = 0.0
            self.layer.dropout1.p = self.layer.dropout2.p = 0.0
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(self.embed(x.unsqueeze(-1))).mean(dim=1))


def bn_mlp() -> nn.Module:
    """No bias before a BatchNorm: in train mode its gradient is exactly 0 up to rounding (~1e-17), which Adam
    divides by √v + ε ≈ 1e-8, so the finite-difference runs would differ by amplified rounding."""
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Linear(D, 12, bias=False), nn.BatchNorm1d(12), nn.Tanh(), nn.Dropout(0.3), nn.Linear(12, C)
    ).double()


class BatchNormCNN(nn.Module):
    """Conv (no bias) → BatchNorm2d → tanh → pooled → dropout → Linear, on the D features seen as a 2 × 2 image."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(1, 4, kernel_size=2, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(4, momentum=0.3)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(4, C)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.norm(self.conv(x.view(-1, 1, 2, 2))))
        return self.head(self.drop(h.mean(dim=(2, 3))))


class Recurrent(nn.Module):
    """Tokens → embedding → LSTM or GRU → the last state → logits."""

    def __init__(self, cell: type[nn.RNNBase]) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.embed, self.rnn, self.head = nn.Embedding(V, 4), cell(4, 6, batch_first=True), nn.Linear(6, C)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.embed(x))[0][:, -1])


def tanh_mlp() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, C)).double()


# ----------------------------------------------------------------------------- optimizers and cases
def momentum(lr: float) -> OptimizerFactory:
    return lambda m: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9)


def adamw(m: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(m.parameters(), lr=0.02, weight_decay=0.1)


def two_groups(opt_cls, first: dict, rest: dict, **common) -> OptimizerFactory:
    """The first layer in one param group, the rest in another (as tests/optimizers does)."""
    return lambda m: opt_cls([{"params": m[0].parameters(), **first}, {"params": m[2].parameters(), **rest}], **common)


ADAPTIVE = {
    "RMSprop (wd)": two_groups(torch.optim.RMSprop, {"weight_decay": 0.05}, {"alpha": 0.9}, lr=0.01),
    "RMSprop centered, momentum": two_groups(
        torch.optim.RMSprop, {"momentum": 0.8}, {"weight_decay": 0.05}, lr=0.005, centered=True, momentum=0.5
    ),
    "Adagrad (lr decay, wd)": two_groups(
        torch.optim.Adagrad, {"lr_decay": 0.05}, {"weight_decay": 0.05}, lr=0.1, initial_accumulator_value=0.1
    ),
    "Adamax": two_groups(torch.optim.Adamax, {"weight_decay": 0.05}, {"betas": (0.8, 0.95)}, lr=0.05),
    "Adam amsgrad": two_groups(torch.optim.Adam, {"weight_decay": 0.05}, {}, lr=0.03, amsgrad=True),
    "AdamW amsgrad": two_groups(
        torch.optim.AdamW, {"weight_decay": 0.1}, {"weight_decay": 0.0}, lr=0.03, amsgrad=True, betas=(0.8, 0.9)
    ),
    "NAdam (decoupled wd)": two_groups(
        torch.optim.NAdam, {"weight_decay": 0.05}, {"weight_decay": 0.1, "decoupled_weight_decay": True}, lr=0.03
    ),
    "RAdam (decoupled wd)": two_groups(
        torch.optim.RAdam, {"weight_decay": 0.05, "decoupled_weight_decay": True}, {}, lr=0.03, betas=(0.9, 0.9)
    ),
}


@dataclass(frozen=True)
class Case:
    model: str
    optimizer: str
    net: Callable[[], nn.Module]  # a fresh copy of the same initial weights each call
    make_opt: OptimizerFactory
    eps: float
    data: tuple  # (x, y, query)
    schedule: list
    probes: tuple[int, ...]


def token_data() -> tuple:
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(0, V, (12 + 4, T), generator=gen)
    y = torch.randint(0, C, (12 + 4,), generator=gen)
    return x[:12], y[:12], (x[12:], y[12:])


def cases(more_probes: bool) -> list[Case]:
    """The tests' models and optimizers; ``more_probes``: every other training sample is a probe too."""
    draws = (random_classification(N, D, C), DRAWS_SCHEDULE, (1, 6, 13))
    recurrent = (token_data(), [[[4, 0, 9, 2, 7, 11], [1, 3, 5, 6, 8, 10]]] * 2, (0, 5, 8))
    adaptive = (random_classification(N, 3, C, seed=7), random_schedule(N, 4, 2, seed=1), (0, 7, 13))
    families = [
        ("dropout MLP", dropout_mlp, draws, 0.2),
        ("transformer layer (dropout 0.1)", Encoder, draws, 0.2),
        ("transformer layer, attention + residual dropout 0", lambda: Encoder(attention_dropout=False), draws, 0.2),
        ("BatchNorm1d + dropout MLP", bn_mlp, draws, 0.2),
        ("BatchNorm2d + dropout CNN", BatchNormCNN, draws, 0.2),
        ("LSTM", lambda: Recurrent(nn.LSTM), recurrent, 0.3),
        ("GRU", lambda: Recurrent(nn.GRU), recurrent, 0.3),
    ]
    out = []
    for model, net, (data, schedule, probes), lr in families:
        out.append(Case(model, "SGD momentum 0.9", net, momentum(lr), 1e-5, data, schedule, probes))
        out.append(Case(model, "AdamW (wd 0.1)", net, adamw, 1e-6, data, schedule, probes))
    data, schedule, probes = adaptive
    out += [Case("tanh MLP", name, tanh_mlp, make, 1e-6, data, schedule, probes) for name, make in ADAPTIVE.items()]
    if more_probes:
        out = [Case(**{**c.__dict__, "probes": tuple(sorted({*c.probes, *range(0, len(c.data[0]), 2)}))}) for c in out]
    return out


# ----------------------------------------------------------------------------- the measurements
def fit(case: Case, weights: torch.Tensor | None = None, tracker: InfluenceTracker | None = None) -> TinyClassifier:
    x, y, _ = case.data
    return seeded_fit(case.net(), case.make_opt, x, y, case.schedule, weights, [tracker] if tracker else [])


def query_loss(case: Case, j: int, w_j: float) -> float:
    """The query loss of the seeded run with sample j weighted by ``w_j``."""
    weights = torch.ones(len(case.data[0]), dtype=torch.float64)
    weights[j] = w_j
    return eval_query_loss(fit(case, weights), case.data[2])


def scores_at(result, ids: Sequence[int]) -> torch.Tensor:
    """The scores of ``ids``, in that order, from an ``InfluenceResult``."""
    rows = [int((result.sample_ids == j).nonzero()) for j in ids]
    return result.scores[rows]


def errors(got: torch.Tensor, truth: torch.Tensor) -> list[str]:
    """The largest relative error ``|got − truth| / |truth|`` and the largest absolute error, formatted."""
    diff = (got - truth).abs()
    return [f"{float((diff / truth.abs()).max()):.1e}", f"{float(diff.max()):.1e}", f"{float(truth.abs().min()):.1e}"]


def failed(case: Case, table: int, err: Exception) -> str:
    """A refusal (``InfluenceError``) or a crash: the cell names it, the message is printed under the tables."""
    word = "refused" if isinstance(err, InfluenceError) else f"fails ({type(err).__name__})"
    REFUSALS.setdefault(str(err).strip().split("\n")[0], []).append(f"Table {table} {case.model}, {case.optimizer}")
    return word


def first_order(case: Case) -> tuple[list[str], torch.Tensor]:
    """Table 1: the forward first-order scores against central finite differences of the same seeded run."""
    tracker = InfluenceTracker(track=list(case.probes), estimator="first-order", queries={"q": case.data[2]})
    fit(case, tracker=tracker)
    got = scores_at(tracker.influence("q"), case.probes)
    eps = case.eps
    truth = [-(query_loss(case, j, 1 + eps) - query_loss(case, j, 1 - eps)) / (2 * eps) for j in case.probes]
    return errors(got, torch.tensor(truth, dtype=torch.float64)), got


def exact(case: Case) -> list[str]:
    """Table 2: the exact estimator against the retrained run without the sample (w_j = 0)."""
    tracker = InfluenceTracker(track=list(case.probes), estimator="exact", queries={"q": case.data[2]})
    try:
        base = eval_query_loss(fit(case, tracker=tracker), case.data[2])
        got = scores_at(tracker.influence("q"), case.probes)
    except Exception as err:  # noqa: BLE001 (reported in the table)
        return [failed(case, 2, err), "-", "-"]
    truth = torch.tensor([query_loss(case, j, 0.0) - base for j in case.probes], dtype=torch.float64)
    return errors(got, truth)


def replay(case: Case, forward: torch.Tensor) -> tuple[str, str]:
    """Table 3: the replay of a recorded run against the forward first-order scores (max abs, max relative)."""
    x, y, query = case.data
    with tempfile.TemporaryDirectory() as tmp:
        recorder = InfluenceTracker(track=(), record_trajectory=True, dirpath=tmp, queries={"q": query})
        try:
            fitted = fit(case, tracker=recorder)
            trajectory = load_trajectory(recorder.dirpath / "trajectory")
            result = trajectory.influence(fitted.train(), list(zip(x, y)), query, progress=False)
        except Exception as err:  # noqa: BLE001 (reported in the table)
            return failed(case, 3, err), "-"
    diff = (scores_at(result, case.probes) - forward).abs()
    return f"{float(diff.max()):.1e}", f"{float((diff / forward.abs()).max()):.1e}"


# ----------------------------------------------------------------------------- the tables
def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def table(title: str, header: Sequence[str], rows: list[list[str]]) -> None:
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="only the tests' 3 probe samples per model")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    tables: list[list[list[str]]] = [[], [], []]
    start = time.perf_counter()
    for case in cases(more_probes=not args.quick):
        head = [case.model, case.optimizer, str(len(case.probes))]
        (err, forward), t1 = timed(first_order, case)
        err2, t2 = timed(exact, case)
        (abs3, rel3), t3 = timed(replay, case, forward)
        tables[0].append([*head, f"{case.eps:.0e}", *err, f"{t1:.1f}"])
        tables[1].append([*head, *err2, f"{t2:.1f}"])
        tables[2].append([*head, abs3, rel3, f"{t3:.1f}"])
    print_tables(tables, time.perf_counter() - start)


def print_tables(tables: list[list[list[str]]], seconds: float) -> None:
    probes, error = ["model", "optimizer", "probes"], ["max rel. error", "max abs. error", "min abs. truth"]
    table("Table 1: first-order vs central finite differences of the same seeded run",
          [*probes, "ε", *error, "time (s)"], tables[0])  # fmt: skip
    table("Table 2: exact vs the retrained run with w_j = 0", [*probes, *error, "time (s)"], tables[1])
    table("Table 3: replay of the recorded run vs the forward first-order engine",
          [*probes, "max abs. diff", "max rel. diff", "time (s)"], tables[2])  # fmt: skip
    if REFUSALS:
        print("\nRefusals and failures:\n")
        for why, where in REFUSALS.items():
            print(f"- {'; '.join(where)}: {why}")
    print(f"\nTotal: {seconds:.0f} s on {torch.get_num_threads()} threads, torch {torch.__version__}.")


if __name__ == "__main__":
    main()
