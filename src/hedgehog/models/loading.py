"""Load converted models whole: ``(model, tokenizer)`` from either layout of :mod:`hedgehog.models.formats`, and the
teacher (the softmax base) a directory was converted from, checked against its recorded fingerprint.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import torch
from safetensors.torch import load_file

from hedgehog.data.assets import PLAIN_LOAD, hub_kwargs, resolve_model_path
from hedgehog.layers.attention import HedgehogConfig
from hedgehog.models.convert import convert_model, teacher_attn_implementation
from hedgehog.models.hf import recorded_base, register as register_auto_classes
from hedgehog.models.formats import (FEATURES_NAME, MERGED_NAME, BaseModelMismatchError, check_fingerprint,
                              check_weight_files, load_feature_map_state, read_checked, read_meta)

__all__ = ["BaseModelMismatchError", "load", "load_base", "load_teacher", "needs_separate_teacher"]


def load(path, base_model: Optional[str] = None, dtype=torch.float32, device="cpu", merge_lora: bool = True):
    """Load a converted model saved by :func:`save_converted` -> ``(model, tokenizer)``.

    Both layouts load through ``AutoModelForCausalLM``: the hf one alone, a light one onto its base, which
    ``base_model`` may override (e.g. a local copy of it); a base whose fingerprint differs from the recorded one
    is refused. Directories of the earlier light layout (``hedgehog_config.json``) load too: there a LoRA
    adapter is merged into the weights by default, and ``merge_lora=False`` keeps the peft wrapper.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path).expanduser()
    meta = read_meta(path)
    if meta["format"] == "hf":
        register_auto_classes()
        check_weight_files(path)
        model = read_checked(path, lambda _: AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype, **({"base_model_path": base_model} if base_model else {}), **PLAIN_LOAD))
        model.to(device).eval()
        return model, _tokenizer(path, base_model or meta.get("base_model"))
    model, base = _load_base_checked(path, meta, base_model, dtype, device)
    hh = HedgehogConfig.from_dict(meta["hedgehog"])
    hh.layers = meta.get("converted_layers", hh.layers)
    convert_model(model, hh)
    load_feature_map_state(model, read_checked(path / FEATURES_NAME, lambda p: load_file(str(p))))
    lora = meta.get("lora")
    if lora:
        if lora.get("merged"):
            merged = read_checked(path / MERGED_NAME, lambda p: load_file(str(p)))
            missing = [k for k in merged if k not in dict(model.named_parameters())]
            if missing:
                raise ValueError(f"merged LoRA weights name unknown parameters: {missing[:3]}")
            params = dict(model.named_parameters())
            with torch.no_grad():
                for k, t in merged.items():
                    params[k].copy_(t)
        else:
            from peft import PeftModel

            model = read_checked(path / "adapter_model.safetensors", lambda _: PeftModel.from_pretrained(model, str(path)))
            if merge_lora:
                model = model.merge_and_unload()
    model.to(device).eval()
    return model, _tokenizer(path, base)


def load_teacher(path, base_model: Optional[str] = None, dtype=torch.float32, device="cpu"):
    """The softmax base a converted directory was made from (its teacher), checked against the recorded
    fingerprint. ``base_model`` overrides the recorded location (a local copy of the same weights)."""
    return _load_base_checked(path, read_meta(path), base_model, dtype, device)[0]


def _load_base_checked(path, meta: Dict, base_model: Optional[str], dtype, device):
    """``(model, resolved base)``: the recorded base (or ``base_model``) at its recorded revision, loaded with the
    attention implementation that makes it its own exact teacher, refused when its fingerprint differs."""
    base, hub = recorded_base(path, base_model, meta.get("base_model"), meta.get("base_revision"))
    model = _softmax_model(base, hub, dtype).to(device)
    check_fingerprint(path, meta, model, base)
    return model, base


def _softmax_model(path: str, hub: Dict, dtype):
    """The plain softmax model at ``path``, with the attention implementation that makes it its own exact teacher."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=teacher_attn_implementation(
        path, **hub), **PLAIN_LOAD, **hub).eval()


def load_base(model_name: str, revision: Optional[str] = None, trust_remote_code: bool = False,
              dtype: torch.dtype = torch.float32):
    """``(model, tokenizer, path)``: the softmax model ``--model`` names (alias, directory, .gguf or hub id at
    ``revision``), loaded as its own teacher, and its tokenizer."""
    from transformers import AutoTokenizer

    path = resolve_model_path(model_name)
    hub = hub_kwargs(revision, trust_remote_code)
    return _softmax_model(path, hub, dtype), AutoTokenizer.from_pretrained(path, **hub), path


def needs_separate_teacher(path) -> bool:
    """True when the saved weights are not the base's (LoRA merged in), so teacher mode is not the teacher."""
    meta = read_meta(path)
    lora = meta.get("lora")
    return bool(lora) and (meta["format"] == "hf" or lora.get("merged", False))


def _tokenizer(path: Path, base: Optional[str]):
    """The tokenizer saved with a converted model, else its base's, else None (with a warning)."""
    from transformers import AutoTokenizer

    for src in (str(path), base):
        if not src:
            continue
        try:
            return AutoTokenizer.from_pretrained(src)
        except Exception:  # no tokenizer files there
            continue
    import logging

    logging.getLogger("hedgehog").warning("no tokenizer found in %s or %s; returning tokenizer=None", path, base)
    return None
