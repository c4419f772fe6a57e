"""What both training stages' loops share: the engine a stage runs on, the per-step record, the time cap."""
from __future__ import annotations

import logging
import time
from typing import Dict, List, Optional

import torch.nn as nn

from hedgehog.train.engine import Engine

log = logging.getLogger("hedgehog")


def engine_for(model: nn.Module, engine: Optional[Engine], progress: bool) -> Engine:
    """The caller's engine, or a one-process one on the device the model is on."""
    if engine is not None:
        return engine
    p = next(model.parameters(), None)
    return Engine(str(p.device) if p is not None else "cpu", progress=progress)


def record_step(rec: Dict, history: List[Dict], bar, callback, save) -> None:
    """After a step: keep the record, advance the bar, call the caller back, save when due (``save`` falsy: not)."""
    history.append(rec)
    bar.update(1)
    bar.set_postfix(loss=f"{rec['loss']:.3f}")
    if callback:
        callback(rec)
    if save:
        save()


def time_cap_hit(stage: str, cfg, t0: float, tokens: int, planned: int) -> bool:
    if not cfg.time_budget_s or time.perf_counter() - t0 <= cfg.time_budget_s:
        return False
    log.warning("%s: the time cap of %.1f min ended the stage early, after %d of %d planned tokens",
                stage, cfg.time_budget_s / 60, tokens, planned)
    return True
