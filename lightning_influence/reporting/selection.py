"""Selection decisions to the Trainer's loggers: scalars to every logger, the table of removed ids to TensorBoard
(rank zero)."""

from __future__ import annotations

from typing import Iterable

from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from lightning_influence.results.selection import SelectionDecision


def decision_table(decision: SelectionDecision, top_k: int) -> str:
    """A Markdown table of the removed ids and their window scores (the ``top_k`` most harmful)."""
    head = (
        f"**{decision.query}**, after window {decision.window} (steps {decision.start_step}–{decision.end_step - 1}):"
        f" removed {decision.sample_ids.numel()}, {decision.total_removed} in total."
    )
    rows = [f"| {r + 1} | {int(i)} | {float(s):+.4e} |" for r, (i, s) in
            enumerate(zip(decision.sample_ids[:top_k], decision.scores[:top_k]))]  # fmt: skip
    if not rows:
        return head + " No sample qualified."
    return "\n".join([head, "", "| rank | sample id | window score |", "|---:|---:|---:|", *rows])


@rank_zero_only
def log_decision(loggers: Iterable[Logger], decision: SelectionDecision, namespace: str, step: int, top_k: int) -> None:
    """``<namespace>/<query>/selection/removed_in_window`` and ``.../removed_total`` to every logger; the table of
    removed ids to TensorBoard as ``<namespace>/<query>/selection/removed``."""
    prefix = f"{namespace}/{decision.query}/selection"
    metrics = {f"{prefix}/removed_in_window": float(decision.sample_ids.numel()),
               f"{prefix}/removed_total": float(decision.total_removed)}  # fmt: skip
    for logger in loggers:
        logger.log_metrics(metrics, step=step)
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text(f"{prefix}/removed", decision_table(decision, top_k), global_step=step)
