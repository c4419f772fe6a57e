"""hedgehog: learned linear attention (Hedgehog, Zhang et al. ICLR 2024) for transformers."""
from hedgehog.layers.attention import HedgehogConfig, attention_mode, set_attention_mode
from hedgehog.models.loading import load
from hedgehog.models.convert import convert_model
from hedgehog.models.formats import save_converted
from hedgehog.modules.feature_maps import available_feature_maps, get_feature_map, register_feature_map
from hedgehog.modules.losses import attention_distillation_loss, attention_output_mse_loss
from hedgehog.ops import linear_attention, quadratic_linear_attention, recurrent_step

from hedgehog.models.hf import register as _register

_register()  # AutoConfig / AutoModelForCausalLM / AutoModel know the "hedgehog" model type

__version__ = "0.1.0"

__all__ = [
    "HedgehogConfig",
    "convert_model",
    "load",
    "save_converted",
    "attention_mode",
    "set_attention_mode",
    "available_feature_maps",
    "get_feature_map",
    "register_feature_map",
    "attention_distillation_loss",
    "attention_output_mse_loss",
    "linear_attention",
    "quadratic_linear_attention",
    "recurrent_step",
]
