"""What the tracker answers, as plain values: :class:`~lightning_influence.results.result.InfluenceResult`,
time windows, influence-dynamics patterns, audit metrics, selection decisions, previews. No Lightning."""
