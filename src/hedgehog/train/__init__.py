"""Training: the one engine every loop runs on (:mod:`hedgehog.train.engine`)."""
from hedgehog.train.engine import Engine, cycle_batches, lr_factor, resolve_device

__all__ = ["Engine", "cycle_batches", "lr_factor", "resolve_device"]
