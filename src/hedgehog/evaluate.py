"""Model-level evaluation: perplexity on held-out windows and per-layer attention fidelity."""
from __future__ import annotations

import math
from typing import Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from hedgehog.attention import _repeat_heads, hedgehog_layers, set_attention_mode
from hedgehog.metrics import attention_fidelity


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s parameters live: evaluation moves each batch there."""
    return next(model.parameters()).device


@torch.no_grad()
def window_nll(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, progress: bool = True,
               desc: str = "perplexity") -> torch.Tensor:
    """Mean next-token NLL (nats) of each window of ``windows`` (num_windows, seq_len): float64 (num_windows,)."""
    was_training = model.training
    model.eval()
    out = []
    dev = model_device(model)
    for i in tqdm(range(0, windows.shape[0], batch_size), desc=desc, disable=not progress, leave=False):
        batch = windows[i:i + batch_size].to(dev)
        logits = model(input_ids=batch, use_cache=False).logits
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1),
                              reduction="none").view(batch.shape[0], -1)
        out.append(nll.double().mean(1).cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, progress: bool = True,
               desc: str = "perplexity") -> float:
    """exp(mean next-token NLL) over every predicted token of ``windows`` (num_windows, seq_len)."""
    nll = window_nll(model, windows, batch_size, progress, desc).mean().item()  # equal-length windows
    return math.exp(nll) if math.isfinite(nll) else float("inf")


@torch.no_grad()
def layer_attention_kl(model: nn.Module, windows: torch.Tensor) -> List[Dict[str, float]]:
    """Per converted layer: mean KL(softmax || linear), entropies and Spearman monotonicity over heads,
    rows and ``windows`` (teacher q/k captured from a softmax forward)."""
    from hedgehog.distill import capture_qkv

    layers = hedgehog_layers(model)
    sums: List[Dict[str, float]] = [dict() for _ in layers]
    for w in windows:
        caps = capture_qkv(model, w[None])
        for i, (layer, (q, k, _)) in enumerate(zip(layers, caps)):
            phi_q, phi_k = layer.features(q, k)
            f = attention_fidelity(q, _repeat_heads(k, layer.n_rep), phi_q, phi_k, causal=layer.causal,
                                   scale=layer.teacher_scale(), **layer.hybrid_kwargs())
            for key, val in f.items():
                sums[i][key] = sums[i].get(key, 0.0) + val.mean().item() / len(windows)
    set_attention_mode(model, "linear")
    return [{"layer": layer.layer_idx, **s} for layer, s in zip(layers, sums)]
