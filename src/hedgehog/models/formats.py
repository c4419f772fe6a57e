"""What a converted model directory holds, written atomically (temp dir + rename), and reading it back in parts.

One layout, a Hugging Face model directory: ``config.json`` is a :class:`~hedgehog.models.hf_config.HedgehogModelConfig`
(model type ``hedgehog``: the base config, the conversion settings, the base model and its fingerprint, the LoRA
settings); ``model.safetensors`` (or its shards) the weights, LoRA merged in; the tokenizer,
``generation_config.json`` and a model card ``README.md``. ``import hedgehog`` then
``AutoModelForCausalLM.from_pretrained(dir)`` loads it; plain transformers refuses it (unknown model type).
Its ``weights`` say what the file holds:

- ``"all"`` (``format="hf"``, the default): every weight (base, feature maps, window gates); the directory stands
  alone.
- ``"added"`` (``format="light"``): only what conversion changed (feature maps, window gates, the weights LoRA
  was merged into); loading reads the recorded base (an absolute path, alias or hub id with revision, or
  ``base_model=``) and refuses one whose fingerprint differs. Stage checkpoints use it (small).

Whole models load through :mod:`hedgehog.models.loading`, which also reads directories of the earlier light layout
(``hedgehog_config.json``, ``feature_maps.safetensors``, a peft adapter or ``merged_attention.safetensors``);
nothing writes that layout any more.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
from safetensors.torch import save_file

from hedgehog.errors import CheckpointError, MissingPathError, UserError
from hedgehog.layers.attention import HedgehogAttention, hedgehog_layers
from hedgehog.models.hf_config import FEATURE_KEYS, HedgehogModelConfig, entry_name, is_hedgehog_config
from hedgehog.models.modelcard import write_model_card
from hedgehog.utils.atomic import atomic_dir

FORMAT_VERSION = 1  # the earlier light layout's (read only)
CONFIG_NAME = "hedgehog_config.json"  # the earlier light layout's (read only)
HF_CONFIG_NAME = "config.json"
FORMATS = ("hf", "light")
FEATURES_NAME = "feature_maps.safetensors"
MERGED_NAME = "merged_attention.safetensors"


def read_checked(path: Path, reader):
    """``reader(path)``, with a missing, truncated or corrupt file reported as a :class:`CheckpointError`."""
    try:
        return reader(path)
    except UserError:  # already says what is wrong and what to do (a mismatched or missing base, ...)
        raise
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


class BaseModelMismatchError(CheckpointError):
    """The base model given for a converted directory is not the one it was converted from."""


def check_fingerprint(path, meta: Dict, model: nn.Module, base: str) -> None:
    """Refuse ``model`` as the base of the directory ``path`` (record ``meta``) unless its fingerprint matches."""
    fp, want = base_fingerprint(model), meta.get("base_fingerprint") or {}
    if fp != want:
        diff = {k: (want.get(k), fp.get(k)) for k in fp if fp.get(k) != want.get(k)}
        raise BaseModelMismatchError(
            f"{path} was converted from a different base model than {base!r}: mismatched {diff}. "
            f"Use its own base ({meta.get('base_model')!r}) or pass that with base_model=/--base-model.")


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


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


def _lora_settings(model) -> Optional[Dict]:
    """The peft wrapper's LoRA settings, with the names of the weights it changes (``weights``); None without."""
    if not hasattr(model, "get_base_model"):
        return None
    from peft.tuners.lora import LoraLayer

    pcfg = model.peft_config["default"]
    return {"r": pcfg.r, "alpha": pcfg.lora_alpha, "target_modules": sorted(pcfg.target_modules)
            if not isinstance(pcfg.target_modules, str) else pcfg.target_modules, "merged": True,
            "weights": sorted(f"{name}.weight" for name, mod in model.get_base_model().named_modules()
                              if isinstance(mod, LoraLayer))}


def merge_lora(model: nn.Module) -> nn.Module:
    """peft's ``merge_and_unload``, recording the LoRA settings on the merged model's config (``hedgehog_origin``):
    a save then says the weights are no longer the base's, so teacher mode is not the teacher. A model without
    LoRA is returned as it is."""
    settings = _lora_settings(model)
    if settings is None:
        return model
    merged = model.merge_and_unload()
    merged.config.hedgehog_origin = {**(getattr(merged.config, "hedgehog_origin", None) or {}), "lora": settings}
    return merged


def save_converted(model: nn.Module, out_dir, base_model: str, tokenizer=None, extra: Optional[Dict] = None,
                   format: str = "hf", report: Optional[Dict] = None) -> Path:
    """Write a converted (optionally LoRA-wrapped) model to ``out_dir`` atomically (temp dir + rename).

    ``format="hf"`` (default) writes every weight, so the directory stands alone; ``format="light"`` the same
    directory with only the weights conversion changed (feature maps, window gates, the LoRA-merged projections),
    which load on top of ``base_model`` (see the module docstring). LoRA is merged in either. ``report``: the job's
    report, whose fidelity tables go into the model card."""
    if format not in FORMATS:
        raise ValueError(f"unknown save format {format!r}; choose one of {FORMATS}")
    return save_hf(model, out_dir, tokenizer=tokenizer, base_model=base_model, extra=extra,
                   include_base=format == "hf", report=report)


def _added_keys(model: nn.Module, state: Dict[str, torch.Tensor]) -> set:
    """The keys of ``state`` that conversion changed: the maps' and gates', and the weights LoRA was merged into
    (from the peft wrapper, or as :func:`merge_lora` recorded them)."""
    lora = _lora_settings(model) or (getattr(_unwrap(model).config, "hedgehog_origin", None) or {}).get("lora")
    changed = set((lora or {}).get("weights") or ())
    if lora and not changed:
        raise ValueError("this model's LoRA was merged without recording which weights changed, so a light save "
                         "cannot tell them from the base's: save the peft model, merge it with "
                         "hedgehog.models.formats.merge_lora, or use format='hf'")
    missing = sorted(changed - set(state))
    if missing:
        raise ValueError(f"the recorded LoRA weights {missing[:3]} are not among this model's weights")
    return {k for k in state if any(f in k for f in FEATURE_KEYS)} | changed


def export_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Every weight of a converted model under the base architecture's names plus the feature maps', LoRA merged in:
    what ``model.safetensors`` holds. Aliases (the grouped key map's view of ``feature_map_k``) are left out."""
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
            extra: Optional[Dict] = None, include_base: bool = True, report: Optional[Dict] = None,
            **save_kwargs) -> Path:
    """The hf format (see the module docstring), atomically. ``save_kwargs`` go to transformers'
    ``save_pretrained`` (``max_shard_size``, ``variant``); ``base_model`` defaults to what the model recorded.
    ``include_base=False``: only the weights conversion changed (``weights: "added"`` in ``config.json``).
    ``report``: a job report for the model card's tables."""
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
        lora=_lora_settings(model) or recorded.get("lora"), conversion=conversion,
        architectures=[entry_name(inner)], weights="all" if include_base else "added")
    if not include_base and not base_model:
        raise ValueError("a light save needs the base model it loads onto: pass base_model=")
    state = export_state(model)
    with atomic_dir(out_dir) as tmp:
        if include_base:
            _base_save_pretrained(inner)(str(tmp), state_dict=state, **save_kwargs)
        else:
            added = _added_keys(model, state)
            save_file({k: state[k] for k in sorted(added)}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            if getattr(inner, "generation_config", None) is not None:
                inner.generation_config.save_pretrained(str(tmp))
        hh_config.save_pretrained(str(tmp))  # replaces the base's config.json
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        write_model_card(tmp, hh_config.to_dict(), report)
    return out_dir


def _base_save_pretrained(model: nn.Module):
    """``model``'s transformers ``save_pretrained`` (the base class's), past the hedgehog mixin that routes here."""
    for klass in type(model).__mro__:
        own = vars(klass)
        if "save_pretrained" in own and not own.get("_hedgehog_class"):
            return own["save_pretrained"].__get__(model)
    raise TypeError(f"{type(model).__name__} is not a transformers model (it has no save_pretrained)")


def _weight_files(path) -> list:
    """The ``model*.safetensors`` of an hf-format directory (one, or the shards); none is an error."""
    files = sorted(Path(path).glob("model*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} has no model.safetensors: the converted model is incomplete. Copy it again, "
                              "or re-create it with `hedgehog convert`.")
    return files


def check_weight_files(path: Path) -> None:
    """Every weight file of an hf-format directory has a whole header and body (cheap: no tensor read)."""
    from safetensors import safe_open

    for f in _weight_files(path):
        def probe(p):
            with safe_open(str(p), framework="pt") as fh:
                keys = list(fh.keys())
                if keys:
                    fh.get_slice(keys[-1])[:]  # the last tensor ends at the end of the file
        read_checked(f, probe)


def load_hf_weights(model: nn.Module, path, added: bool = False) -> None:
    """Load the feature maps and window gates of an hf-format directory into a freshly converted ``model``
    (transformers' ``from_pretrained`` loaded the rest); ``added``: every tensor of a light directory (the maps
    and the LoRA-merged weights) onto the converted base."""
    from safetensors import safe_open

    files = _weight_files(path)
    keys = [k for k in model.state_dict() if "._grouped_k." not in k]
    want = {k for k in keys if any(f in k for f in FEATURE_KEYS)}
    prefix = getattr(model, "base_model_prefix", "") or ""
    # a bare model loaded from a saved head model (or the reverse) sees the keys with/without the base prefix
    known = set(keys) if added else want
    names = {k: k for k in known}
    if prefix:
        names.update({f"{prefix}.{k}": k for k in known if not k.startswith(prefix + ".")})
        names.update({k[len(prefix) + 1:]: k for k in known if k.startswith(prefix + ".")})
    state, unknown = {}, []
    for f in files:
        def read(p):
            with safe_open(str(p), framework="pt") as fh:
                unknown.extend(k for k in fh.keys() if k not in names)
                return {names[k]: fh.get_tensor(k) for k in fh.keys() if k in names}
        state.update(read_checked(f, read))
    if added and unknown:
        raise CheckpointError(f"{path} holds {len(unknown)} tensors this model does not have (e.g. {unknown[0]}): "
                              "it was converted from another architecture than its recorded base")
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


def saved_format(path) -> Optional[str]:
    """``"hf"``, ``"light"`` or None (not a converted directory)."""
    path = Path(path)
    if (path / CONFIG_NAME).exists():
        return "light"
    cfg = path / HF_CONFIG_NAME
    if cfg.is_file():
        return "hf" if is_hedgehog_config(read_checked(cfg, lambda p: json.loads(p.read_text()))) else None
    return None


def is_converted_dir(path) -> bool:
    return saved_format(path) is not None


def read_meta(path) -> Dict:
    """A converted directory's record (base model, fingerprint, settings, what the job recorded), checked;
    the same keys for both formats."""
    path = Path(path).expanduser()
    if not path.exists():
        raise MissingPathError(f"{path} does not exist; pass the model directory that `hedgehog convert` wrote "
                               "(OUT/model)")
    fmt = saved_format(path)
    if fmt is None:
        raise MissingPathError(f"{path} is not a converted hedgehog model (no {CONFIG_NAME}, and its "
                               f"{HF_CONFIG_NAME} is not of model type 'hedgehog'); create one with "
                               "`hedgehog convert --out DIR`")
    if fmt == "hf":
        d = read_checked(path / HF_CONFIG_NAME, lambda p: json.loads(p.read_text()))
        return {"format": "hf", "format_version": d.get("format_version"), "weights": d.get("weights", "all"),
                "base_model": d.get("base_model"),
                "base_fingerprint": d.get("base_fingerprint"), "hedgehog": d.get("hedgehog"),
                "converted_layers": d.get("converted_layers"), "lora": d.get("lora"),
                **(d.get("conversion") or {})}
    meta = read_checked(path / CONFIG_NAME, lambda p: json.loads(p.read_text()))
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {meta.get('format_version')} is not supported "
                              f"(this hedgehog reads {FORMAT_VERSION})")
    return {"format": "light", **meta}


