"""hedgehog: learned linear attention (Hedgehog, Zhang et al. ICLR 2024) for transformers."""
from hedgehog.feature_maps import available_feature_maps, get_feature_map, register_feature_map
from hedgehog.losses import attention_distillation_loss, attention_output_mse_loss
from hedgehog.ops import linear_attention, quadratic_linear_attention, recurrent_step

__version__ = "0.1.0"

__all__ = [
    "available_feature_maps",
    "get_feature_map",
    "register_feature_map",
    "attention_distillation_loss",
    "attention_output_mse_loss",
    "linear_attention",
    "quadratic_linear_attention",
    "recurrent_step",
]
