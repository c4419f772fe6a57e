"""Model-level evaluation, all under no-grad: perplexity, fidelity to the softmax teacher (perplexity ratio,
next-token agreement, KL per token) on held-out windows, and per-layer attention fidelity."""
from __future__ import annotations

import contextlib
import math
from typing import Dict, Iterator, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from hedgehog.layers.attention import Mode, attention_mode, hedgehog_layers
from hedgehog.modules.heads import repeat_heads
from hedgehog.modules.metrics import attention_fidelity


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s parameters live: evaluation moves each batch there."""
    return next(model.parameters()).device


def eval_batches(model: nn.Module, *tensors: torch.Tensor, batch_size: int, progress: bool = False,
                 desc: str = "evaluating") -> Iterator:
    """The one evaluation loop: ``model`` in eval mode, the rows of ``tensors`` in batches of ``batch_size`` moved
    to the model's device (one tensor: the batch; several: a tuple), with a progress bar; the model's training
    mode comes back afterwards, also on an error. Callers run it under no-grad (every evaluation is decorated)."""
    was_training = model.training
    model.eval()
    dev = model_device(model)
    try:
        for i in tqdm(range(0, tensors[0].shape[0], batch_size), desc=desc, disable=not progress, leave=False):
            parts = tuple(t[i:i + batch_size].to(dev) for t in tensors)
            yield parts if len(parts) > 1 else parts[0]
    finally:
        model.train(was_training)


@torch.no_grad()
def window_nll(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, progress: bool = True,
               desc: str = "perplexity") -> torch.Tensor:
    """Mean next-token NLL (nats) of each window of ``windows`` (num_windows, seq_len): float64 (num_windows,)."""
    out = []
    for batch in eval_batches(model, windows, batch_size=batch_size, progress=progress, desc=desc):
        logits = model(input_ids=batch, use_cache=False).logits
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1),
                              reduction="none").view(batch.shape[0], -1)
        out.append(nll.double().mean(1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, progress: bool = True,
               desc: str = "perplexity") -> float:
    """exp(mean next-token NLL) over every predicted token of ``windows`` (num_windows, seq_len)."""
    nll = window_nll(model, windows, batch_size, progress, desc).mean().item()  # equal-length windows
    return math.exp(nll) if math.isfinite(nll) else float("inf")


class NextTokenTally:
    """Running next-token statistics of one model against the teacher's log-probabilities: its NLL, the
    argmaxes that agree, and KL(teacher || model), summed over tokens."""

    def __init__(self):
        self.nll = self.agree = self.kl = 0.0
        self.n = 0

    def add(self, logp: torch.Tensor, t_logp: torch.Tensor, target: torch.Tensor) -> None:
        """``logp``/``t_logp`` (B, N, V) log-probabilities of the model and the teacher; ``target`` (B, N, 1)."""
        self.nll -= logp.gather(-1, target).double().sum().item()
        self.agree += (t_logp.argmax(-1) == logp.argmax(-1)).sum().item()
        self.kl += F.kl_div(logp, t_logp, log_target=True, reduction="sum").double().item()
        self.n += target.numel()

    def result(self, teacher_nll: float) -> Dict[str, float]:
        """``ppl``, ``teacher_ppl`` (from ``teacher_nll``, its NLL summed over the same tokens), ``ppl_ratio``,
        ``top1_agreement`` and ``kl_per_token``."""
        n = max(1, self.n)
        ppl, t_ppl = math.exp(self.nll / n), math.exp(teacher_nll / n)
        return {"ppl": ppl, "teacher_ppl": t_ppl, "ppl_ratio": ppl / t_ppl, "top1_agreement": self.agree / n,
                "kl_per_token": self.kl / n}


TALLY_ROWS = 128  # positions per log-softmax: (rows, vocab) temporaries instead of (windows, N, vocab)


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities of positions 0..N-2, in float32 at least (float64 stays float64)."""
    return F.log_softmax(logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32)), -1)


def tally_windows(ids: torch.Tensor, t_logits: torch.Tensor, sides: Dict[str, torch.Tensor],
                  tallies: Dict[str, NextTokenTally]) -> float:
    """Add each side's next-token statistics on the windows ``ids`` (B, N) against the teacher's to ``tallies``
    (name -> tally): ``t_logits`` and ``sides[name]`` (B, N, V) are the logits. Returns the teacher's NLL summed
    over the same tokens. :data:`TALLY_ROWS` positions of one window at a time: a batch's whole log-probabilities
    (200 MB for two 512-token windows of a 49k vocabulary, 1.6 GB for one of 8k) cost more to allocate than the
    softmaxes themselves (2.0 s against 0.9 s for the former, one thread of this project's CPU)."""
    nll = 0.0
    B, N = ids.shape
    for r in range(B):
        for a in range(0, N - 1, TALLY_ROWS):
            b = min(N - 1, a + TALLY_ROWS)
            t = log_probs(t_logits[r:r + 1, a:b + 1])
            target = ids[r:r + 1, a + 1:b + 1].unsqueeze(-1).to(t.device)
            nll -= t.gather(-1, target).double().sum().item()
            for name, logits in sides.items():
                tallies[name].add(log_probs(logits[r:r + 1, a:b + 1]).to(t.device), t, target)
    return nll


@contextlib.contextmanager
def teacher_mode(model: nn.Module, mode: Mode = Mode.TEACHER) -> Iterator[nn.Module]:
    """Inside the block ``model`` (converted, maybe LoRA-wrapped) computes as its softmax teacher: exact
    softmax attention, adapter off (``Mode.BASELINE``: the teacher limited to each layer's ``baseline`` window
    and sinks). Afterwards it is back in the mode it was in, adapter on."""
    adapter_off = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    with adapter_off, attention_mode(model, mode):
        yield model


@torch.no_grad()
def fidelity(model: nn.Module, windows: torch.Tensor, batch_size: int = 2, progress: bool = True,
             desc: str = "fidelity", teacher: Optional[nn.Module] = None) -> Dict[str, float]:
    """The converted ``model`` against its softmax teacher on ``windows`` (num_windows, seq_len): ``teacher`` when
    given (needed once LoRA is merged into the weights), else ``model`` itself in :func:`teacher_mode`.

    Returns teacher and student perplexity, their ratio, the fraction of next-token argmaxes that agree,
    and the mean KL(teacher || student) per predicted token (nats).
    """
    dev = model_device(model)
    nll_t = 0.0
    tally = NextTokenTally()
    for batch in eval_batches(model, windows, batch_size=batch_size, progress=progress, desc=desc):
        if teacher is not None:
            t = teacher(input_ids=batch.to(model_device(teacher)), use_cache=False).logits.to(dev)
        else:
            with teacher_mode(model):
                t = model(input_ids=batch, use_cache=False).logits
        s = model(input_ids=batch, use_cache=False).logits
        nll_t += tally_windows(batch, t, {"student": s}, {"student": tally})
        del t, s
    r = tally.result(nll_t)
    return {"teacher_ppl": r["teacher_ppl"], "student_ppl": r["ppl"], "ppl_ratio": r["ppl_ratio"],
            "top1_agreement": r["top1_agreement"], "kl_per_token": r["kl_per_token"], "tokens": tally.n}


@torch.no_grad()
def layer_attention_kl(model: nn.Module, windows: torch.Tensor) -> List[Dict[str, float]]:
    """Per converted layer: mean KL(softmax || linear), entropies and Spearman monotonicity over heads,
    rows and ``windows`` (teacher q/k captured from a softmax forward)."""
    from hedgehog.layers.capture import capture_qkv

    layers = hedgehog_layers(model)
    sums: List[Dict[str, float]] = [dict() for _ in layers]
    for w in windows:
        caps = capture_qkv(model, w[None].to(model_device(model)))
        for i, (layer, cap) in enumerate(zip(layers, caps)):
            phi_q, phi_k = layer.features(cap.q, cap.k)
            f = attention_fidelity(cap.q, repeat_heads(cap.k, layer.n_rep), phi_q, phi_k, causal=layer.causal,
                                   teacher=cap.teacher, hybrid=layer.hybrid_settings())
            for key, val in f.items():
                sums[i][key] = sums[i].get(key, 0.0) + val.mean().item() / len(windows)
    return [{"layer": layer.layer_idx, **s} for layer, s in zip(layers, sums)]
