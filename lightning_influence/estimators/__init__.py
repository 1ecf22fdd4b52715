"""The estimators behind one base class with capability flags, registered by name (``"acc"``,
``"first-order"``, ``"exact"``, ``"tracin"``): see :mod:`lightning_influence.estimators.registry`. No Lightning.

The names of 0.1.0's flat ``lightning_influence.estimators`` module are importable from here.
"""

from lightning_influence.estimators.base import Estimator, NoStates, QueryProbe, Reduce

__all__ = ["Estimator", "NoStates", "QueryProbe", "Reduce"]
