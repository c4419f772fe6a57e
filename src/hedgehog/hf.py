"""Converted models as Hugging Face models: a registered config type and Auto classes.

``import hedgehog`` registers the config type ``hedgehog`` with ``AutoConfig`` and its model classes with
``AutoModelForCausalLM`` and ``AutoModel``, the way flash-linear-attention registers its models. A converted
directory's ``config.json`` is a :class:`HedgehogModelConfig`: the base model's whole config under
``base_config``, the conversion settings under ``hedgehog``, and the base's fingerprint. So

    import hedgehog
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("runs/smollm2-hedgehog/model")

rebuilds the base architecture from ``base_config``, swaps its attention for Hedgehog attention and loads every
weight from the directory's ``model.safetensors`` (no base model is read). Without hedgehog imported,
transformers does not know the ``hedgehog`` model type and refuses the directory; it never loads a softmax model.

A converted model is an instance of its base class (``LlamaForCausalLM``, ...) with a thin mixin on top
(:func:`hedgehog_class`): ``forward``, ``generate`` and peft behave as the base's, while ``save_pretrained`` (and so
``push_to_hub``) writes the hedgehog format.
"""
from __future__ import annotations

import sys
from typing import Dict, Optional

import torch.nn as nn
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM,
                          AutoModelForSequenceClassification, PretrainedConfig, PreTrainedModel)

MODEL_TYPE = "hedgehog"


class HedgehogModelConfig(PretrainedConfig):
    """``config.json`` of a converted model: ``base_config`` (the base model's config as a dict), ``hedgehog``
    (the :class:`~hedgehog.attention.HedgehogConfig`), ``converted_layers``, ``base_model`` (where it came from),
    ``base_fingerprint`` and ``conversion`` (what the job recorded: data, budgets, ...)."""

    model_type = MODEL_TYPE

    def __init__(self, base_config: Optional[Dict] = None, hedgehog: Optional[Dict] = None,
                 converted_layers=None, base_model: Optional[str] = None, base_fingerprint: Optional[Dict] = None,
                 lora: Optional[Dict] = None, conversion: Optional[Dict] = None, format_version: int = 2, **kwargs):
        self.base_config = dict(base_config or {})
        self.hedgehog = dict(hedgehog or {})
        self.converted_layers = converted_layers
        self.base_model = base_model
        self.base_fingerprint = base_fingerprint
        self.lora = lora
        self.conversion = dict(conversion or {})
        self.format_version = format_version
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


_FEATURE_KEYS = ("feature_map_q.", "feature_map_k.", "window_gate")


class HedgehogModelMixin:
    """Put in front of a converted model's own class: ``save_pretrained`` writes the hedgehog format."""

    _hedgehog_class = True

    def save_pretrained(self, save_directory, *args, tokenizer=None, **kwargs):
        from hedgehog.checkpoint import save_hf

        if args or kwargs.get("state_dict") is not None:
            raise TypeError("a converted model's save_pretrained takes the directory and keyword options only "
                            "(its weights come from the model; hedgehog merges LoRA itself)")
        kwargs.pop("state_dict", None)
        return save_hf(self, save_directory, tokenizer=tokenizer, **kwargs)

    def push_to_hub(self, repo_id: str, *, commit_message=None, commit_description=None, private=None, token=None,
                    revision=None, create_pr: bool = False, max_shard_size="50GB", tags=None) -> str:
        """transformers' ``push_to_hub``, except that the uploaded ``README.md`` is hedgehog's model card (base,
        method, measured fidelity, how to load) instead of a generic one written over it."""
        import tempfile

        from transformers.utils.hub import hf_api

        repo_id = hf_api().create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, max_shard_size=max_shard_size)
            return self._upload_modified_files(tmp, repo_id, files_timestamps={},
                                               commit_message=commit_message or "Upload hedgehog linear-attention model",
                                               token=token, create_pr=create_pr, revision=revision,
                                               commit_description=commit_description)


_CLASSES: Dict[type, type] = {}


def hedgehog_class(base_cls: type) -> type:
    """``Hedgehog<Base>`` = ``(HedgehogModelMixin, Base)``, made once per base class and importable from here."""
    if getattr(base_cls, "_hedgehog_class", False):
        return base_cls
    cls = _CLASSES.get(base_cls)
    if cls is None:
        name = "Hedgehog" + base_cls.__name__
        cls = type(name, (HedgehogModelMixin, base_cls), {
            "__module__": __name__,
            # the feature maps are not part of the base architecture: from_pretrained must not warn about them
            "_keys_to_ignore_on_load_unexpected": list(getattr(base_cls, "_keys_to_ignore_on_load_unexpected", None)
                                                       or []) + [r".*feature_map_[qk]\..*", r".*window_gate$"],
            # a bf16/fp16 load keeps the maps in float32, as they were trained (their softmax over features
            # and the running sums need the range)
            "_keep_in_fp32_modules": list(getattr(base_cls, "_keep_in_fp32_modules", None) or [])
            + ["feature_map_q", "feature_map_k", "window_gate"],
        })
        _CLASSES[base_cls] = cls
        setattr(sys.modules[__name__], name, cls)  # so pickle finds it
    return cls


def mark_converted(model: nn.Module) -> None:
    """Give a converted model its hedgehog class (in place)."""
    if isinstance(model, PreTrainedModel):
        model.__class__ = hedgehog_class(type(model))


def _from_pretrained(auto_cls, path, config: HedgehogModelConfig, *args, **kwargs):
    from hedgehog.attention import HedgehogConfig, hedgehog_layers
    from hedgehog.checkpoint import load_hf_weights
    from hedgehog.convert import convert_model, teacher_attn_implementation

    if args:
        raise TypeError("positional model arguments are not supported for hedgehog models")
    base_cfg = config.to_base_config()
    try:
        base_cls = auto_cls._model_mapping[type(base_cfg)]
    except KeyError:
        raise ValueError(f"{auto_cls.__name__} has no class for the base model type {base_cfg.model_type!r} "
                         f"of {path}") from None
    kwargs.setdefault("use_kernels", False)
    kwargs.setdefault("attn_implementation", teacher_attn_implementation(base_cfg))
    model = hedgehog_class(base_cls).from_pretrained(path, *args, config=base_cfg, **kwargs)
    convert_model(model, HedgehogConfig.from_dict(config.hedgehog))
    got = [layer.layer_idx for layer in hedgehog_layers(model)]
    if config.converted_layers is not None and got != list(config.converted_layers):
        raise ValueError(f"{path}: config.json records converted layers {config.converted_layers}, but its settings "
                         f"convert {got}; the file was edited or is from another version")
    load_hf_weights(model, path)
    model.config.hedgehog_origin = {"base_model": config.base_model, "base_fingerprint": config.base_fingerprint,
                                    "lora": config.lora, "conversion": config.conversion}
    model.eval()
    return model


def _auto_entry(name: str, auto_cls) -> type:
    """The class registered for ``auto_cls``: its ``from_pretrained`` returns the converted base-class model."""

    def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, **kwargs):
        if config is None:
            config = HedgehogModelConfig.from_pretrained(pretrained_model_name_or_path)
        return _from_pretrained(auto_cls, pretrained_model_name_or_path, config, *args, **kwargs)

    return type(name, (PreTrainedModel,), {
        "__module__": __name__, "config_class": HedgehogModelConfig, "from_pretrained": classmethod(from_pretrained),
        "__doc__": f"``{auto_cls.__name__}`` entry for converted models (``import hedgehog`` registers it)."})


HedgehogForCausalLM = _auto_entry("HedgehogForCausalLM", AutoModelForCausalLM)
HedgehogModel = _auto_entry("HedgehogModel", AutoModel)
HedgehogForSequenceClassification = _auto_entry("HedgehogForSequenceClassification",
                                                AutoModelForSequenceClassification)
HedgehogForMaskedLM = _auto_entry("HedgehogForMaskedLM", AutoModelForMaskedLM)
_ENTRIES = ((AutoModelForCausalLM, HedgehogForCausalLM), (AutoModel, HedgehogModel),
            (AutoModelForSequenceClassification, HedgehogForSequenceClassification),
            (AutoModelForMaskedLM, HedgehogForMaskedLM))


def entry_name(model) -> str:
    """The Auto entry that rebuilds ``model``'s class: recorded as ``architectures`` in ``config.json``."""
    names = [c.__name__ for c in type(model).__mro__]
    for suffix, entry in (("ForCausalLM", HedgehogForCausalLM), ("LMHeadModel", HedgehogForCausalLM),
                          ("ForSequenceClassification", HedgehogForSequenceClassification),
                          ("ForMaskedLM", HedgehogForMaskedLM)):
        if any(n.endswith(suffix) for n in names):
            return entry.__name__
    return HedgehogModel.__name__


def register() -> None:
    """Register the hedgehog config and model classes with transformers' Auto factories (idempotent)."""
    try:
        AutoConfig.register(MODEL_TYPE, HedgehogModelConfig)
    except ValueError:  # already registered
        pass
    for auto, cls in _ENTRIES:
        try:
            auto.register(HedgehogModelConfig, cls)
        except ValueError:
            pass


def is_hedgehog_config(d: Dict) -> bool:
    return d.get("model_type") == MODEL_TYPE
