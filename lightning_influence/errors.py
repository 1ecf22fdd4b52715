"""Every error the package raises for what it cannot model or what does not add up, under one base class.

Catch :class:`InfluenceError` for all of them. Each also derives from the built-in error it was before the
base class existed (``ValueError``, ``RuntimeError``, ``FloatingPointError``), so older ``except`` clauses
still catch it. Each message names the problem and the fix.
"""


class InfluenceError(Exception):
    """Base class of every error of lightning-influence."""


class InfluenceConfigurationError(InfluenceError, RuntimeError):
    """The Trainer, module or optimizer is set up in a way the tracker cannot model exactly."""


class SelfCheckError(InfluenceError, RuntimeError):
    """The tracker's model of the step does not reproduce what really happened."""


class NonFiniteInfluenceError(InfluenceError, FloatingPointError):
    """NaN or inf appeared in the influence states."""


class SampleIdError(InfluenceError, ValueError):
    """A training batch whose sample ids are missing, malformed, out of range or repeated."""


class UnsupportedOptimizerError(InfluenceError, ValueError):
    """The optimizer, or one of its options, cannot be modelled exactly."""


class ReplayMismatchError(InfluenceError, RuntimeError):
    """A replayed step does not reproduce the recorded one (its parameters or its gradient)."""


def explain_torch_func_error(err: RuntimeError) -> Exception | None:
    """torch.func's errors for what the tracker cannot differentiate, in the user's terms (None for others)."""
    if "saved tensor hooks" in str(err):
        return InfluenceConfigurationError(
            "The model uses gradient checkpointing (torch.utils.checkpoint): torch.func, which the tracker uses for"
            " its Hessian-vector products and per-sample terms, cannot differentiate through it. Disable"
            " checkpointing for the tracked run (activation memory grows), or track a smaller model."
        )
    if "random" in str(err):
        return InfluenceConfigurationError(
            "The loss draws random numbers outside a dropout layer (e.g. F.dropout or torch.rand in forward or"
            " loss_fn): the tracker replays the draws of nn.Dropout modules, and cannot tell that this forward draws"
            " too, so its gradients and Hessians would differ. Use an nn.Dropout module (it may sit anywhere in the"
            " model), or make the loss deterministic."
        )
    return None


class TrajectoryWriteError(InfluenceError, OSError):
    """Writing a file of a recorded trajectory failed (a full disk, a lost mount, no permission): the message names
    the file, the optimizer step and the operating system's reason (``errno`` and ``filename`` are set as well).
    The trajectory is left unfinished."""

    def __str__(self) -> str:  # the message, not OSError's "[Errno n] strerror: filename"
        return str(self.args[0]) if self.args else ""


class DamagedFileError(InfluenceError, ValueError):
    """A file the package wrote (a trajectory checkpoint, its final state, a batch) cannot be read back: truncated,
    overwritten or not a file of this package."""


class UnfinishedTrajectoryError(InfluenceError, RuntimeError):
    """A replay of a trajectory whose writer did not finish: the run crashed, was killed, or is still running."""


class FolderInUseError(InfluenceError, RuntimeError):
    """Another live run writes this folder (its lock file names the process)."""


class ReplayInputError(InfluenceError, ValueError):
    """What a replay was given (the training set) cannot reproduce the recorded trajectory."""
