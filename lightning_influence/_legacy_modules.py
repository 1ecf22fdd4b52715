"""The module paths of release 0.1.0's flat package, importable for one more release with a ``DeprecationWarning``.

``import lightning_influence.result`` (say) finds the module's new room, warns once, and gives the new module itself,
so ``from lightning_influence.result import InfluenceResult`` keeps working. Nothing else of the package uses it.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType
from typing import Any, Sequence

LEGACY_MODULES = {
    "data": "sample_ids",
    "callback": "callbacks.tracker",
    "selector": "callbacks.selector",
    "exclusion": "callbacks.exclusion",
    "offline": "callbacks.offline",
    "outputs": "callbacks.outputs",
    "audit_log": "reporting.audit",
    "selection_io": "io.selection",
    "fit": "core.fit",
    "fit_state": "core.state",
    "fit_audit": "core.audit",
    "build": "core.build",
    "config": "core.config",
    "memory_probe": "core.memory",
    "answers": "core.answers",
    "interrupts": "core.interrupts",
    "selfcheck": "core.selfcheck",
    "engine": "estimators.engine",
    "exact": "estimators.exact",
    "tracin": "estimators.tracin",
    "functional": "autodiff.functional",
    "hvp_plan": "autodiff.hvp_plan",
    "parameters": "autodiff.parameters",
    "queries": "autodiff.queries",
    "clipping": "optimizers.clipping",
    "trajectory_format": "trajectory.format",
    "trajectory_fingerprint": "trajectory.fingerprint",
    "trajectory_writer": "trajectory.writer",
    "recording": "trajectory.recorder",
    "replay": "trajectory.replay",
    "replay_steps": "trajectory.steps",
    "replay_windows": "trajectory.windows",
    "adjoint": "trajectory.adjoint",
    "result": "results.result",
    "windows": "results.windows",
    "patterns": "results.patterns",
    "audit_metrics": "results.audit",
    "audit": "results.audit",
    "selection": "results.selection",
    "previews": "results.previews",
    "files": "io.files",
    "artifacts": "io.artifacts",
    "artifacts_format": "io.artifacts_reader",
    "audit_io": "io.audit",
}
"""0.1.0 module (under ``lightning_influence.``) → its room now. ``estimators``, ``trajectory`` and ``reporting`` kept
their names as rooms, which re-export what their flat modules held."""


class _Loader(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: Any) -> ModuleType:
        module = importlib.import_module(self.target)
        self._spec = module.__spec__  # the import system overwrites it with the old path's spec: put back below
        return module

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__ = self._spec  # the new module is already executed; it keeps its own identity


class LegacyModuleFinder(importlib.abc.MetaPathFinder):
    """Finds ``lightning_influence.<0.1.0 name>`` and hands out the module of its room, with a warning."""

    def find_spec(self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None) -> Any:
        package, _, name = fullname.rpartition(".")
        if package != "lightning_influence" or name not in LEGACY_MODULES:
            return None
        new = f"lightning_influence.{LEGACY_MODULES[name]}"
        warnings.warn(
            f"{fullname} moved to {new}; the old path works for one more release. Import public names from"
            " lightning_influence itself where you can.",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.util.spec_from_loader(fullname, _Loader(new))


def install() -> None:
    """Put the finder at the end of ``sys.meta_path`` (once): real modules are always found first."""
    if not any(isinstance(finder, LegacyModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(LegacyModuleFinder())
