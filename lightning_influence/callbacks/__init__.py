"""The Lightning room: the callbacks (hooks of a few lines each) and the one module that probes the Trainer.

Only this room and :mod:`lightning_influence.reporting` (logger classes) import Lightning; everything they
call below them works on plain tensors and records.
"""
