"""The errors the tracker raises for what it cannot model or what does not add up (besides
:class:`~lightning_influence.data.SampleIdError` and
:class:`~lightning_influence.optimizers.UnsupportedOptimizerError`). Each message names the problem and the fix."""


class InfluenceConfigurationError(RuntimeError):
    """The Trainer, module or optimizer is set up in a way the tracker cannot model exactly."""


class SelfCheckError(RuntimeError):
    """The tracker's model of the step does not reproduce what really happened."""


class NonFiniteInfluenceError(FloatingPointError):
    """NaN or inf appeared in the influence states."""


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
            "loss_fn calls a random operation (e.g. F.dropout, torch.rand): the tracker cannot replay the draws the"
            " training step used, so its gradients and Hessians would differ. Make loss_fn deterministic."
        )
    return None
