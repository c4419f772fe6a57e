"""The class a converted model gets: its base class (``LlamaForCausalLM``, ...) with a thin mixin in front.

``forward``, ``generate`` and peft behave as the base's; ``save_pretrained`` (and so ``push_to_hub``) writes the
hedgehog format through :func:`hedgehog.models.formats.save_hf`. :func:`hedgehog.models.convert.convert_model` gives every
converted model this class; :mod:`hedgehog.models.hf` builds it again when a directory loads.
"""
from __future__ import annotations

import sys
from typing import Dict

import torch.nn as nn
from transformers import PreTrainedModel

from hedgehog.models.formats import save_hf

_CLASSES: Dict[type, type] = {}


class HedgehogModelMixin:
    """Put in front of a converted model's own class: ``save_pretrained`` writes the hedgehog format."""

    _hedgehog_class = True

    def save_pretrained(self, save_directory, *args, tokenizer=None, **kwargs):
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
                                                       or []) + [r".*feature_map_[qk]\..*", r".*window_gate$", r".*state_decay$"],
            # a bf16/fp16 load keeps the maps in float32, as they were trained (their softmax over features
            # and the running sums need the range)
            "_keep_in_fp32_modules": list(getattr(base_cls, "_keep_in_fp32_modules", None) or [])
            + ["feature_map_q", "feature_map_k", "window_gate", "state_decay"],
        })
        _CLASSES[base_cls] = cls
        setattr(sys.modules[__name__], name, cls)  # so pickle finds it
    return cls


def mark_converted(model: nn.Module) -> None:
    """Give a converted model its hedgehog class (in place)."""
    if isinstance(model, PreTrainedModel):
        model.__class__ = hedgehog_class(type(model))


