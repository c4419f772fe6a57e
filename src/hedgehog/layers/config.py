"""What a converted layer is (:class:`HedgehogConfig`, saved with every converted model) and what it computes
now (:class:`Mode`)."""
from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Optional

from hedgehog.ops.sparse_cache import SCORES as SPARSE_SCORES

ATTENTIONS = ("linear", "hybrid")


class Mode(enum.StrEnum):
    """What a converted layer computes (``attention_mode(model, mode)``)."""

    TEACHER = "teacher"  # the original softmax attention, exactly
    STUDENT = "student"  # the converted attention: linear, or the hybrid
    DISTILL = "distill"  # the teacher's output; this layer's distillation loss in .distill_loss
    MIMIC = "mimic"  # the student's output; the maps' loss against the detached teacher in .distill_loss
    BASELINE = "baseline"  # the teacher limited to its last keys and first sinks (the no-training baseline)

    @classmethod
    def of(cls, mode) -> "Mode":
        """``mode`` as a Mode; also takes the earlier names "softmax", "linear" and "window"."""
        try:
            return cls(_OLD_NAMES.get(mode, mode))
        except ValueError:
            raise ValueError(f"unknown attention mode {mode!r}; choose one of {[m.value for m in cls]}") from None


_OLD_NAMES = {"softmax": "teacher", "linear": "student", "window": "baseline"}
MODES = tuple(m.value for m in Mode)


@dataclass
class HedgehogConfig:
    """What conversion does; saved with every converted model."""

    feature_map: str = "hedgehog"
    feature_map_kwargs: Dict[str, Any] = field(default_factory=dict)
    chunk_size: int = 64
    # Inputs to the feature maps are q * qk_scale and k * qk_scale. 1.0 (raw post-RoPE q/k) fitted the
    # softmax teacher better at identity init than d^-1/2 on SmolLM2.
    qk_scale: float = 1.0
    distill_loss: str = "ce"  # "ce" (Hedgehog) or "mse" (LoLCATs output MSE)
    layers: Optional[list] = None  # layer indices to convert; None = all
    # "linear": every key through the feature maps. "hybrid" (LoLCATs): the last `window` keys with exact
    # softmax, scaled per head by sigmoid(window_gate), older keys through the feature maps.
    attention: str = "linear"
    window: int = 64
    window_gate_init: float = 0.0  # sigmoid(0) = 0.5
    # Long context (hybrid only; the defaults keep the plain LoLCATs hybrid, which models saved before these
    # settings existed load as). `sinks`: the first keys stay in the exact softmax part after they leave the
    # window (StreamingLLM's attention sinks). `state_decay`: the initial per-KV-head factor lambda of a
    # decayed linear state, S_n = lambda S_{n-1} + phi(k) v^T (learned as sigmoid of a logit; None: no decay),
    # which bounds the linear part's mass so that it stays what it was at the training length.
    sinks: int = 0
    state_decay: Optional[float] = None
    # Hybrid only (LoLA): `sparse_cache` older keys per KV head stay exact, those the linear state reads back worst,
    # chosen every `sparse_chunk` tokens (hedgehog.ops.sparse_cache), in training as at inference. 0: none.
    # `sparse_score`: read back by the state with the other candidates folded ("memory") or as it is ("state", LoLA),
    # or "unique": "memory", and a value another exact entry holds as well leaves too.
    sparse_cache: int = 0
    sparse_chunk: int = 32
    sparse_score: str = "unique"

    def __post_init__(self):
        if self.attention not in ATTENTIONS:
            raise ValueError(f"unknown attention kind {self.attention!r}; choose one of {ATTENTIONS}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.sinks < 0:
            raise ValueError(f"sinks must be >= 0, got {self.sinks}")
        if self.state_decay is not None and not 0.0 < self.state_decay < 1.0:
            raise ValueError(f"state_decay must be in (0, 1) (or None for no decay), got {self.state_decay}")
        if self.sparse_cache < 0 or self.sparse_chunk < 1:
            raise ValueError(f"sparse_cache must be >= 0 and sparse_chunk >= 1, got {self.sparse_cache} and "
                             f"{self.sparse_chunk}")
        if self.sparse_score not in SPARSE_SCORES:
            raise ValueError(f"unknown sparse_score {self.sparse_score!r}; choose one of {SPARSE_SCORES}")
        if (self.sinks or self.state_decay is not None or self.sparse_cache) and self.attention != "hybrid":
            raise ValueError("sinks, state_decay and sparse_cache apply to the hybrid attention (attention='hybrid')")

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "HedgehogConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)
