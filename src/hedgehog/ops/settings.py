"""The two small settings objects the attention functions, losses and metrics share.

:class:`TeacherSettings` is the softmax attention a student is measured against (its logit scale, and the
model's own sliding window and logit soft-cap where it has them). :class:`HybridSettings` is the hybrid
student's exact part (window, per-head window factor gamma, sink tokens) and the decay of its linear state.
A converted layer builds them (``HedgehogAttention.teacher`` / ``.hybrid_settings()``); the functions below
take them whole instead of loose keyword bundles.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Union

import torch

Gamma = Union[float, torch.Tensor]


@dataclass(frozen=True)
class TeacherSettings:
    """``scale``: the logit scale (None: ``d ** -0.5``); ``window``: the teacher's own sliding window (query ``i``
    sees keys ``j > i - window``; None: all earlier keys); ``softcap``: its logit soft-cap (None: none)."""

    scale: Optional[float] = None
    window: Optional[int] = None
    softcap: Optional[float] = None

    def scale_for(self, head_dim: int) -> float:
        return head_dim ** -0.5 if self.scale is None else self.scale

    def masking(self) -> Dict[str, Any]:
        """The window / soft-cap as :func:`hedgehog.ops.softmax.softmax_attention_weights` takes them (only those
        set)."""
        return {k: v for k, v in (("sliding_window", self.window), ("softcap", self.softcap)) if v is not None}


@dataclass(frozen=True, eq=False)
class HybridSettings:
    """The hybrid student (:mod:`hedgehog.ops.hybrid`): exact softmax over the last ``window`` keys (and the first
    ``sinks``), scaled per query head by ``gamma`` (a scalar or (H,), differentiable); older keys through the
    feature maps, their state decayed by ``exp(decay)`` per token (``decay``: (H,) log-factors, None: no decay)."""

    window: int
    gamma: Gamma = 0.5
    sinks: int = 0
    decay: Optional[torch.Tensor] = None

    def op_kwargs(self) -> Dict[str, Any]:
        """``window``, ``gamma``, ``sinks``, ``decay`` as the hybrid ops take them."""
        return dict(window=self.window, gamma=self.gamma, sinks=self.sinks, decay=self.decay)
