"""Every closed window to the Trainer's loggers: scalars, histogram and tables at each window; every n windows (and
for the last at the end of fit) the figure and labelled pictures of the window's most harmful and most helpful samples
(TensorBoard). Rank zero; the callback attaches it."""

from __future__ import annotations

from typing import Any, Iterable, Union

import numpy as np
import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger

from lightning_influence.reporting.windows import (
    add_custom_scalars,
    as_loggers,
    log_window_with_cumulative,
    metric_key,
    window_figure_image,
)
from lightning_influence.results.previews import PreviewFn, labelled_grid, preview_images, sample_labels
from lightning_influence.results.windows import WindowSnapshot


def logger_step(end_step: int) -> int:
    """Where a window ending at ``end_step`` goes on the loggers' step axis: the step of its last optimizer step,
    at which Lightning logs that step's training loss, so influence and training curves line up."""
    return max(int(end_step) - 1, 0)


class LoggerSink:
    """:class:`~lightning_influence.results.windows.WindowSink` that reports every closed window to the Trainer's
    loggers.

    Args:
        loggers: ``trainer.loggers``.
        top_k: rows of each table in the ``top_samples`` text.
        namespace: the first part of every tag.
    """

    def __init__(
        self,
        loggers: Union[Logger, Iterable[Logger], None],
        top_k: int,
        namespace: str,
        figure_every: int = 10,
        preview: PreviewFn | None = None,
        dataset: Any = None,
    ) -> None:
        self.loggers = as_loggers(loggers)
        self.top_k = top_k
        self.namespace = namespace
        self.figure_every = figure_every
        self.preview, self.dataset = preview, dataset
        self._undrawn: dict[str, tuple[WindowSnapshot, Any]] = {}  # query -> its last window and recorder
        self._laid_out: set[str] = set()
        self._last: dict[str, tuple[WindowSnapshot, Any]] = {}
        self._cumulative: dict[str, tuple[int, torch.Tensor]] = {}  # query -> (window index, float64 sum so far)

    def window(self, snapshot: WindowSnapshot, recorder: Any) -> None:
        """Every window's scalars, histogram and table; the images (the figure and the labelled pictures of the
        window's most harmful and most helpful samples) every ``figure_every``-th window only, as their encoding and
        writing cost several times the rest of the window's reporting; the last window's at the end of fit.

        The cumulative scores of the tables are summed as the windows close (one row added per window); the matrix
        of every window so far is asked of the recorder only for a figure, so a window costs the same at the
        thousandth window as at the first."""
        query = snapshot.query
        if query not in self._laid_out:  # TensorBoard's Custom Scalars tab opens on the influence charts
            self._laid_out.add(query)
            add_custom_scalars(self.loggers, query, self.namespace)
        cumulative = self._cumulative_at(snapshot, recorder)
        figure = (snapshot.index + 1) % self.figure_every == 0
        if figure:
            history = recorder.window_matrix(query)
            end_steps: list[int] | None = [s.end_step for s in recorder.windows(query)]
        else:  # the tables need the window and the running sum only
            history, end_steps = snapshot.scores.reshape(1, -1), None
        step = logger_step(snapshot.end_step)
        log_window_with_cumulative(
            self.loggers, snapshot, history, self.top_k, end_steps, self.namespace, figure, step, cumulative
        )
        if figure:
            self._undrawn.pop(query, None)
        else:
            self._undrawn[query] = (snapshot, recorder)
        self._last[query] = (snapshot, recorder)
        if figure:
            self._log_samples(snapshot, snapshot.scores, "samples")

    def _cumulative_at(self, snapshot: WindowSnapshot, recorder: Any) -> torch.Tensor:
        """``Tensor[k]`` float64: ``snapshot.query``'s window scores summed over its windows so far, this one
        included: the last sum plus this window, or (first window seen, e.g. a resumed fit) the recorder's sum."""
        query, scores = snapshot.query, snapshot.scores.detach().cpu().to(torch.float64).reshape(-1)
        last = self._cumulative.get(query)
        if last is not None and last[0] == snapshot.index - 1 and last[1].shape == scores.shape:
            total = last[1] + scores
        else:
            total = recorder.window_matrix(query)[: snapshot.index + 1].detach().cpu().to(torch.float64).sum(0)
        self._cumulative[query] = (snapshot.index, total)
        return total

    def _log_samples(self, snapshot: WindowSnapshot, scores: torch.Tensor, what: str) -> None:
        """One picture each of the (up to 8) most harmful and most helpful samples by ``scores`` (TensorBoard, with a
        preview): :func:`~lightning_influence.results.previews.labelled_grid`, each image enlarged and captioned
        with its id, training label and score. Harmful means a negative score and helpful a positive one, as in the
        ``top_samples`` tables: a side without such a sample (or a NaN score) logs no picture."""
        boards = [logger for logger in self.loggers if isinstance(logger, TensorBoardLogger)]
        if not boards or self.preview is None or not scores.numel():
            return
        values = scores.detach().cpu().to(torch.float64).numpy()
        # stable sorts, NaN last: ranked as the tables rank (ties by position)
        harmful = [i for i in np.argsort(values, kind="stable")[:8].tolist() if values[i] < 0]
        helpful = [i for i in np.argsort(-values, kind="stable")[:8].tolist() if values[i] > 0]
        ids = snapshot.sample_ids.tolist()
        where = f"in window {snapshot.index}" if what == "samples" else "over the run (cumulative)"
        for side, rows in (("harmful", harmful), ("helpful", helpful)):
            chosen = [ids[i] for i in rows]
            images = preview_images(self.preview, self.dataset, chosen)
            if images is None:
                continue
            sign = "< 0" if side == "harmful" else "> 0"
            title = f"{snapshot.query}: most {side} {where}, score {sign}"
            try:
                grid = labelled_grid(images, chosen, values[rows].tolist(), sample_labels(self.dataset, chosen), title)
            except Exception:  # noqa: BLE001 - a picture must never end a training run (e.g. a preview's odd shape)
                continue
            key = metric_key(snapshot.query, f"most_{side}_{what}", self.namespace)
            for logger in boards:  # one picture, as a batch of one (so it is counted with the sample previews)
                logger.experiment.add_images(key, grid[None], global_step=logger_step(snapshot.end_step))

    def final(self, results: Any, metadata: Any) -> None:
        """The end of fit: the pictures of the whole run's most harmful and most helpful samples (by cumulative
        score), and the figure and sample pictures of each query's last window, if they were not drawn when it
        closed."""
        boards = [logger for logger in self.loggers if isinstance(logger, TensorBoardLogger)]
        for snapshot, _ in self._last.values():  # the whole run's most harmful / helpful samples
            self._log_samples(snapshot, self._cumulative[snapshot.query][1], "samples_overall")
        for snapshot, recorder in self._undrawn.values():
            history = recorder.window_matrix(snapshot.query)
            end_steps = [s.end_step for s in recorder.windows(snapshot.query)]
            image = window_figure_image(snapshot, history, end_steps)
            self._log_samples(snapshot, snapshot.scores, "samples")
            for logger in boards if image is not None else ():
                key = metric_key(snapshot.query, "strongest_over_windows", self.namespace)
                logger.experiment.add_image(key, image, global_step=logger_step(snapshot.end_step), dataformats="CHW")
        self._undrawn.clear()
