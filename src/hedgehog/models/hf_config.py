"""``config.json`` of a converted model (model type ``hedgehog``) and the names its directory uses.

A leaf of the model layer: :mod:`hedgehog.models.formats` writes this config, :mod:`hedgehog.models.hf` registers it with
transformers' Auto classes.
"""
from __future__ import annotations

from typing import Dict, Optional

from transformers import AutoConfig, PretrainedConfig

MODEL_TYPE = "hedgehog"


class HedgehogModelConfig(PretrainedConfig):
    """``config.json`` of a converted model: ``base_config`` (the base model's config as a dict), ``hedgehog``
    (the :class:`~hedgehog.layers.attention.HedgehogConfig`), ``converted_layers``, ``base_model`` (where it came from),
    ``base_fingerprint`` and ``conversion`` (what the job recorded: data, budgets, ...)."""

    model_type = MODEL_TYPE

    def __init__(self, base_config: Optional[Dict] = None, hedgehog: Optional[Dict] = None,
                 converted_layers=None, base_model: Optional[str] = None, base_fingerprint: Optional[Dict] = None,
                 lora: Optional[Dict] = None, conversion: Optional[Dict] = None, format_version: int = 2,
                 weights: str = "all", **kwargs):
        self.base_config = dict(base_config or {})
        self.hedgehog = dict(hedgehog or {})
        self.converted_layers = converted_layers
        self.base_model = base_model
        self.base_fingerprint = base_fingerprint
        self.lora = lora
        self.conversion = dict(conversion or {})
        self.format_version = format_version
        self.weights = weights  # "all": every weight here; "added": only what conversion changed, on base_model
        for k in ("tie_word_embeddings", "is_encoder_decoder"):  # the base's, so generation and tying agree
            if k in self.base_config:
                kwargs.setdefault(k, self.base_config[k])
        super().__init__(**kwargs)

    def to_base_config(self) -> PretrainedConfig:
        """The base model's config object (``LlamaConfig``, ...), carrying the conversion settings as ``hedgehog``."""
        d = {k: v for k, v in self.base_config.items() if k not in ("transformers_version", "hedgehog")}
        model_type = d.pop("model_type", None)
        if model_type is None:
            raise ValueError("this hedgehog config has no base_config.model_type: the directory is incomplete")
        cfg = AutoConfig.for_model(model_type, **d)
        cfg.hedgehog = dict(self.hedgehog)
        return cfg


FEATURE_KEYS = ("feature_map_q.", "feature_map_k.", "window_gate", "state_decay")


def is_hedgehog_config(d: Dict) -> bool:
    return d.get("model_type") == MODEL_TYPE


ENTRY_NAMES = {"ForCausalLM": "HedgehogForCausalLM", "LMHeadModel": "HedgehogForCausalLM",
               "ForSequenceClassification": "HedgehogForSequenceClassification", "ForMaskedLM": "HedgehogForMaskedLM"}


def entry_name(model) -> str:
    """The Auto entry (a class of :mod:`hedgehog.models.hf`) that rebuilds ``model``'s class: recorded as
    ``architectures`` in ``config.json``."""
    names = [c.__name__ for c in type(model).__mro__]
    for suffix, entry in ENTRY_NAMES.items():
        if any(n.endswith(suffix) for n in names):
            return entry
    return "HedgehogModel"
