"""Hybrid attention (LoLCATs): exact softmax over a sliding window, linear attention for older tokens.

For query ``n`` the window is the ``w`` most recent keys ``W_n = {i : n - w < i <= n}``; every older key
``i <= n - w`` is seen through the linear state. One normalisation covers both parts:

    y_n = [sum_{i in W_n} g * exp(s_ni - c_n) v_i  +  phi(q_n) . S_{<=n-w}]
          / [sum_{i in W_n} g * exp(s_ni - c_n)      +  phi(q_n) . z_{<=n-w}]

with ``s_ni = q_n . k_i * scale``, ``c_n = max_{i in W_n} s_ni`` (the window max, for stability; it is
part of the formula, not only a numerical trick, because the linear part is not rescaled by it),
``g`` a per-head factor in (0, 1) (the layer passes ``sigmoid`` of a learnable parameter), and
``S = sum phi(k) v^T``, ``z = sum phi(k)`` over the older keys.

Algorithm (causal, O(N * (w * d + F * D))):

* the linear part is ordinary chunked causal linear attention of the queries against keys/values
  *shifted right by w* (key ``i`` is presented at position ``i + w``): query ``n`` then sees exactly the
  keys ``i <= n - w``. It reuses the blocked kernel of :mod:`hedgehog.ops.linear_attention`;
* the window part is computed per chunk of ``w`` queries against the ``2w`` keys of that chunk and
  the previous one (an ``unfold`` view, no copy), masked to ``n - w < i <= n``; it is added to the
  linear kernel's numerator and denominator block by block, before the single division.

Decoding keeps the last ``w`` keys/values plus the state of everything older
(:func:`hybrid_recurrent_step`), so memory is constant in the context length.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from hedgehog.ops import backends, cpu_kernel, triton_fused, triton_window
from hedgehog.ops.chunked import (Features, acc_dtype, auto_block, causal_blocks, device_piece, feature_rows,
                                  piece_bounds, records)
from hedgehog.ops.masks import hybrid_masks, linear_key_age, row_positions
from hedgehog.ops.linear_attention import DEFAULT_EPS
from hedgehog.ops.settings import Gamma
from hedgehog.ops.window import window_inference, window_part


def _gamma_rows(gamma: Gamma, B: int, H: int, acc, device) -> torch.Tensor:
    """gamma (scalar or (H,)) -> (B*H, 1, 1) in ``acc``."""
    g = torch.as_tensor(gamma, device=device).to(acc)
    if g.dim() == 0:
        g = g.expand(H)
    if g.shape != (H,):
        raise ValueError(f"gamma must be a scalar or one value per head ({H},), got {tuple(g.shape)}")
    return g.repeat(B).view(B * H, 1, 1)


def _check_hybrid(q, k, v, phi_q, phi_k, window):
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    for name, t in (("q", q), ("k", k), ("v", v), ("phi_q", phi_q), ("phi_k", phi_k)):
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (batch, heads, seq, dim), got {tuple(t.shape)}")
    if not (q.shape == k.shape and q.shape[:3] == v.shape[:3] and phi_q.shape[:3] == q.shape[:3]
            and phi_k.shape == phi_q.shape):
        raise ValueError(
            f"shapes do not fit: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, phi_q "
            f"{tuple(phi_q.shape)}, phi_k {tuple(phi_k.shape)}; all need equal (batch, heads, seq) "
            "(repeat grouped k/v heads to the query heads first)"
        )


def hybrid_weights(q, k, phi_q, phi_k, window: int, gamma: Gamma, scale: Optional[float] = None,
                   q_positions: Optional[torch.Tensor] = None, key_valid: Optional[torch.Tensor] = None,
                   sinks: int = 0, decay: Optional[torch.Tensor] = None):
    """Unnormalised hybrid weights, O(Nq * Nk): ``(a, exact, log_a_exact)``.

    ``a`` (B, H, Nq, Nk) holds ``g * exp(s - c)`` on the exact keys (the window and the ``sinks`` first keys,
    ``c`` their row max) and ``lambda^(n - w - i) phi_q . phi_k`` on the older keys of the linear part (0
    elsewhere); the normalised weights are ``a / a.sum(-1)``. ``decay`` (H,) is ``log lambda`` per head (None: no
    decay). ``log_a_exact`` is the exact log of the exact entries (``log g + s - c``), which the distillation
    loss uses instead of ``log(a)``. ``key_valid`` (B, Nk) bool drops padding keys from both parts.
    """
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, H, nq, d = q.shape
    nk = k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    win, old = hybrid_masks(nq, nk, window, q.device, q_positions, sinks)
    win, old = win[None, None], old[None, None]
    if key_valid is not None:
        kv = key_valid[:, None, None, :].to(q.device)
        win, old = win & kv, old & kv
    s = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * scale
    s = s.masked_fill(~win, float("-inf"))
    c = s.amax(-1, keepdim=True)
    c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))  # a row with no visible key (a padding query)
    g = torch.as_tensor(gamma, device=q.device).to(acc)
    g = g.view(1, H, 1, 1) if g.dim() == 1 else g
    log_win = (torch.log(g) + s - c).masked_fill(~win, 0.0)
    a_win = g * torch.exp(s - c)  # exp(-inf) = 0 off the window
    a_lin = (phi_q.to(acc) @ phi_k.to(acc).transpose(-1, -2)).masked_fill(~old, 0.0)
    if decay is not None:
        n = row_positions(nq, nk, q.device, q_positions=q_positions)
        age = linear_key_age(n, nk, window).to(acc)
        a_lin = a_lin * torch.exp(decay.to(acc).view(1, H, 1, 1) * age)
    return a_win + a_lin, win.expand_as(s), log_win


def quadratic_hybrid_attention(q, k, v, phi_q, phi_k, window: int = 64, gamma: Gamma = 0.5,
                               scale: Optional[float] = None, key_valid: Optional[torch.Tensor] = None,
                               return_weights: bool = False, eps: float = DEFAULT_EPS, sinks: int = 0,
                               decay: Optional[torch.Tensor] = None):
    """O(N^2) reference of the hybrid layer (causal): materialises the normalised weights.

    Args: q, k (B, H, N, d); v (B, H, N, D); phi_q, phi_k (B, H, N, F); gamma scalar or (H,);
        key_valid (B, N) bool, False for padding keys. Returns y (B, H, N, D) in v's dtype (and the
        weights (B, H, N, N) with ``return_weights``). Same denominator guard as linear attention.
        sinks, decay: see :func:`hybrid_weights`.
    """
    _check_hybrid(q, k, v, phi_q, phi_k, window)
    a, _, _ = hybrid_weights(q, k, phi_q, phi_k, window, gamma, scale, key_valid=key_valid, sinks=sinks, decay=decay)
    w = a / a.sum(-1, keepdim=True).clamp_min(eps)
    y = (w @ v.to(a.dtype)).to(v.dtype)
    return (y, w) if return_weights else y


def _block_size(bh: int, f: int, chunk: int, window: int, n: int, block_size: Optional[int]) -> int:
    step = chunk * window // math.gcd(chunk, window)
    if block_size is not None:
        if block_size % step and block_size < n:
            raise ValueError(f"block_size ({block_size}) must be a multiple of chunk_size and window ({step})")
        return block_size
    blk = auto_block(bh, f, chunk, n)
    return max(step, blk // step * step)


class _Rows:
    """Rows ``lo..hi-1`` along the sequence axis of a tensor that was ``split`` once into blocks.

    Under autograd, slicing the full tensor once per block would make each slice's backward
    zero-fill a full-size gradient (O(N^2 / block) work and traffic); slicing blocks costs O(block)
    and the split's own backward is one concat. Rows before position 0 are not served (callers pad).
    """

    def __init__(self, t: torch.Tensor, blk: int, dim: int):
        self.blocks, self.blk, self.dim = t.split(blk, dim), blk, dim

    def __call__(self, lo: int, hi: int) -> torch.Tensor:
        pieces = []
        for i in range(lo // self.blk, -(-hi // self.blk)):
            b, s0 = self.blocks[i], i * self.blk
            a, e = max(lo, s0) - s0, min(hi, s0 + b.shape[self.dim]) - s0
            pieces.append(b if (a, e) == (0, b.shape[self.dim]) else b.narrow(self.dim, a, e - a))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, self.dim)


def _hybrid(q, k, v, src_q, src_k, map_q, map_k, positions, fd, window, gamma, scale, chunk_size, block_size, eps,
            sinks: int = 0, decay: Optional[torch.Tensor] = None):
    """Blocked hybrid attention. The features of positions lo..hi-1 are ``map_q(src_q rows, positions rows)``
    (likewise for k), computed block by block: ``src`` is the raw q/k with the layer's maps, or
    precomputed features with identity maps. ``sinks`` first keys go to the exact part (their features are
    zeroed for the linear part); ``decay`` (H,) ``log lambda`` decays the linear state. Returns y (B*H, N, D)
    in ``acc``, (S, z)."""
    B, H, N, d = q.shape
    D, w = v.shape[-1], window
    acc = acc_dtype(v)
    BH = B * H
    chunk = max(1, min(chunk_size, N))
    blk = _block_size(BH, fd, chunk, w, N, block_size)
    bounds = [(s, min(s + blk, N)) for s in range(0, N, blk)]
    rq, rk, rpos = _Rows(src_q, blk, 2), _Rows(src_k, blk, 2), _Rows(positions, blk, positions.dim() - 1)
    # the forms autograd needs only where it records (not for a frozen model called outside torch.no_grad())
    rec = records((q, k, v, src_q, src_k, gamma, decay), maps=((map_q, src_q, positions), (map_k, src_k, positions)))
    rv = _Rows(v.to(acc).reshape(BH, N, D), blk, 1)

    def shifted(get, s, e, width):
        """Rows s-w .. e-w of a (BH, N, width) source, zero rows before position 0."""
        lo, hi = max(0, s - w), max(0, e - w)
        rows = get(lo, hi) if hi > lo else None
        front = (e - s) - (hi - lo)
        if front == 0:
            return rows
        z = torch.zeros(BH, front, width, dtype=acc, device=q.device)
        return z if rows is None else torch.cat([z, rows], 1)

    def feats_k(lo, hi):
        f = map_k(rk(lo, hi), rpos(lo, hi)).to(acc).reshape(BH, hi - lo, fd)
        if lo < sinks:  # the sinks are seen exactly, never through the state
            keep = (torch.arange(lo, hi, device=f.device) >= sinks).to(acc)
            f = f * keep[None, :, None]
        return f

    get_q = lambda i: map_q(rq(*bounds[i]), rpos(*bounds[i])).to(acc).reshape(BH, bounds[i][1] - bounds[i][0], fd)
    get_k = lambda i: shifted(feats_k, *bounds[i], fd)
    v_blocks = [shifted(rv, s, e, D) for s, e in bounds]
    gamma_rows = _gamma_rows(gamma, B, H, acc, q.device)
    q3, k3 = q.to(acc).reshape(BH, N, d), k.to(acc).reshape(BH, N, d)
    if acc == torch.float32 and triton_window.serves(q3) and triton_window.fits(d, D, sinks):
        # CUDA: the exact part in one Triton kernel
        num, den = triton_window.window_num_den(q3, k3, rv(0, N), w, scale, sinks)
        win = torch.cat([num, den.unsqueeze(-1)], -1) * gamma_rows
        extra = lambda i, s, L: win[:, s:s + L]
    elif rec:
        extra = window_part(_Rows(q3, blk, 1), _Rows(k3, blk, 1), rv, w, scale, gamma_rows, acc, sinks=sinks)
    else:
        win = window_inference(q3, k3, rv(0, N), w, scale, gamma_rows, sinks=sinks)
        extra = lambda i, s, L: win[:, s:s + L]
    decay_rows = None if decay is None else _gamma_rows(decay, B, H, acc, q.device).view(BH)
    with torch.set_grad_enabled(rec):
        return causal_blocks(get_q, get_k, v_blocks, chunk, None, eps, acc, extra=extra, decay=decay_rows)


def _device_kernel(backend, x: torch.Tensor, v: torch.Tensor, sinks: int) -> Optional[Callable]:
    """fla's gated kernel when ``backend`` binds one for tensors like ``x`` and the Triton window kernel runs (for
    these head dims and sinks)."""
    if backend is None or not triton_window.serves(x) or not triton_window.fits(x.shape[-1], v.shape[-1], sinks):
        return None
    return backends.resolve(backend).hybrid_linear(x)


def device_hybrid_attention(q, k, v, phi_q: Features, phi_k: Features, window: int, gamma: Gamma, scale: float,
                            gla: Callable, sinks: int = 0, decay: Optional[torch.Tensor] = None,
                            eps: float = DEFAULT_EPS, piece: Optional[int] = None):
    """The hybrid on CUDA in two library-grade kernels, joined under the one normalisation: the exact part (window
    and sinks, with its row max) from our Triton kernel (:mod:`hedgehog.ops.triton_window`), the linear part from
    fla's ``chunk_simple_gla`` over keys shifted right by the window (key ``i`` at position ``i + w``, so query
    ``n`` sees ``i <= n - w``), the decay as its head-wise gate ``g = log lambda`` (key weight ``lambda^(n-w-i)``),
    and the normaliser carried as a column of ones in v. Differentiable in q, k, v, the features, gamma and decay.

    Without autograd (:func:`~hedgehog.ops.chunked.records`) the queries run in pieces of ``piece`` to twice as many
    (default :func:`~hedgehog.ops.chunked.device_piece`), so a long prefill holds its output and one piece's
    features, fla operands and float32 sums, not the whole sequence's. A piece's linear part continues from fla's
    final state of the piece before; its exact part runs the window kernel on one short sequence, the sinks and
    then keys ``a - w + 1 .. b - 1``, so its query ``a + t`` sees keys ``a + t - w + 1 .. a + t`` and the sinks,
    as in one call; the rows of the queries it did not ask for are dropped. The same output and state as one call.

    Args as :func:`hybrid_attention` (q, k (B, H, N, d); v (B, H, N, D)); ``phi_q``, ``phi_k``: (B, H, N, F), or
    functions ``(a, b) -> features of tokens a..b-1`` (so features exist per piece); ``gla``: fla's
    ``chunk_simple_gla`` (or a function with its signature). Returns ``(y (B, H, N, D), (S (B, H, F, D),
    z (B, H, F)))``, the state of keys ``0 .. N - w - 1`` as the last query sees it.
    """
    B, H, N, d = q.shape
    D, w = v.shape[-1], window
    f32 = torch.float32
    feat_q, feat_k = feature_rows(phi_q), feature_rows(phi_k)
    whole = records((q, k, v, gamma, decay), features=(phi_q, phi_k))
    bounds = [(0, N)] if whole else piece_bounds(N, max(piece or device_piece(B * H), w + sinks))
    g = _gamma_rows(gamma, B, H, f32, q.device).view(B, H, 1, 1)
    Dp = -(-(D + 1) // 16) * 16  # v, a ones column (the normaliser), padding to the kernel's tiles
    dtype = v.dtype if v.dtype in (torch.float16, torch.bfloat16) else f32
    fla_rows = lambda t: t.to(dtype).transpose(1, 2).contiguous()  # [B, T, H, *]
    y, state = None, None
    for a, b in bounds:
        # the exact part: the sinks, then keys lo .. b-1 (lo >= sinks, as a >= piece >= w + sinks)
        lo = max(0, a - w + 1)
        seq = (lambda t: t[:, :, :b]) if lo == 0 else (lambda t: torch.cat([t[:, :, :sinks], t[:, :, lo:b]], 2))
        skip = a if lo == 0 else sinks + a - lo  # rows of queries before a
        num, den = triton_window.window_num_den(*(seq(t).reshape(B * H, -1, t.shape[-1]) for t in (q, k, v)), w,
                                                scale, sinks)
        num, den = num[:, skip:].view(B, H, b - a, D), den[:, skip:].view(B, H, b - a, 1)
        # the linear part: keys k0 .. k1-1 at positions k0 + w .., zero keys before position 0
        k0, k1 = max(0, a - w), max(0, b - w)
        pq = feat_q(a, b)
        pk = feat_k(k0, k1) if k1 > k0 else pq.new_zeros(B, H, 0, pq.shape[-1])
        if k0 < sinks:  # the sinks are seen exactly, never through the state
            pk = pk * (torch.arange(k0, k1, device=q.device) >= sinks).to(pk.dtype)[:, None]
        vk = v[:, :, k0:k1]
        v_aug = F.pad(torch.cat([vk, torch.ones_like(vk[..., :1])], -1), (0, Dp - D - 1))
        front = (b - a) - (k1 - k0)
        pk, v_aug = F.pad(pk, (0, 0, front, 0)), F.pad(v_aug, (0, 0, front, 0))
        gate = None if decay is None else decay.to(f32).view(1, 1, H).expand(B, b - a, H)
        o, state = gla(fla_rows(pq), fla_rows(pk), fla_rows(v_aug), g=gate, scale=1.0, initial_state=state,
                       output_final_state=True)
        o = o.transpose(1, 2).to(f32)
        part = ((g * num + o[..., :D]) / (g * den + o[..., D:D + 1]).clamp_min(eps)).to(v.dtype)
        if len(bounds) == 1:
            y = part
        else:  # written piece by piece (a list and a cat would hold the output twice)
            y = v.new_empty(B, H, N, D) if y is None else y
            y[:, :, a:b] = part
    return y, (state[..., :D].to(f32), state[..., D].to(f32))


def hybrid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    window: int = 64,
    gamma: Gamma = 0.5,
    scale: Optional[float] = None,
    chunk_size: int = 64,
    return_state: bool = False,
    eps: float = DEFAULT_EPS,
    block_size: Optional[int] = None,
    sinks: int = 0,
    decay: Optional[torch.Tensor] = None,
    backend=None,
):
    """Causal hybrid attention without an N x N tensor (see the module docstring for the formula).

    Args:
        q, k: (B, H, N, d) the layer's (post-RoPE) queries/keys; v: (B, H, N, D).
        phi_q, phi_k: (B, H, N, F) their features.
        window: keys per query seen with exact softmax (the query's own position included).
        gamma: window factor, a scalar or one value per head ``(H,)`` (differentiable).
        scale: softmax logit scale, ``d^-1/2`` by default.
        return_state: also return ``((S, z), k_tail, v_tail)``: the linear state of keys ``0..N-w-1``
            (zeros if N <= w) and the last ``min(w, N)`` keys/values, which is what decoding continues
            from with :func:`hybrid_recurrent_step`.
        sinks: the first ``sinks`` keys stay in the exact part after they leave the window (attention sinks).
        decay: (H,) ``log lambda`` of a decayed linear state (key i weighs ``lambda^(n - w - i)``), or None.
        backend: a kernel choice (:func:`hedgehog.ops.backends.bind`); on CUDA with fla and Triton it runs
            :func:`device_hybrid_attention`. None: the PyTorch form (with the Triton window part on CUDA).
    Returns: y (B, H, N, D) in v's dtype (and the state as above).
    """
    _check_hybrid(q, k, v, phi_q, phi_k, window)
    B, H, N, d = q.shape
    if N == 0:
        raise ValueError("hybrid attention needs at least one position (got seq length 0)")
    Fd = phi_q.shape[-1]
    scale = d ** -0.5 if scale is None else scale
    gla = _device_kernel(backend, q, v, sinks)
    if gla is not None:
        y, state = device_hybrid_attention(q, k, v, phi_q, phi_k, window, gamma, scale, gla, sinks, decay, eps)
        tail = max(0, N - window)
        return (y, (state, k[:, :, tail:], v[:, :, tail:])) if return_state else y
    plain = not sinks and decay is None  # what the fused CPU kernel computes
    fused = cpu_kernel.fused_hybrid_features(q, k, v, phi_q, phi_k, window, gamma, scale, eps) if plain else None
    if fused is not None:  # CPU, no autograd: the fused kernel on the given features
        y, state = fused
        if not return_state:
            return y
        tail = max(0, N - window)
        return y, (state, k[:, :, tail:], v[:, :, tail:])
    ident = lambda x, pos: x
    y, (S, z) = _hybrid(q, k, v, phi_q, phi_k, ident, ident, torch.arange(N, device=q.device), Fd, window,
                        gamma, scale, chunk_size, block_size, eps, sinks, decay)
    D = v.shape[-1]
    y = y.reshape(B, H, N, D).to(v.dtype)
    if not return_state:
        return y
    state = (S.reshape(B, H, Fd, D), z.reshape(B, H, Fd))
    tail = max(0, N - window)
    return y, (state, k[:, :, tail:], v[:, :, tail:])


def feature_hybrid_attention(q, k, v, feature_map_q, feature_map_k, window: int = 64, gamma: Gamma = 0.5,
                             scale: Optional[float] = None, positions: Optional[torch.Tensor] = None,
                             chunk_size: int = 64, eps: float = DEFAULT_EPS, block_size: Optional[int] = None,
                             return_state: bool = False, sinks: int = 0, decay: Optional[torch.Tensor] = None,
                             backend=None):
    """Hybrid attention of raw q/k with the feature maps applied block by block (never holding N-sized
    features); equal to ``hybrid_attention(q, k, v, fm_q(q), fm_k(k), ...)``. ``feature_map_k`` returns q's
    head count (grouped maps repeat); positions (N,) go to the maps (default 0..N-1).
    With ``return_state`` also returns ``(S (B, H, F, D), z (B, H, F))``, the linear state of keys
    ``0..N-w-1`` (what decoding continues from, next to the last ``w`` keys/values).
    Hedgehog maps on the CPU without autograd go through the fused kernel (:mod:`hedgehog.ops.cpu_kernel`); CUDA
    tensors with a ``backend`` that has fla's kernels through :func:`device_hybrid_attention` (without autograd in
    pieces, features per piece)."""
    B, H, N, d = q.shape
    if k.shape[:3] != (B, H, N) or v.shape[:3] != (B, H, N):
        raise ValueError(f"q, k, v must share (batch, heads, seq): {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if N == 0:
        raise ValueError("hybrid attention needs at least one position (got seq length 0)")
    if triton_fused.bound(backend, q):  # Hedgehog maps without autograd: the fused Triton kernels
        out = triton_fused.fused_maps(q, k, v, feature_map_q, feature_map_k, positions, (gamma, decay),
                                      window=window, sinks=sinks, gamma=gamma, decay=decay,
                                      scale=d ** -0.5 if scale is None else scale, eps=eps)
        if out is not None:
            return out if return_state else out[0]
    if positions is None:
        positions = torch.arange(N, device=q.device)
    gla = _device_kernel(backend, q, v, sinks)
    if gla is not None:
        if all(getattr(fm, "blockwise", False) for fm in (feature_map_q, feature_map_k)):  # features per piece
            feats = lambda fm, x: (lambda a, b: fm(x[:, :, a:b], positions[..., a:b]))
        else:  # maps whose output depends on the whole call
            feats = lambda fm, x: fm(x, positions)
        out = device_hybrid_attention(q, k, v, feats(feature_map_q, q), feats(feature_map_k, k), window, gamma,
                                      d ** -0.5 if scale is None else scale, gla, sinks, decay, eps)
        return out if return_state else out[0]
    if not all(getattr(fm, "blockwise", False) for fm in (feature_map_q, feature_map_k)):
        out = hybrid_attention(q, k, v, feature_map_q(q, positions), feature_map_k(k, positions), window, gamma,
                               scale, chunk_size, return_state=return_state, eps=eps, block_size=block_size,
                               sinks=sinks, decay=decay)
        return (out[0], out[1][0]) if return_state else out
    if not q.is_cuda and not sinks and decay is None:  # Hedgehog maps without autograd: the fused CPU kernel
        out = cpu_kernel.fused_hybrid_attention(q, k, v, feature_map_q, feature_map_k, window, gamma, scale, eps=eps)
        if out is not None:
            return out if return_state else out[0]
    fd = feature_map_q.feature_dim
    scale = d ** -0.5 if scale is None else scale
    y, (S, z) = _hybrid(q, k, v, q, k, feature_map_q, feature_map_k, positions, fd, window, gamma, scale,
                        chunk_size, block_size, eps, sinks, decay)
    y = y.reshape(B, H, N, -1).to(v.dtype)
    return (y, (S.reshape(B, H, fd, -1), z.reshape(B, H, fd))) if return_state else y
