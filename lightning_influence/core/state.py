"""A fit's context, parts and bookkeeping; its checkpoint format.

The checkpoint state (``InfluenceTracker.state_dict()``), version 2::

    {"version": 2, "tracked_ids": LongTensor[k], "steps_booked": int, "global_step": int,
     "last_epoch": int | None, "seen": BoolTensor[k], "broken": str | None,
     "estimator": {...the estimator's state...}, "windows": {...WindowRecorder.state_dict()...}}

``global_step`` is the Trainer's step count after the last step the fit handled (booked, or skipped
by a GradScaler); on restore it must equal the checkpoint's own ``global_step``. Version 1 (0.1.0)
checkpoints are still read: ``{"version": 1, "tracked_ids", "steps_done", "seen",
"engine": {"states", "tracin_scores"}, "windows"}``. Nothing here knows Lightning.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from lightning_influence.errors import InfluenceConfigurationError
from lightning_influence.estimators.base import Estimator, Reduce
from lightning_influence.io.files import atomic_write, load_torch_file
from lightning_influence.records import Agree, StepRecord
from lightning_influence.results.windows import WindowRecorder, WindowSink

if TYPE_CHECKING:  # the parts of a fit, named in annotations only
    from lightning_influence.autodiff.parameters import TrackedParameters
    from lightning_influence.autodiff.queries import QueryEvaluator
    from lightning_influence.core.audit import FitAudit
    from lightning_influence.core.selfcheck import StepSelfCheck
    from lightning_influence.trajectory.recorder import TrajectoryRecorder

STATE_VERSION = 2


@dataclass
class FitContext:
    """What a fit needs from its surroundings, as plain values and callables (built by the callback)."""

    micro_batch_weight: float = 1.0  # w_m: 1 / (accumulate_grad_batches × world size)
    reduce: Reduce | None = None  # sums a tensor over data-parallel processes (None: one process)
    agree: Agree | None = None  # rank zero's value of a choice, on every process (None: one process)
    saves_checkpoints: bool = True  # the Trainer saves checkpoints (its memory peak is a save's, then)
    mixed_precision: bool = False
    autocast: tuple[str, torch.dtype] | None = None  # (device type, dtype) of the training forward's autocast
    expect_indexed: bool = False  # default id reader, but the dataset is not an IndexedDataset
    sinks: list[WindowSink] = field(default_factory=list)  # where closed windows and final scores go
    metadata: dict[str, Any] = field(default_factory=dict)  # written with the final scores
    # recording the trajectory (record_trajectory=True)
    trajectory_dir: str | None = None
    expected_steps: int | None = None  # the fit's total optimizer steps, when known (for ≈ √T checkpoints)
    gather_ids: Any = None  # every process's ids of a micro-batch (recording.GatherIds); None: one process
    writes_files: bool = True  # rank zero
    world_size: int = 1
    rank: int = 0  # this process's global rank (a replay after a multi-process fit is shared by the processes)
    train_dataset: Any = None  # for the all-sample replay
    collate_fn: Any = None
    states_file: str | None = None  # states_in_checkpoint=False: the states go here, not into checkpoints
    train_batch_size: int | None = None  # for the memory probe (None: the parameter formula)
    # the default path's decisions (track="auto", core/default_path.py): the recorded run is replayed once at the end
    # of fit for the registered queries, and influence(name) answers for every sample without a flag
    replay_at_end: bool = False
    answers_by_replay: bool = False


@dataclass
class FitParts:
    """The pieces a fit computes with: tracked parameters, the estimator, query gradients, the self-check."""

    params: TrackedParameters
    estimator: Estimator
    queries: QueryEvaluator
    self_check: StepSelfCheck
    optimizer_kind: str
    post_state_keys: tuple[str, ...]  # the optimizer state its model reads after each step
    recompute_gradient: Callable[[StepRecord], torch.Tensor]  # for estimators that do not return it
    recorder: TrajectoryRecorder | None = None  # writes the trajectory for the all-sample replay
    audit: FitAudit | None = None  # exact states of a few samples, compared with the main estimator


class FitCheckpoint:
    """The counters a fit keeps next to its estimator and windows.

    ``seen: BoolTensor[k]`` marks tracked samples that a booked step consumed; ``global_step`` is
    the step count after the last handled step; ``last_epoch`` its epoch; ``broken`` says why the
    states can no longer be trusted (a booking that failed half-way), or None.
    """

    def __init__(self, num_tracked: int, global_step: int = 0) -> None:
        self.seen = torch.zeros(num_tracked, dtype=torch.bool)
        self.steps_booked = 0
        self.global_step = global_step
        self.last_epoch: int | None = None
        self.broken: str | None = None

    def handled(self, global_step: int, epoch: int | None) -> None:
        """A step ran (booked or skipped): the fit is now at ``global_step``."""
        self.global_step = global_step
        if epoch is not None:
            self.last_epoch = epoch

    def to_dict(self, tracked_ids: torch.Tensor, estimator: Estimator, recorder: WindowRecorder) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "tracked_ids": tracked_ids.clone(),
            "steps_booked": self.steps_booked,
            "global_step": self.global_step,
            "last_epoch": self.last_epoch,
            "seen": self.seen.clone(),
            "broken": self.broken,
            "estimator": estimator.state_dict(),
            "windows": recorder.state_dict(),
        }

    @classmethod
    def restore(
        cls,
        state: dict[str, Any],
        tracked_ids: torch.Tensor,
        estimator: Estimator,
        recorder: WindowRecorder,
        global_step: int | None,
    ) -> FitCheckpoint:
        """Check ``state`` against this fit and the model's ``global_step``, apply it to ``estimator`` and
        ``recorder``, and return the counters. Raises :class:`InfluenceConfigurationError` with the fix."""
        state = upgrade(state)
        if state["broken"]:
            raise InfluenceConfigurationError(
                f"The checkpoint's influence state cannot be trusted: {state['broken']}. Resume from an earlier"
                " checkpoint (saved before that step), or train from the start."
            )
        if not torch.equal(state["tracked_ids"], tracked_ids):
            raise InfluenceConfigurationError(
                "The checkpoint's influence state tracks different sample ids than this tracker. Resume with the"
                " same track= and training set."
            )
        saved = state["global_step"]
        if saved is not None and global_step is not None and saved != global_step:
            raise InfluenceConfigurationError(
                f"The checkpoint's influence state has booked the optimizer steps up to {saved}, but the model is at"
                f" step {global_step}: it was saved while a step was being taken. Resume from another checkpoint."
            )
        try:
            estimator.load_state_dict(state["estimator"])
        except (KeyError, ValueError) as err:
            raise InfluenceConfigurationError(
                "The checkpoint's influence states do not fit this tracker (different parameters, estimator or"
                " optimizer). Resume with the same model, params= and optimizer."
            ) from err
        recorder.load_state_dict(state["windows"])
        out = cls(tracked_ids.numel())
        out.seen = state["seen"].to("cpu", copy=True)
        out.steps_booked = int(state["steps_booked"])
        out.global_step = int(saved if saved is not None else global_step or 0)
        out.last_epoch = state["last_epoch"]
        return out


def upgrade(state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint state in the current version's layout (version 1 is converted)."""
    version = state.get("version")
    if version == STATE_VERSION:
        return state
    if version == 1:
        return {
            "version": STATE_VERSION,
            "tracked_ids": state["tracked_ids"],
            "steps_booked": state["steps_done"],
            "global_step": None,  # unknown: version 1 did not store it
            "last_epoch": None,
            "seen": state["seen"],
            "broken": None,
            "estimator": state["engine"],
            "windows": state["windows"],
        }
    raise ValueError(f"Unknown InfluenceTracker checkpoint state version {version!r}.")


class BookingClock:
    """The tracker's own time per booked step (``Estimator.book``): the last step's, and what the progress bar shows.

    Lightning's ``self.log`` costs about 0.5 ms a call (``benchmarks/step_breakdown.py``), more than the tracker's
    own work per step at small k, so the progress bar's ``tracker_ms`` is updated at the third booked step (that
    step's own time: the first ones also choose the HVP's method and run the self-checks) and then once every
    ``every`` booked steps, with their mean.
    """

    def __init__(self, every: int = 50) -> None:
        self.every = every
        self.last: float | None = None  # seconds of the last booked step
        self._seconds, self._steps = 0.0, 0  # since the last progress update

    def add(self, seconds: float) -> None:
        self.last = seconds
        self._seconds += seconds
        self._steps += 1

    def progress_ms(self, steps_booked: int) -> float | None:
        """``tracker_ms`` when an update is due after ``steps_booked`` booked steps, else None."""
        if not self._steps or not (steps_booked == 3 or steps_booked % self.every == 0):
            return None
        mean, self._seconds, self._steps = self._seconds / self._steps, 0.0, 0
        assert self.last is not None  # set by add(), which counted the steps
        return (self.last if steps_booked == 3 else mean) * 1e3


SIDE_FORMAT = "lightning-influence/states"


def write_side_file(path: str, global_step: int, heavy: dict[str, Any], writes: bool) -> None:
    """``states_in_checkpoint=False``: the states (``heavy``) of the fit at ``global_step`` go to ``path``
    (atomically, replacing the previous ones: only the last checkpoint keeps its states)."""
    if writes:
        document = {"format": SIDE_FORMAT, "version": 1, "global_step": int(global_step), **heavy}
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        atomic_write(Path(path), lambda f: torch.save(document, f))


def read_side_file(path: str, global_step: int) -> dict[str, Any]:
    """The states a checkpoint left in its side file; they must belong to that checkpoint's step."""
    try:
        fix = "Resume from a checkpoint whose states file is whole, or train from the start."
        document = load_torch_file(Path(path), fix, map_location="cpu")
    except FileNotFoundError as err:
        raise InfluenceConfigurationError(
            f"The checkpoint keeps its influence states in {path} (states_in_checkpoint=False), which is missing."
            " Resume with the artifact folder of the run that saved it, or train from the start."
        ) from err
    if document.get("format") != SIDE_FORMAT or document.get("global_step") != global_step:
        raise InfluenceConfigurationError(
            f"{path} holds the influence states of step {document.get('global_step')}, but the checkpoint is at"
            f" step {global_step}: with states_in_checkpoint=False only the last checkpoint keeps its states."
            " Resume from the last checkpoint, or keep the states in checkpoints (states_in_checkpoint=True)."
        )
    return {"estimator": document["estimator"], "audit": document["audit"]}
