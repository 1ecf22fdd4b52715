"""Reporting of DIT time windows to the Trainer's loggers.

Every logger gets a few scalars per closed window, at ``step = snapshot.end_step``, under
``influence/<query>/``:

==================  =====================================================================
``helpful_mass``    sum of the positive window scores (≥ 0)
``harmful_mass``    sum of the negative window scores (≤ 0)
``num_harmful``     number of tracked samples with a negative window score
``strongest``       the window score with the largest absolute value, with its sign
==================  =====================================================================

A :class:`~lightning.pytorch.loggers.TensorBoardLogger` also gets, through its ``SummaryWriter``:

- ``influence/<query>/window_scores``: a histogram of the window's scores;
- ``influence/<query>/top_samples``: a markdown table of the most harmful and most helpful
  samples of the window, with their cumulative scores so far;
- ``influence/<query>/strongest_over_windows``: an image (only when matplotlib is installed) of
  the cumulative scores over the windows of the 3 most harmful and the 3 most helpful samples by
  cumulative score (:func:`strongest_cumulative`), as its title says.

Figures are drawn with matplotlib's Agg canvas without pyplot, so no GUI backend is touched and
no figure is left open. Sign convention: negative = harmful to the query, positive = helpful.
"""

from __future__ import annotations

import warnings
from typing import Any, Iterable, Literal, Sequence, Union

import numpy as np
import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from lightning_influence.results.windows import WindowSnapshot

__all__ = [
    "SCALAR_NAMES",
    "log_window",
    "metric_key",
    "strongest_cumulative",
    "strongest_over_windows_figure",
    "top_samples_table",
    "window_summary",
]

#: The scalar names logged per window, in order; the full key is ``influence/<query>/<name>``.
SCALAR_NAMES = ("helpful_mass", "harmful_mass", "num_harmful", "strongest")


def metric_key(query: str, name: str, namespace: str = "influence") -> str:
    """``<namespace>/<query>/<name>`` (namespace ``influence`` unless several trackers log): the tag
    of every scalar, histogram, text and image."""
    return f"{namespace}/{query}/{name}"


def window_summary(scores: torch.Tensor) -> dict[str, float]:
    """``helpful_mass``, ``harmful_mass``, ``num_harmful`` and ``strongest`` of ``scores: Tensor[k]``
    (computed in float64; all 0.0 when k = 0)."""
    s = scores.detach().cpu().to(torch.float64).reshape(-1)
    if s.numel() == 0:
        return {"helpful_mass": 0.0, "harmful_mass": 0.0, "num_harmful": 0.0, "strongest": 0.0}
    return {
        "helpful_mass": float(s.clamp(min=0).sum()),
        "harmful_mass": float(s.clamp(max=0).sum()),
        "num_harmful": float((s < 0).sum()),
        "strongest": float(s[s.abs().argmax()]),
    }


def _fmt(value: float) -> str:
    return f"{value:+.4e}"


def top_samples_table(
    sample_ids: torch.Tensor,
    scores: torch.Tensor,
    cumulative: torch.Tensor,
    top_k: int = 10,
    title: str | None = None,
    by: Literal["window", "cumulative"] = "window",
) -> str:
    """Markdown: the ``top_k`` most harmful (negative) and ``top_k`` most helpful (positive) samples
    by window score (``by="window"``) or by cumulative score (``by="cumulative"``), each row
    ``| rank | sample id | window score | cumulative |``.

    Args:
        sample_ids: ``LongTensor[k]``.
        scores: ``Tensor[k]``, the window scores.
        cumulative: ``Tensor[k]``, the scores summed over every window so far (this one included).
        top_k: rows per table.
        title: an optional first paragraph.
    """
    ids = sample_ids.detach().cpu().reshape(-1).tolist()
    s = scores.detach().cpu().to(torch.float64).reshape(-1)
    c = cumulative.detach().cpu().to(torch.float64).reshape(-1)
    values, cum = s.tolist(), c.tolist()
    # Python floats, not tensor operations: each torch call releases the GIL, and while TensorBoard's writer thread
    # runs it waits up to the switch interval (5 ms) to take it back. Stable sorts (reverse=True keeps the order of
    # equal keys too), so ties rank by position, as ``torch.argsort(stable=True)`` did; NaN is neither < 0 nor > 0.
    key = cum if by == "cumulative" else values
    harmful = sorted((i for i, v in enumerate(key) if v < 0), key=key.__getitem__)[:top_k]
    helpful = sorted((i for i, v in enumerate(key) if v > 0), key=key.__getitem__, reverse=True)[:top_k]
    parts = [title] if title else []
    where = "so far (cumulative)" if by == "cumulative" else "in this window"
    for heading, rows in ((f"Most harmful {where}", harmful), (f"Most helpful {where}", helpful)):
        parts.append(f"**{heading}**")
        if not rows:
            parts.append("_none_")
            continue
        lines = ["| rank | sample id | window score | cumulative |", "|---:|---:|---:|---:|"]
        lines += [f"| {r} | {ids[i]} | {_fmt(values[i])} | {_fmt(cum[i])} |" for r, i in enumerate(rows, start=1)]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


_HARMFUL_COLORS = ("#d62728", "#ff7f0e", "#8c564b", "#e377c2", "#bcbd22")
_HELPFUL_COLORS = ("#1f77b4", "#2ca02c", "#17becf", "#9467bd", "#7f7f7f")


def strongest_cumulative(history: torch.Tensor, num_per_side: int = 3) -> tuple[list[int], list[int]]:
    """The columns of ``history: Tensor[W, k]`` (window scores, one row per window) that
    :func:`strongest_over_windows_figure` plots: the ``num_per_side`` samples with the most negative cumulative score
    (summed over the ``W`` windows; most harmful first) and the ``num_per_side`` with the most positive (most helpful
    first). A zero or NaN sum is on neither side; ties rank by position."""
    history = history.detach().cpu().to(torch.float64).reshape(-1, history.shape[-1])  # [k]: one window
    last = history.sum(0).tolist()
    harmful = sorted((j for j, v in enumerate(last) if v < 0), key=last.__getitem__)[:num_per_side]
    helpful = sorted((j for j, v in enumerate(last) if v > 0), key=last.__getitem__, reverse=True)[:num_per_side]
    return harmful, helpful


def strongest_over_windows_figure(
    history: torch.Tensor,
    sample_ids: torch.Tensor,
    end_steps: Sequence[int] | None = None,
    num_per_side: int = 3,
    title: str | None = None,
) -> Any:
    """A matplotlib ``Figure`` of cumulative scores over the windows, of the strongest samples on each side.

    Plots, from 0 at the start of training, the running sum of ``history: Tensor[W, k]`` (window scores, one row
    per window) for the samples :func:`strongest_cumulative` picks: the ``num_per_side`` with the most negative
    cumulative score after the last window (most harmful; solid, warm colours) and the ``num_per_side`` with the
    most positive (most helpful; dashed, cool colours), labelled by sample id. The title says so, under ``title``
    when given. The x axis is ``end_steps`` (the windows' end steps) when given, otherwise the number of windows
    closed.

    Raises ``ImportError`` when matplotlib is missing. The figure is not registered with pyplot:
    there is nothing to close.
    """
    from matplotlib.figure import Figure  # optional dependency, imported lazily

    cumulative = history.detach().cpu().to(torch.float64).reshape(history.shape[0], -1).cumsum(0)
    ids = sample_ids.detach().cpu().reshape(-1).tolist()
    harmful, helpful = strongest_cumulative(history, num_per_side) if cumulative.shape[0] else ([], [])
    if end_steps is None:
        x = list(range(cumulative.shape[0] + 1))
        xlabel = "windows closed"
    else:
        x = [0] + [int(step) for step in end_steps]
        xlabel = "optimizer step"

    # TensorBoard shows images in ~330 px cards: a small canvas with large type stays readable there
    fig = Figure(figsize=(6.0, 3.6), dpi=72)
    ax = fig.add_subplot()
    ax.axhline(0.0, color="0.6", linewidth=1.0)
    for kind, chosen, colors, style in (
        ("harmful", harmful, _HARMFUL_COLORS, "-"),
        ("helpful", helpful, _HELPFUL_COLORS, "--"),
    ):
        for rank, j in enumerate(chosen):
            y = [0.0] + cumulative[:, j].tolist()
            color = colors[rank % len(colors)]
            ax.plot(x, y, style, marker="o", markersize=4, linewidth=2, color=color, label=f"id {ids[j]} ({kind})")
    ax.set_xlabel(xlabel, fontsize=12)
    ax.set_ylabel("cumulative score", fontsize=12)
    ax.tick_params(labelsize=11)
    what = f"top {num_per_side} harmful (< 0) and helpful (> 0) by cumulative score"
    ax.set_title(f"{title}\n{what}" if title else what, fontsize=11, loc="left")
    ax.grid(alpha=0.3)
    if harmful or helpful:
        ax.legend(fontsize=10, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.tight_layout()
    return fig


def render_figure(fig: Any, tight_layout: bool = True) -> np.ndarray:
    """``uint8[3, H, W]``: the figure drawn by the Agg canvas (laid out tightly first unless ``tight_layout=False``:
    a figure already laid out, such as :func:`strongest_over_windows_figure`'s, is drawn the same without it, and
    the layout is a third of the cost of a figure)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    if tight_layout:
        fig.tight_layout()
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return np.ascontiguousarray(rgba[..., :3].transpose(2, 0, 1))


def window_figure_image(
    snapshot: WindowSnapshot, history: torch.Tensor, end_steps: Sequence[int] | None
) -> np.ndarray | None:
    fig = None
    if snapshot.sample_ids.numel() == 0:  # nothing forward-tracked (track=()): the replay draws every sample's
        return None
    try:
        fig = strongest_over_windows_figure(
            history,
            snapshot.sample_ids,
            end_steps,
            title=f"{snapshot.query}, after window {snapshot.index}",
        )
        return render_figure(fig, tight_layout=False)  # laid out when it was made
    except ImportError:  # matplotlib is optional
        return None
    except Exception as err:  # a plot must never end a training run
        warnings.warn(f"Could not draw the influence figure of {snapshot.query!r}: {err!r}.", stacklevel=3)
        return None
    finally:
        if fig is not None:
            fig.clear()


def as_loggers(loggers: Union[Logger, Iterable[Logger], None]) -> list[Logger]:
    """``trainer.loggers``, one logger or None as a list."""
    if loggers is None:
        return []
    if isinstance(loggers, Logger):
        return [loggers]
    return list(loggers)


@rank_zero_only
def log_window(
    loggers: Union[Logger, Iterable[Logger], None],
    snapshot: WindowSnapshot,
    history: torch.Tensor,
    top_k: int = 10,
    end_steps: Sequence[int] | None = None,
    namespace: str = "influence",
    figure: bool = True,
    step: int | None = None,
) -> None:
    """Report one closed window to every logger (see the module docstring for keys and tags).

    Args:
        loggers: ``trainer.loggers`` (a list, possibly empty: then nothing happens) or one logger.
        snapshot: the window that just closed.
        history: ``Tensor[W, k]``, the window scores of ``snapshot.query`` so far, one row per
            window; the last row is ``snapshot.scores``.
        top_k: rows of each table in the ``top_samples`` text.
        end_steps: the ``W`` windows' end steps, for the x axis of the figure; without them the
            x axis counts windows.
        namespace: the first part of every tag (``influence_1`` etc. when several trackers log).
        figure: draw the ``strongest_over_windows`` image (matplotlib: the costly part, tens of ms).
        step: the logger step (default ``snapshot.end_step``; the tracker passes ``end_step − 1``, the step at
            which Lightning logs the loss of the window's last optimizer step, so the curves line up).
    """
    log_window_with_cumulative(loggers, snapshot, history, top_k, end_steps, namespace, figure, step, None)


@rank_zero_only
def log_window_with_cumulative(
    loggers: Union[Logger, Iterable[Logger], None],
    snapshot: WindowSnapshot,
    history: torch.Tensor,
    top_k: int,
    end_steps: Sequence[int] | None,
    namespace: str,
    figure: bool,
    step: int | None,
    cumulative: torch.Tensor | None,
) -> None:
    """:func:`log_window` given ``cumulative: Tensor[k]``, the window scores summed over every window so far (this
    one included), for the tables (None: ``history`` summed). Given, ``history`` is read only for the figure:
    without a figure it may be the window's row alone (``snapshot.scores[None]``), which
    :class:`~lightning_influence.reporting.window_sink.LoggerSink`, keeping a running sum, passes rather than the
    whole matrix at every window."""
    loggers = as_loggers(loggers)
    if not loggers:
        return
    scores = snapshot.scores.detach().cpu()
    history = history.detach().cpu()
    if history.dim() == 1:
        history = history.unsqueeze(0)
    if history.dim() != 2 or history.shape[0] == 0 or history.shape[1] != scores.numel():
        raise ValueError(f"history must be Tensor[W >= 1, {scores.numel()}], got {tuple(history.shape)}.")
    if end_steps is not None and len(end_steps) != history.shape[0]:
        raise ValueError(f"end_steps has {len(end_steps)} entries for {history.shape[0]} windows.")
    if cumulative is not None and cumulative.numel() != scores.numel():
        raise ValueError(f"cumulative must be Tensor[{scores.numel()}], got {tuple(cumulative.shape)}.")

    query, step = snapshot.query, int(snapshot.end_step) if step is None else int(step)
    metrics = {metric_key(query, name, namespace): value for name, value in window_summary(scores).items()}
    for logger in loggers:
        logger.log_metrics(metrics, step=step)

    boards = [logger for logger in loggers if isinstance(logger, TensorBoardLogger)]
    if boards:
        if cumulative is None:
            cumulative = history.to(torch.float64).sum(0)
        _log_to_boards(boards, snapshot, history, scores, cumulative, top_k, end_steps, namespace, figure, step)


def _log_to_boards(
    boards: list[TensorBoardLogger],
    snapshot: WindowSnapshot,
    history: torch.Tensor,
    scores: torch.Tensor,
    cumulative: torch.Tensor,
    top_k: int,
    end_steps: Sequence[int] | None,
    namespace: str,
    figure: bool,
    step: int,
) -> None:
    """TensorBoard's views of one window: the histogram, the two tables, the figure."""
    query, last_step = snapshot.query, snapshot.end_step - 1
    title = (
        f"**{query}**, window {snapshot.index}: optimizer steps {snapshot.start_step}–{last_step} "
        f"(epoch {snapshot.epoch}). Negative = harmful, positive = helpful; "
        f"cumulative = summed over windows 0–{snapshot.index}."
    )
    cumulative = cumulative.detach().cpu().to(torch.float64).reshape(-1)
    table = top_samples_table(snapshot.sample_ids, scores, cumulative, top_k, title)
    overall = top_samples_table(snapshot.sample_ids, scores, cumulative, top_k, title, by="cumulative")
    image = window_figure_image(snapshot, history, end_steps) if figure else None
    finite = scores[torch.isfinite(scores)].to(torch.float64).numpy()
    for logger in boards:
        writer = logger.experiment
        if finite.size:
            writer.add_histogram(metric_key(query, "window_scores", namespace), finite, global_step=step)
        writer.add_text(metric_key(query, "top_samples", namespace), table, global_step=step)
        writer.add_text(metric_key(query, "top_samples_cumulative", namespace), overall, global_step=step)
        if image is not None:
            writer.add_image(
                metric_key(query, "strongest_over_windows", namespace), image, global_step=step, dataformats="CHW"
            )


def add_custom_scalars(loggers: Iterable[Logger], query: str, namespace: str = "influence") -> None:
    """A Custom Scalars layout per query: the helpful and harmful mass together, the count and the strongest."""
    chart = {
        "helpful and harmful mass": [
            "Multiline",
            [metric_key(query, n, namespace) for n in ("helpful_mass", "harmful_mass")],
        ],
        "harmful samples": ["Multiline", [metric_key(query, "num_harmful", namespace)]],
        "strongest window score (largest |score|, signed)": ["Multiline", [metric_key(query, "strongest", namespace)]],
    }
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_custom_scalars({f"{namespace}/{query}": chart})
