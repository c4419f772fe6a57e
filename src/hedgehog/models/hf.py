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
(:func:`hedgehog.models.modelclass.hedgehog_class`): ``forward``, ``generate`` and peft behave as the base's, while
``save_pretrained`` (and so ``push_to_hub``) writes the hedgehog format. The config class lives in
:mod:`hedgehog.models.hf_config`.
"""
from __future__ import annotations

from typing import Optional

from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM,
                          AutoModelForSequenceClassification, PreTrainedModel)

from hedgehog.data.assets import hub_kwargs, resolve_model_path
from hedgehog.errors import CheckpointError
from hedgehog.layers.attention import HedgehogConfig, hedgehog_layers
from hedgehog.models.convert import convert_model, teacher_attn_implementation
from hedgehog.models.formats import check_fingerprint, load_hf_weights
from hedgehog.models.hf_config import ENTRY_NAMES, MODEL_TYPE, HedgehogModelConfig
from hedgehog.models.modelclass import hedgehog_class


def recorded_base(path, base_model: Optional[str], recorded: Optional[str], revision: Optional[str]):
    """``(resolved base, hub options)`` for a directory's base: ``base_model`` (a local copy, any revision) or the
    ``recorded`` one at its recorded ``revision``; neither is an error that names the fix."""
    if not (base_model or recorded):
        raise CheckpointError(f"{path} does not record its base model; pass it with base_model=/--base-model")
    return resolve_model_path(base_model or recorded), ({} if base_model else hub_kwargs(revision))


def _from_pretrained(auto_cls, path, config: HedgehogModelConfig, *args, **kwargs):
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
    # light directories: a local copy of the recorded base (not "base_model": transformers would set that config
    # attribute from the keyword)
    base_model = kwargs.pop("base_model_path", None)
    added = getattr(config, "weights", "all") == "added"
    if added:  # the base's weights come from the recorded base, checked by fingerprint
        base, hub = recorded_base(path, base_model, config.base_model, config.conversion.get("base_revision"))
        model = hedgehog_class(base_cls).from_pretrained(base, config=base_cfg, **{**kwargs, **hub})
        check_fingerprint(path, {"base_fingerprint": config.base_fingerprint, "base_model": config.base_model},
                          model, base)
    else:
        model = hedgehog_class(base_cls).from_pretrained(path, *args, config=base_cfg, **kwargs)
    convert_model(model, HedgehogConfig.from_dict(config.hedgehog))
    got = [layer.layer_idx for layer in hedgehog_layers(model)]
    if config.converted_layers is not None and got != list(config.converted_layers):
        raise ValueError(f"{path}: config.json records converted layers {config.converted_layers}, but its settings "
                         f"convert {got}; the file was edited or is from another version")
    load_hf_weights(model, path, added=added)
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
assert {e.__name__ for _, e in _ENTRIES} == set(ENTRY_NAMES.values()) | {"HedgehogModel"}


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


