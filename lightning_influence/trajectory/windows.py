"""DIT time windows ([concepts.md: Time windows]) from a replayed trajectory: where the windows end, and their
snapshots. Nothing here knows Lightning.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lightning_influence.results.windows import WindowSnapshot
from lightning_influence.trajectory.format import StepEntry


def window_ends(
    schedule: Mapping[str, Any] | None,
    entries: Sequence[StepEntry],
    final_step: int,
    boundaries: Sequence[int] | None = None,
) -> list[int]:
    """The sorted, distinct window ends b with first recorded step < b ≤ ``final_step``.

    ``boundaries`` given: those (``ValueError`` for one outside that range). Else from ``schedule``
    (``meta["windows"]``: ``{"every_n_steps": n | None, "every_n_epochs": n | None}``): every n steps, the
    multiples of n; every n epochs, the step count after the last recorded step of each epoch e with
    (e + 1) % n == 0; and always ``final_step``.
    """
    start = entries[0].step
    if boundaries is not None:
        given = sorted({int(b) for b in boundaries})
        outside = [b for b in given if not start < b <= final_step]
        if outside:
            raise ValueError(
                f"Window boundaries {outside} lie outside ({start}, {final_step}]: a window ends after "
                "the first recorded step and at the latest at the final step."
            )
        return given
    schedule = schedule or {}
    ends = {final_step}
    every_steps, every_epochs = schedule.get("every_n_steps"), schedule.get("every_n_epochs")
    if every_steps:
        n = int(every_steps)
        ends.update(range(n * (start // n + 1), final_step, n))
    if every_epochs:
        last_of_epoch = {e.epoch: e.step for e in entries}  # entries are in step order
        ends.update(t + 1 for epoch, t in last_of_epoch.items() if (epoch + 1) % int(every_epochs) == 0)
    return sorted(b for b in ends if start < b <= final_step)


def window_snapshots(
    name: str,
    start: int,
    ends: Sequence[int],
    epochs: Sequence[int],
    sample_ids: torch.Tensor,
    totals: torch.Tensor,
) -> list[WindowSnapshot]:
    """One snapshot per window [previous end (``start`` first), end] with scores I(end) − I(previous end) over
    ``sample_ids``; ``totals: Tensor[len(ends), num_samples]`` holds I at each end (I(start) = 0)."""
    out, previous, a = [], torch.zeros_like(totals[0]), start
    for index, (b, epoch) in enumerate(zip(ends, epochs)):
        scores = (totals[index] - previous)[sample_ids]
        out.append(WindowSnapshot(name, index, a, b, int(epoch), sample_ids, scores))
        previous, a = totals[index], b
    return out
