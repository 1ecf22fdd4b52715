"""The estimators behind one base class with capability flags, registered by name (``"acc"``,
``"first-order"``, ``"exact"``, ``"tracin"``): see :mod:`lightning_influence.estimators.registry`. No Lightning."""
