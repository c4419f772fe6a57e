"""Save / load converted models, written atomically (temp dir + rename).

Two formats:

- **hf** (the default): a Hugging Face model directory that stands alone. ``config.json`` is a
  :class:`~hedgehog.hf.HedgehogModelConfig` (model type ``hedgehog``: the base config, the conversion settings, the
  base fingerprint); ``model.safetensors`` holds every weight (base, feature maps, window gates, LoRA merged in);
  plus the tokenizer, ``generation_config.json`` and a model card ``README.md``. ``import hedgehog`` then
  ``AutoModelForCausalLM.from_pretrained(dir)`` loads it; plain transformers refuses it (unknown model type).
- **light**: only what conversion added, on top of a base model it names. ``hedgehog_config.json`` (format version,
  the base as an absolute path, alias or hub id with revision, its fingerprint, the settings, the LoRA settings),
  ``feature_maps.safetensors``, and with LoRA either peft's ``adapter_model.safetensors`` + ``adapter_config.json``
  or, with ``merge_lora=True``, ``merged_attention.safetensors`` (the attention projections with LoRA merged); the
  tokenizer. Loading rebuilds base model -> conversion -> feature maps -> LoRA; a base whose fingerprint differs is
  refused. Stage checkpoints use it (small), and every directory written before the hf format keeps loading.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from hedgehog.atomic import atomic_dir
from hedgehog.attention import HedgehogConfig, hedgehog_layers
from hedgehog.errors import CheckpointError, MissingPathError

FORMAT_VERSION = 1  # the light format's
CONFIG_NAME = "hedgehog_config.json"  # the light format's
HF_CONFIG_NAME = "config.json"
FORMATS = ("hf", "light")
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


def _lora_settings(model, merged: bool) -> Optional[Dict]:
    if not hasattr(model, "get_base_model"):
        return None
    pcfg = model.peft_config["default"]
    return {"r": pcfg.r, "alpha": pcfg.lora_alpha, "target_modules": sorted(pcfg.target_modules)
            if not isinstance(pcfg.target_modules, str) else pcfg.target_modules, "merged": merged}


def save_converted(model: nn.Module, out_dir, base_model: str, tokenizer=None, merge_lora: bool = False,
                   extra: Optional[Dict] = None, format: str = "hf") -> Path:
    """Write a converted (optionally LoRA-wrapped) model to ``out_dir`` atomically (temp dir + rename).

    ``format="hf"`` (default) writes the self-contained Hugging Face directory (LoRA always merged);
    ``format="light"`` the feature maps and LoRA on top of ``base_model`` (see the module docstring)."""
    if format not in FORMATS:
        raise ValueError(f"unknown save format {format!r}; choose one of {FORMATS}")
    if format == "hf":
        return save_hf(model, out_dir, tokenizer=tokenizer, base_model=base_model, extra=extra)
    out_dir = Path(out_dir)
    inner = _unwrap(model)
    layers = hedgehog_layers(inner)
    if not layers:
        raise ValueError("model has no Hedgehog attention layers; convert it before saving")
    hh_cfg = layers[0].hh_config
    is_peft = hasattr(model, "get_base_model")
    with atomic_dir(out_dir) as tmp:
        save_file(feature_map_state(inner), str(tmp / FEATURES_NAME))
        lora = _lora_settings(model, merge_lora)
        if is_peft:
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
    return out_dir


def export_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Every weight of a converted model under the base architecture's names plus the feature maps', LoRA merged in:
    what ``model.safetensors`` holds. Aliases (the grouped key map's view of ``feature_map_k``) are left out."""
    from hedgehog.attention import HedgehogAttention

    inner = _unwrap(model)
    merged = _merged_attention_state(model) if hasattr(model, "get_base_model") else {}
    aliases = {f"{name}._grouped_k." for name, m in inner.named_modules() if isinstance(m, HedgehogAttention)}
    state = {}
    for key, t in inner.state_dict().items():
        if any(key.startswith(a) for a in aliases) or ".lora_" in key:
            continue
        key = key.replace(".base_layer.", ".")
        state[key] = merged.get(key, t).detach().cpu().contiguous()
    return state


def save_hf(model: nn.Module, out_dir, tokenizer=None, base_model: Optional[str] = None,
            extra: Optional[Dict] = None, **save_kwargs) -> Path:
    """The hf format (see the module docstring), atomically. ``save_kwargs`` go to transformers'
    ``save_pretrained`` (``max_shard_size``, ``variant``); ``base_model`` defaults to what the model recorded."""
    from transformers import PreTrainedModel

    from hedgehog.hf import HedgehogModelConfig, HedgehogModelMixin, entry_name
    from hedgehog.modelcard import write_model_card

    if save_kwargs.pop("push_to_hub", False):
        raise ValueError("save_pretrained(push_to_hub=True) is not supported for hedgehog models; "
                         "call model.push_to_hub(repo_id), which saves through this format")
    out_dir = Path(out_dir)
    inner = _unwrap(model)
    layers = hedgehog_layers(inner)
    if not layers:
        raise ValueError("model has no Hedgehog attention layers; convert it before saving")
    cfg = inner.config
    recorded = dict(getattr(cfg, "hedgehog_origin", None) or {})
    base_model = base_model or recorded.get("base_model") or getattr(cfg, "_name_or_path", None)
    conversion = {**recorded.get("conversion", {}), **(extra or {})}
    base_config = {k: v for k, v in cfg.to_dict().items() if k not in ("hedgehog", "hedgehog_origin", "_name_or_path")}
    hh_config = HedgehogModelConfig(
        base_config=base_config, hedgehog=layers[0].hh_config.to_dict(),
        converted_layers=[layer.layer_idx for layer in layers], base_model=base_model,
        base_fingerprint=recorded.get("base_fingerprint") or base_fingerprint(inner),
        lora=_lora_settings(model, True) or recorded.get("lora"), conversion=conversion,
        architectures=[entry_name(inner)])
    with atomic_dir(out_dir) as tmp:
        super_save = super(HedgehogModelMixin, inner).save_pretrained if isinstance(inner, HedgehogModelMixin) \
            else PreTrainedModel.save_pretrained.__get__(inner)
        super_save(str(tmp), state_dict=export_state(model), **save_kwargs)
        hh_config.save_pretrained(str(tmp))  # replaces the base's config.json
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        write_model_card(tmp, hh_config.to_dict())
    return out_dir


def _weight_files(path) -> list:
    """The ``model*.safetensors`` of an hf-format directory (one, or the shards); none is an error."""
    files = sorted(Path(path).glob("model*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} has no model.safetensors: the converted model is incomplete. Copy it again, "
                              "or re-create it with `hedgehog convert`.")
    return files


def _check_weight_files(path: Path) -> None:
    """Every weight file of an hf-format directory has a whole header and body (cheap: no tensor read)."""
    from safetensors import safe_open

    for f in _weight_files(path):
        def probe(p):
            with safe_open(str(p), framework="pt") as fh:
                keys = list(fh.keys())
                if keys:
                    fh.get_slice(keys[-1])[:]  # the last tensor ends at the end of the file
        _read(f, probe)


def load_hf_weights(model: nn.Module, path) -> None:
    """Load the feature maps and window gates of an hf-format directory into a freshly converted ``model``
    (transformers' ``from_pretrained`` loaded the rest)."""
    from safetensors import safe_open

    from hedgehog.hf import _FEATURE_KEYS

    files = _weight_files(path)
    want = {k for k in model.state_dict() if any(f in k for f in _FEATURE_KEYS) and "._grouped_k." not in k}
    prefix = getattr(model, "base_model_prefix", "") or ""
    # a bare model loaded from a saved head model (or the reverse) sees the keys with/without the base prefix
    names = {k: k for k in want}
    if prefix:
        names.update({f"{prefix}.{k}": k for k in want if not k.startswith(prefix + ".")})
        names.update({k[len(prefix) + 1:]: k for k in want if k.startswith(prefix + ".")})
    state = {}
    for f in files:
        def read(p):
            with safe_open(str(p), framework="pt") as fh:
                return {names[k]: fh.get_tensor(k) for k in fh.keys() if k in names}
        state.update(_read(f, read))
    missing = sorted(want - set(state))
    if missing:
        raise CheckpointError(f"{path} lacks {len(missing)} feature-map tensors (e.g. {missing[0]}): it was not "
                              "written by this hedgehog's save, or is incomplete")
    model.load_state_dict(state, strict=False)


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


def checkpoint_format(path) -> Optional[str]:
    """``"hf"``, ``"light"`` or None (not a converted directory)."""
    path = Path(path)
    if (path / CONFIG_NAME).exists():
        return "light"
    cfg = path / HF_CONFIG_NAME
    if cfg.is_file():
        from hedgehog.hf import is_hedgehog_config

        return "hf" if is_hedgehog_config(_read(cfg, lambda p: json.loads(p.read_text()))) else None
    return None


def is_converted_dir(path) -> bool:
    return checkpoint_format(path) is not None


def read_meta(path) -> Dict:
    """A converted directory's record (base model, fingerprint, settings, what the job recorded), checked;
    the same keys for both formats."""
    path = Path(path).expanduser()
    if not path.exists():
        raise MissingPathError(f"{path} does not exist; pass the model directory that `hedgehog convert` wrote "
                               "(OUT/model)")
    fmt = checkpoint_format(path)
    if fmt is None:
        raise MissingPathError(f"{path} is not a converted hedgehog model (no {CONFIG_NAME}, and its "
                               f"{HF_CONFIG_NAME} is not of model type 'hedgehog'); create one with "
                               "`hedgehog convert --out DIR`")
    if fmt == "hf":
        d = _read(path / HF_CONFIG_NAME, lambda p: json.loads(p.read_text()))
        return {"format": "hf", "format_version": d.get("format_version"), "base_model": d.get("base_model"),
                "base_fingerprint": d.get("base_fingerprint"), "hedgehog": d.get("hedgehog"),
                "converted_layers": d.get("converted_layers"), "lora": d.get("lora"),
                **(d.get("conversion") or {})}
    meta = _read(path / CONFIG_NAME, lambda p: json.loads(p.read_text()))
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {meta.get('format_version')} is not supported "
                              f"(this hedgehog reads {FORMAT_VERSION})")
    return {"format": "light", **meta}


def load(path, base_model: Optional[str] = None, dtype=torch.float32, device="cpu", merge_lora: bool = True):
    """Load a converted model saved by :func:`save_converted` -> ``(model, tokenizer)``.

    ``base_model`` overrides the recorded base (e.g. a local copy of it); a base whose fingerprint
    differs from the recorded one is refused. A LoRA adapter is merged into the weights by default
    (faster; changes fp32 rounding, ~1e-4 relative on logits); ``merge_lora=False`` keeps the peft
    wrapper, which reproduces the saved model's logits exactly. An hf-format directory stands alone: it loads
    through ``AutoModelForCausalLM`` (LoRA is merged in it) and ``base_model``/``merge_lora`` do not apply.
    """
    from transformers import AutoModelForCausalLM

    from hedgehog.assets import PLAIN_LOAD
    from hedgehog.convert import convert_model

    path = Path(path).expanduser()
    meta = read_meta(path)
    if meta["format"] == "hf":
        import hedgehog.hf  # noqa: F401  (registers the Auto classes)

        _check_weight_files(path)
        model = _read(path, lambda _: AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **PLAIN_LOAD))
        model.to(device).eval()
        return model, _tokenizer(path, meta.get("base_model"))
    model, base = _load_base_checked(path, meta, base_model, dtype, device)
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
    return model, _tokenizer(path, base)


def _check_fingerprint(path, meta: Dict, model: nn.Module, base: str) -> None:
    fp, want = base_fingerprint(model), meta.get("base_fingerprint") or {}
    if fp != want:
        diff = {k: (want.get(k), fp.get(k)) for k in fp if fp.get(k) != want.get(k)}
        raise BaseModelMismatchError(
            f"{path} was converted from a different base model than {base!r}: mismatched {diff}. "
            f"Use its own base ({meta.get('base_model')!r}) or pass that with base_model=/--base-model.")


def load_teacher(path, base_model: Optional[str] = None, dtype=torch.float32, device="cpu"):
    """The softmax base a converted directory was made from (its teacher), checked against the recorded
    fingerprint. ``base_model`` overrides the recorded location (a local copy of the same weights)."""
    return _load_base_checked(path, read_meta(path), base_model, dtype, device)[0]


def _load_base_checked(path, meta: Dict, base_model: Optional[str], dtype, device):
    """``(model, resolved base)``: the recorded base (or ``base_model``) at its recorded revision, loaded with the
    attention implementation that makes it its own exact teacher, refused when its fingerprint differs."""
    from transformers import AutoModelForCausalLM

    from hedgehog.assets import PLAIN_LOAD, hub_kwargs, resolve_model_path
    from hedgehog.convert import teacher_attn_implementation

    if not (base_model or meta.get("base_model")):
        raise CheckpointError(f"{path} does not record its base model; pass it with base_model=/--base-model")
    base = resolve_model_path(base_model or meta["base_model"])
    hub = {} if base_model else hub_kwargs(meta.get("base_revision"))  # another base: not the recorded revision
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, attn_implementation=teacher_attn_implementation(
        base, **hub), **PLAIN_LOAD, **hub).to(device).eval()
    _check_fingerprint(path, meta, model, base)
    return model, base


def needs_separate_teacher(path) -> bool:
    """True when the saved weights are not the base's (LoRA merged in), so softmax mode is not the teacher."""
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
