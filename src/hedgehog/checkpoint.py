"""Save / load converted models: one format, safetensors, written atomically.

A converted-model directory holds:

- ``hedgehog_config.json``: format version, the base model (path or id), a fingerprint of the base
  (architecture numbers + a checksum of its embedding matrix), the ``HedgehogConfig`` and the LoRA
  settings;
- ``feature_maps.safetensors``: every converted layer's feature-map tensors (parameters and buffers);
- with LoRA, either ``adapter_model.safetensors`` + ``adapter_config.json`` (peft's adapter format) or,
  with ``merge_lora=True``, ``merged_attention.safetensors``: the attention projections with LoRA merged;
- the tokenizer files.

Loading rebuilds base model -> conversion -> feature maps -> LoRA, so logits equal the saved model's.
A base model whose fingerprint differs is refused.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from hedgehog.attention import HedgehogConfig, hedgehog_layers
from hedgehog.errors import CheckpointError, MissingPathError

FORMAT_VERSION = 1
CONFIG_NAME = "hedgehog_config.json"
FEATURES_NAME = "feature_maps.safetensors"
MERGED_NAME = "merged_attention.safetensors"


class BaseModelMismatchError(CheckpointError):
    """The base model given for a converted directory is not the one it was converted from."""


def _read(path: Path, reader):
    """``reader(path)``, with a missing, truncated or corrupt file reported as a :class:`CheckpointError`."""
    try:
        return reader(path)
    except Exception as e:
        raise CheckpointError(
            f"{path} cannot be read ({type(e).__name__}: {str(e)[:200]}): the converted model is incomplete or "
            "corrupt (an interrupted copy?). Copy it again, or re-create it with `hedgehog convert`.") from e


def base_fingerprint(model: nn.Module) -> Dict:
    """Architecture numbers + sha1 of the input embedding matrix: identifies the base weights."""
    cfg = model.config
    emb = model.get_input_embeddings().weight.detach().float().cpu().contiguous()
    return {
        "model_type": cfg.model_type,
        "hidden_size": getattr(cfg, "hidden_size", None),
        "num_hidden_layers": getattr(cfg, "num_hidden_layers", None),
        "num_attention_heads": getattr(cfg, "num_attention_heads", None),
        "vocab_size": getattr(cfg, "vocab_size", None),
        "embedding_sha1": hashlib.sha1(emb.numpy().tobytes()).hexdigest(),
    }


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def feature_map_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    state = {}
    for layer in hedgehog_layers(model):
        for prefix, fm in layer.trainable_modules().items():
            for name, t in fm.state_dict().items():
                state[f"layers.{layer.layer_idx}.{prefix}.{name}"] = t.detach().cpu().contiguous()
    return state


def load_feature_map_state(model: nn.Module, state: Dict[str, torch.Tensor]) -> None:
    layers = {layer.layer_idx: layer for layer in hedgehog_layers(model)}
    per_module: Dict[Tuple[int, str], Dict[str, torch.Tensor]] = {}
    for key, t in state.items():
        _, idx, prefix, name = key.split(".", 3)
        per_module.setdefault((int(idx), prefix), {})[name] = t
    modules = {(i, p): m for i, layer in layers.items() for p, m in layer.trainable_modules().items()}
    expected = {key for key, m in modules.items() if m.state_dict()}
    have = set(per_module)
    if expected != have:
        raise ValueError(f"feature-map checkpoint covers layers/maps {sorted(have)[:6]}..., model expects "
                         f"{sorted(expected)[:6]}...")
    for key, sd in per_module.items():
        modules[key].load_state_dict(sd, strict=True)


def _atomic_write_dir(out_dir: Path):
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))


def save_converted(model: nn.Module, out_dir, base_model: str, tokenizer=None, merge_lora: bool = False,
                   extra: Optional[Dict] = None) -> Path:
    """Write a converted (optionally LoRA-wrapped) model to ``out_dir`` atomically (temp dir + rename)."""
    out_dir = Path(out_dir)
    inner = _unwrap(model)
    layers = hedgehog_layers(inner)
    if not layers:
        raise ValueError("model has no Hedgehog attention layers; convert it before saving")
    hh_cfg = layers[0].hh_config
    is_peft = hasattr(model, "get_base_model")
    tmp = _atomic_write_dir(out_dir)
    try:
        save_file(feature_map_state(inner), str(tmp / FEATURES_NAME))
        lora = None
        if is_peft:
            pcfg = model.peft_config["default"]
            lora = {"r": pcfg.r, "alpha": pcfg.lora_alpha, "target_modules": sorted(pcfg.target_modules)
                    if not isinstance(pcfg.target_modules, str) else pcfg.target_modules,
                    "merged": merge_lora}
            if merge_lora:
                save_file(_merged_attention_state(model), str(tmp / MERGED_NAME))
            else:
                model.save_pretrained(str(tmp), safe_serialization=True)
                for junk in ("README.md",):
                    if (tmp / junk).exists():
                        (tmp / junk).unlink()
        meta = {
            "format_version": FORMAT_VERSION,
            "base_model": base_model,
            "base_fingerprint": base_fingerprint(inner),
            "hedgehog": hh_cfg.to_dict(),
            "converted_layers": [layer.layer_idx for layer in layers],
            "lora": lora,
            **(extra or {}),
        }
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if out_dir.exists():
            old = out_dir.with_name(out_dir.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _merged_attention_state(peft_model) -> Dict[str, torch.Tensor]:
    """State of every LoRA-wrapped module with the LoRA delta merged in (without touching the model)."""
    from peft.tuners.lora import LoraLayer

    state = {}
    for name, mod in peft_model.get_base_model().named_modules():
        if isinstance(mod, LoraLayer):
            w = mod.get_base_layer().weight.detach().clone()
            for adapter in mod.active_adapters:
                w += mod.get_delta_weight(adapter).detach()
            state[f"{name}.weight"] = w.cpu().contiguous()
    return state


def is_converted_dir(path) -> bool:
    return (Path(path) / CONFIG_NAME).exists()


def read_meta(path) -> Dict:
    """The ``hedgehog_config.json`` of a converted directory (base model, fingerprint, settings), checked."""
    path = Path(path).expanduser()
    if not path.exists():
        raise MissingPathError(f"{path} does not exist; pass the model directory that `hedgehog convert` wrote "
                               "(OUT/model)")
    cfg_file = path / CONFIG_NAME
    if not cfg_file.exists():
        raise MissingPathError(f"{path} is not a converted hedgehog model (no {CONFIG_NAME}); "
                               "create one with `hedgehog convert --out DIR`")
    meta = _read(cfg_file, lambda p: json.loads(p.read_text()))
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {meta.get('format_version')} is not supported "
                              f"(this hedgehog reads {FORMAT_VERSION})")
    return meta


def load(path, base_model: Optional[str] = None, dtype=torch.float32, device="cpu", merge_lora: bool = True):
    """Load a converted model saved by :func:`save_converted` -> ``(model, tokenizer)``.

    ``base_model`` overrides the recorded base (e.g. a local copy of it); a base whose fingerprint
    differs from the recorded one is refused. A LoRA adapter is merged into the weights by default
    (faster; changes fp32 rounding, ~1e-4 relative on logits); ``merge_lora=False`` keeps the peft
    wrapper, which reproduces the saved model's logits exactly.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hedgehog.assets import PLAIN_LOAD, resolve_model_path
    from hedgehog.convert import convert_model

    path = Path(path).expanduser()
    meta = read_meta(path)
    base = resolve_model_path(base_model or meta["base_model"])
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, attn_implementation="sdpa",
                                                 **PLAIN_LOAD).to(device).eval()
    fp = base_fingerprint(model)
    if fp != meta["base_fingerprint"]:
        diff = {k: (meta["base_fingerprint"].get(k), fp.get(k)) for k in fp if fp.get(k) != meta["base_fingerprint"].get(k)}
        raise BaseModelMismatchError(
            f"{path} was converted from a different base model than {base!r}: mismatched {diff}. "
            f"Load it onto its own base ({meta['base_model']!r}) or pass that with base_model=/--base-model."
        )
    hh = HedgehogConfig.from_dict(meta["hedgehog"])
    hh.layers = meta.get("converted_layers", hh.layers)
    convert_model(model, hh)
    load_feature_map_state(model, _read(path / FEATURES_NAME, lambda p: load_file(str(p))))
    lora = meta.get("lora")
    if lora:
        if lora.get("merged"):
            merged = _read(path / MERGED_NAME, lambda p: load_file(str(p)))
            missing = [k for k in merged if k not in dict(model.named_parameters())]
            if missing:
                raise ValueError(f"merged LoRA weights name unknown parameters: {missing[:3]}")
            params = dict(model.named_parameters())
            with torch.no_grad():
                for k, t in merged.items():
                    params[k].copy_(t)
        else:
            from peft import PeftModel

            model = _read(path / "adapter_model.safetensors", lambda _: PeftModel.from_pretrained(model, str(path)))
            if merge_lora:
                model = model.merge_and_unload()
    model.to(device).eval()
    tok = None
    for src in (str(path), base):
        try:
            tok = AutoTokenizer.from_pretrained(src)
            break
        except Exception:  # no tokenizer files there
            continue
    if tok is None:
        import logging

        logging.getLogger("hedgehog").warning("no tokenizer found in %s or %s; returning tokenizer=None", path, base)
    return model, tok
