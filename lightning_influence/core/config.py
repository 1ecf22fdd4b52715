"""The tracker's configuration: one frozen, validated record built once at construction.

Every argument of :class:`~lightning_influence.InfluenceTracker` is checked here, once, and is never
changed afterwards (a value a fit derives, such as the training set's size, lives with that fit).
The estimator and optimizer-model names are defined here. Nothing here knows Lightning.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, cast

import torch
from torch import nn

from lightning_influence.autodiff.functional import PerSampleLossFn, RegularizerFn
from lightning_influence.autodiff.queries import is_batch, nonfinite_values
from lightning_influence.errors import NonFiniteInfluenceError
from lightning_influence.estimators.registry import EstimatorName, EstimatorSpec, estimator_spec
from lightning_influence.optimizers.state import OptimizerModelName
from lightning_influence.results.previews import PreviewFn
from lightning_influence.results.windows import WindowSchedule
from lightning_influence.sample_ids import SampleIdsFn, default_sample_ids

OPTIMIZER_MODELS = ("auto", "sgd")
"""``"auto"``: the real optimizer's Jacobian; ``"sgd"``: any optimizer modelled as plain SGD (the mismatch baseline)."""

GIB = 2**30


def _check_track(
    track: Sequence[int] | torch.Tensor | Literal["auto"] | None, allow_empty: bool
) -> torch.Tensor | Literal["auto"] | None:
    if track is None or (isinstance(track, str) and track == "auto"):
        return track
    if isinstance(track, str):
        raise ValueError(f"track must be 'auto', None (every sample) or a sequence of ids, got {track!r}.")
    track = torch.as_tensor(track)
    if track.numel() and (track.dtype.is_floating_point or track.dtype.is_complex or track.dtype == torch.bool):
        raise ValueError(f"track must hold integer training-set ids, got dtype {track.dtype}.")
    track = track.to(torch.long).flatten()
    if track.numel() == 0 and allow_empty:
        return track  # recording the trajectory alone: no forward states
    if track.numel() == 0 or torch.unique(track).numel() != track.numel() or int(track.min()) < 0:
        raise ValueError(
            "track must be a non-empty sequence of distinct, non-negative training-set ids (track=() is allowed"
            " with record_trajectory=True, to record without forward states)."
        )
    return track


def _check_positive(name: str, value: int | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


@dataclass(frozen=True)
class TrackerConfig:
    """What the user asked for; see :class:`~lightning_influence.InfluenceTracker` for each field.

    ``track`` is ``"auto"`` (the default path, resolved at train start by
    :func:`~lightning_influence.core.default_path.resolve_default_path`), ``None`` (every sample) or a
    ``LongTensor[k]`` of distinct ids; ``record_trajectory`` None lets ``"auto"`` decide (else False). ``queries``
    maps names to batches / DataLoaders. Construction validates every field and raises ``ValueError`` /
    ``TypeError`` naming the argument and the fix.
    """

    track: torch.Tensor | Literal["auto"] | None = "auto"
    loss_fn: PerSampleLossFn | None = None
    sample_ids: SampleIdsFn = default_sample_ids
    estimator: EstimatorName = "acc"
    optimizer_model: OptimizerModelName = "auto"
    queries: Mapping[str, Any] = field(default_factory=dict)
    window_every_n_steps: int | None = None
    window_every_n_epochs: int | None = None
    dirpath: str | os.PathLike | None = None
    write_artifacts: bool = True
    log_top_k: int = 10
    log_figure_every_n_windows: int = 10
    curvature: Literal["exact"] = "exact"
    params: Sequence[str | nn.Module] | str | nn.Module | None = None
    regularizer: RegularizerFn | None = None
    num_samples: int | None = None
    max_memory_bytes: int = 4 * GIB
    hvp_chunk_size: int | None = None
    hvp_memory_bytes: int = GIB // 4
    self_check_steps: int = 2
    record_trajectory: bool | None = None
    checkpoint_every_n_steps: int | None = None
    record_batches: bool = False
    audit: int = 0
    audit_seed: int = 0
    audit_ids: torch.Tensor | None = None  # given as a sequence of ids, kept as a LongTensor (like ``track``)
    name: str | None = None
    sample_preview: Literal["auto"] | PreviewFn | None = "auto"
    states_in_checkpoint: bool = True

    def __post_init__(self) -> None:
        fix = object.__setattr__  # a frozen dataclass normalises its own fields here only
        fix(self, "track", _check_track(self.track, allow_empty=bool(self.record_trajectory)))
        fix(self, "queries", dict(self.queries or {}))
        # None (the tracker's default) stands for default_sample_ids
        fix(self, "sample_ids", cast(Optional[SampleIdsFn], self.sample_ids) or default_sample_ids)
        self._check_names()
        self._check_queries()
        _check_positive("log_top_k", self.log_top_k)
        _check_positive("log_figure_every_n_windows", self.log_figure_every_n_windows)
        _check_positive("hvp_chunk_size", self.hvp_chunk_size, allow_none=True)
        _check_positive("num_samples", self.num_samples, allow_none=True)
        _check_positive("max_memory_bytes", self.max_memory_bytes)
        _check_positive("hvp_memory_bytes", self.hvp_memory_bytes)
        if (
            isinstance(self.self_check_steps, bool)
            or not isinstance(self.self_check_steps, int)
            or self.self_check_steps < 0
        ):
            raise ValueError(f"self_check_steps must be a non-negative integer, got {self.self_check_steps!r}.")
        _check_positive("checkpoint_every_n_steps", self.checkpoint_every_n_steps, allow_none=True)
        if (self.record_batches or self.checkpoint_every_n_steps is not None) and not self.may_record:
            raise ValueError("record_batches and checkpoint_every_n_steps need record_trajectory=True.")
        self._check_audit()
        if self.sample_preview not in ("auto", None) and not callable(self.sample_preview):
            raise TypeError("sample_preview must be 'auto', None or a function (dataset, ids) -> Tensor[N, C, H, W].")
        if self.name is not None and (not isinstance(self.name, str) or not self.name or "/" in self.name):
            raise ValueError(f"name must be a non-empty string without '/', got {self.name!r}.")
        for name in ("loss_fn", "regularizer", "sample_ids"):
            if getattr(self, name) is not None and not callable(getattr(self, name)):
                raise TypeError(f"{name} must be callable, got {type(getattr(self, name)).__name__}.")

    def _check_audit(self) -> None:
        fix = object.__setattr__
        if isinstance(self.audit, bool) or not isinstance(self.audit, int) or self.audit < 0:
            raise ValueError(f"audit must be a non-negative number of samples, got {self.audit!r}.")
        if self.audit_ids is not None:
            if self.audit:
                raise ValueError("Pass audit=N (N sampled ids) or audit_ids=[...], not both.")
            fix(self, "audit_ids", _check_track(self.audit_ids, allow_empty=False))
        if self.audits and self.estimator_spec.exact:
            raise ValueError(
                "The audit compares the main estimator with estimator='exact': with estimator='exact' every tracked"
                " sample is already exact. Drop audit=, or audit another estimator ('acc', 'first-order', 'tracin')."
            )

    @property
    def may_record(self) -> bool:
        """Whether the run may be recorded: ``record_trajectory=True``, or the default path left to decide."""
        return bool(self.record_trajectory) or (self.record_trajectory is None and isinstance(self.track, str))

    @property
    def audits(self) -> bool:
        """Whether a faithfulness audit runs next to the main estimator."""
        return bool(self.audit) or self.audit_ids is not None

    def _check_names(self) -> None:
        estimator_spec(self.estimator)  # ValueError naming the estimators
        if self.optimizer_model not in OPTIMIZER_MODELS:
            raise ValueError(f"optimizer_model must be 'auto' or 'sgd', got {self.optimizer_model!r}.")
        if self.curvature != "exact":
            raise ValueError(
                f"curvature={self.curvature!r} is not available: only 'exact' Hessian-vector products of the batch loss"
                " are implemented (an approximation is never substituted silently)."
            )

    def _check_queries(self) -> None:
        if any(not isinstance(name, str) for name in self.queries):
            raise TypeError("queries must map string names to a batch or a DataLoader.")
        for name, query in self.queries.items():  # a batch is checked now; a DataLoader when it is evaluated
            found = nonfinite_values(query, f"queries[{name!r}]") if is_batch(query) else []
            if found:
                raise NonFiniteInfluenceError(
                    f"The query batch queries[{name!r}] holds NaN or inf: {', '.join(found)}. Every window and score"
                    " on it would be NaN. Drop or fix those samples before registering it (torch.isfinite(x) finds"
                    " them)."
                )
        if not self.estimator_spec.any_query and not self.queries:
            raise ValueError(
                "estimator='tracin' needs registered queries (queries={'val': val_batch_or_loader}): TracIn"
                " accumulates query-gradient dot products during training and cannot answer new queries later."
            )
        self.window_schedule  # noqa: B018 - validates the two settings
        if (self.window_every_n_steps or self.window_every_n_epochs) and not self.queries:
            raise ValueError(
                "Time windows score the registered queries: pass queries={'val': val_batch_or_loader} with"
                " window_every_n_steps / window_every_n_epochs."
            )

    @property
    def window_schedule(self) -> WindowSchedule:
        """When windows close."""
        return WindowSchedule(self.window_every_n_steps, self.window_every_n_epochs)

    @property
    def estimator_spec(self) -> EstimatorSpec:
        """What the chosen estimator can do (see :mod:`lightning_influence.estimators.registry`)."""
        return estimator_spec(self.estimator)

    @property
    def keeps_states(self) -> bool:
        """Whether the estimator propagates per-sample states (every estimator but ``"tracin"``)."""
        return self.estimator_spec.keeps_states

    def state_key_fields(self) -> dict[str, Any]:
        """What distinguishes two trackers on one Trainer (Lightning's ``state_key``)."""
        track = (
            "all" if self.track is None
            else "auto" if isinstance(self.track, str)
            else hashlib.sha1(self.track.numpy().tobytes()).hexdigest()[:12]
        )  # fmt: skip
        # only set options enter the key, so that trackers without them keep the keys of earlier checkpoints
        extra: dict[str, Any] = {"trajectory": True} if self.record_trajectory else {}
        if self.name is not None:
            extra["name"] = self.name
        if self.audits:
            ids = None if self.audit_ids is None else hashlib.sha1(self.audit_ids.numpy().tobytes()).hexdigest()[:12]
            extra["audit"] = (self.audit, self.audit_seed, ids)
        return {
            **extra,
            "estimator": self.estimator,
            "optimizer_model": self.optimizer_model,
            "track": track,
            "params": repr(self.params),
            "queries": sorted(self.queries),
            "windows": (self.window_every_n_steps, self.window_every_n_epochs),
        }
