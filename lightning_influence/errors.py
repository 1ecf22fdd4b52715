"""The errors the tracker raises for what it cannot model or what does not add up (besides
:class:`~lightning_influence.data.SampleIdError` and
:class:`~lightning_influence.optimizers.UnsupportedOptimizerError`). Each message names the problem and the fix."""


class InfluenceConfigurationError(RuntimeError):
    """The Trainer, module or optimizer is set up in a way the tracker cannot model exactly."""


class SelfCheckError(RuntimeError):
    """The tracker's model of the step does not reproduce what really happened."""


class NonFiniteInfluenceError(FloatingPointError):
    """NaN or inf appeared in the influence states."""
