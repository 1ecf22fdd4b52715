"""The public API after the move into rooms: what 0.1.0 users imported still imports (internal names and the flat
module paths with a DeprecationWarning), and every error shares one base class."""

from __future__ import annotations

import importlib
import sys
import warnings

import pytest

import lightning_influence as li
from lightning_influence import errors
from lightning_influence._legacy_modules import LEGACY_MODULES


def test_every_public_name_imports_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in li.__all__:
            assert getattr(li, name) is not None, name
    assert {"AuditReport", "load_audit", "InfluenceError"} <= set(li.__all__)


@pytest.mark.parametrize(
    ("name", "room"),
    [
        ("InfluenceEngine", "lightning_influence.estimators.engine"),
        ("TracInAccumulator", "lightning_influence.estimators.tracin"),
        ("AdamJacobian", "lightning_influence.optimizers"),
        ("AdamWJacobian", "lightning_influence.optimizers"),
        ("SGDJacobian", "lightning_influence.optimizers"),
    ],
)
def test_internal_top_level_names_of_0_1_0_warn_and_point_to_their_room(name, room):
    with pytest.warns(DeprecationWarning, match=room):
        value = getattr(li, name)
    assert value is getattr(importlib.import_module(room), name)
    assert name not in li.__all__


def test_an_unknown_top_level_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'engine_v2'"):
        li.engine_v2  # noqa: B018


@pytest.mark.parametrize("old", sorted(LEGACY_MODULES))
def test_the_flat_module_paths_of_0_1_0_import_with_a_warning(old, monkeypatch):
    new = importlib.import_module(f"lightning_influence.{LEGACY_MODULES[old]}")
    monkeypatch.delitem(sys.modules, f"lightning_influence.{old}", raising=False)
    with pytest.warns(DeprecationWarning, match=f"lightning_influence.{old} moved to"):
        module = importlib.import_module(f"lightning_influence.{old}")
    assert module is new and module.__name__ == new.__name__  # the room's module itself, its identity intact


def test_the_rooms_that_kept_a_flat_modules_name_still_export_its_names():
    from lightning_influence.estimators import Estimator, NoStates
    from lightning_influence.estimators.base import Estimator as BaseEstimator
    from lightning_influence.reporting import log_window, metric_key
    from lightning_influence.reporting.windows import log_window as window_logger
    from lightning_influence.trajectory import Trajectory, load_trajectory
    from lightning_influence.trajectory.reader import load_trajectory as read_trajectory

    # the package's load_trajectory is the reader's with Lightning Fabric's launcher for devices=N
    assert Trajectory is li.Trajectory and load_trajectory is read_trajectory
    assert Estimator is BaseEstimator and issubclass(NoStates, Estimator)
    assert log_window is window_logger and callable(metric_key)


@pytest.mark.parametrize(
    ("error", "builtin"),
    [
        (errors.InfluenceConfigurationError, RuntimeError),
        (errors.SelfCheckError, RuntimeError),
        (errors.NonFiniteInfluenceError, FloatingPointError),
        (errors.SampleIdError, ValueError),
        (errors.UnsupportedOptimizerError, ValueError),
        (errors.ReplayMismatchError, RuntimeError),
        (errors.UnfinishedTrajectoryError, RuntimeError),
        (errors.FolderInUseError, RuntimeError),
        (errors.DamagedFileError, ValueError),
        (errors.TrajectoryWriteError, OSError),
        (errors.ReplayInputError, ValueError),
    ],
)
def test_every_error_has_the_one_base_class_and_keeps_its_builtin_base(error, builtin):
    assert issubclass(error, li.InfluenceError) and issubclass(error, builtin)
    assert getattr(li, error.__name__) is error


def test_no_other_exception_class_is_defined_in_the_package():
    import inspect
    import pkgutil

    found = set()
    for info in pkgutil.walk_packages(li.__path__, "lightning_influence."):
        if info.name.rpartition(".")[2] in LEGACY_MODULES and info.name.count(".") == 1:
            continue
        module = importlib.import_module(info.name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__.startswith("lightning_influence"):
                found.add(obj)
    assert found and all(issubclass(e, li.InfluenceError) for e in found), found
    assert {e.__module__ for e in found} == {"lightning_influence.errors"}
