"""Pure tensor functions: linear and hybrid attention (reference, chunked, recurrent), softmax attention, masks."""
from hedgehog.ops.linear_attention import (
    DEFAULT_EPS,
    feature_linear_attention,
    kernel_linear_attention,
    linear_attention,
    quadratic_linear_attention,
)
from hedgehog.ops.hybrid import feature_hybrid_attention, hybrid_attention, quadratic_hybrid_attention
from hedgehog.ops.recurrent import hybrid_recurrent_step, packed_recurrent_step, recurrent_step, ring_hybrid_step
from hedgehog.ops.softmax import softmax_attention, softmax_attention_weights
from hedgehog.ops.window import window_softmax_attention

__all__ = [
    "DEFAULT_EPS",
    "feature_hybrid_attention",
    "feature_linear_attention",
    "hybrid_attention",
    "hybrid_recurrent_step",
    "quadratic_hybrid_attention",
    "kernel_linear_attention",
    "linear_attention",
    "packed_recurrent_step",
    "quadratic_linear_attention",
    "recurrent_step",
    "ring_hybrid_step",
    "softmax_attention",
    "softmax_attention_weights",
    "window_softmax_attention",
]
