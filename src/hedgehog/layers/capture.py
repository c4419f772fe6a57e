"""Capturing a converted model's post-RoPE (q, k, v) per layer from one softmax (teacher) forward: what stage 1
trains on and what the fidelity metrics and the analysis read."""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn as nn

from hedgehog.layers.attention import Capture, Mode, attention_mode, hedgehog_layers


def positions_kw(position_ids: Optional[torch.Tensor]) -> Dict:
    """``position_ids`` as a model-call keyword, only when set (so a family without the argument still runs)."""
    return {} if position_ids is None else {"position_ids": position_ids}


class _EnoughLayers(Exception):
    """Raised after the last layer a capture needs: the rest of the teacher forward is skipped."""


@torch.no_grad()
def capture_qkv(model: nn.Module, input_ids: torch.Tensor, layers: Optional[List[nn.Module]] = None,
                position_ids: Optional[torch.Tensor] = None) -> List[Capture]:
    """Teacher forward; returns per converted layer (or per layer of ``layers``) the post-RoPE (q, k, v) and the
    teacher settings they ran under (:class:`~hedgehog.layers.attention.Capture`); ``position_ids`` as the model
    takes them (None: 0..N-1). The forward stops after the last captured layer: the rest of the model (with every
    layer, the LM head's vocabulary-wide logits, ~20% of SmolLM2's forward) is never computed."""
    layers = hedgehog_layers(model) if layers is None else layers
    for layer in layers:
        layer.start_capture()

    def enough(*_):
        raise _EnoughLayers

    stop = layers[-1].register_forward_hook(enough)
    try:
        with attention_mode(model, Mode.TEACHER):
            model(input_ids=input_ids, use_cache=False, **positions_kw(position_ids))
    except _EnoughLayers:
        pass
    finally:
        stop.remove()
        caps = [layer.stop_capture() for layer in layers]
    return [c[0] for c in caps]
