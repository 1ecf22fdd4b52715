"""One fit: the validated configuration, building its parts, :class:`~lightning_influence.core.fit.TrackedFit`,
its bookkeeping and checkpoints, the memory plan, the self-check and the answers after fit. No Lightning."""
