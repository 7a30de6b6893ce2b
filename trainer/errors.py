"""Errors of a training run that the CLIs turn into one line (config errors live in trainer.config)."""
from __future__ import annotations


class NonFiniteError(RuntimeError):
    """Loss or gradients became NaN/inf and the config says to halt."""
