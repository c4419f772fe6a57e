"""The exact part of the hybrid: causal softmax over the last ``window`` keys (and the first ``sinks``), as a
numerator/denominator pair the hybrid adds its linear part to before one division (:mod:`hedgehog.ops.hybrid`),
and alone as :func:`window_softmax_attention`, the no-training baseline of a converted model."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from hedgehog.ops import triton_window
from hedgehog.ops.chunked import acc_dtype, records

def window_part(q_rows, k_rows, v_rows, window: int, scale: float, gamma_rows: torch.Tensor, acc,
                 sub: Optional[int] = None, sinks: int = 0):
    """The sliding-window numerator/denominator of block i (autograd form): a callable for
    ``causal_blocks(extra=)``, returning them packed as ``[num, den]`` (BH, L, D + 1).

    ``q_rows(lo, hi)`` / ``k_rows`` / ``v_rows`` return rows lo..hi-1 of the (BH, N, d) queries, keys and
    values in ``acc`` (see :class:`_Rows`). Queries go in sub-chunks of ``c`` rows (``sub``, default
    ``min(w, 16)`` when it divides w); sub-chunk m is compared with the ``c + w`` keys that end with it
    (an ``unfold`` view of the keys from ``start - w``) and masked to ``n - w < i <= n``. A smaller c
    wastes fewer masked entries (w of every c + w are used) at the price of smaller matmuls.
    With ``sinks``, the first ``sinks`` keys join every row that sees them no longer in its window
    (``i <= n - w``), under the same row max. Without autograd :func:`window_inference` computes the same
    values faster.
    """
    w = window
    sink_k = k_rows(0, sinks) if sinks else None
    sink_v = v_rows(0, sinks) if sinks else None
    c = sub or (16 if w % 16 == 0 and w > 16 else w)
    j = torch.arange(c + w, device=gamma_rows.device)[None, :]
    b = torch.arange(c, device=gamma_rows.device)[:, None]
    drop = (j <= b) | (j > b + w)  # key j of the c + w vs query b: outside the window

    def extra(i, start, L):
        qb = q_rows(start, start + L)
        bh, _, d = qb.shape
        pad = (-L) % c
        lo = start - w
        ks, vs = k_rows(max(lo, 0), start + L), v_rows(max(lo, 0), start + L)
        dv = vs.shape[-1]
        front = max(0, -lo)
        if front or pad:
            ks, vs = F.pad(ks, (0, 0, front, pad)), F.pad(vs, (0, 0, front, pad))
        if pad:
            qb = F.pad(qb, (0, 0, 0, pad))
        nb = (L + pad) // c
        q4 = qb.reshape(bh, nb, c, d)
        k4 = ks.unfold(1, c + w, c)  # (bh, nb, d, c + w), a view
        v4 = vs.unfold(1, c + w, c).transpose(-1, -2)  # (bh, nb, c + w, D)
        mask = drop.expand(nb, c, c + w)
        if front:  # keys before position 0 (first block only)
            mask = mask.clone()
            for m in range(min(nb, -(-front // c))):
                mask[m, :, :front - m * c] = True
        s = ((q4 @ k4) * scale).masked_fill(mask, float("-inf"))
        if sink_k is None:
            e = torch.exp(s - s.amax(-1, keepdim=True))
            num = (e @ v4).view(bh, nb * c, dv)[:, :L] * gamma_rows
            den = e.sum(-1).view(bh, nb * c, 1)[:, :L] * gamma_rows
            return torch.cat([num, den], -1)
        rows = torch.arange(start, start + nb * c, device=qb.device)
        late = torch.arange(sink_k.shape[1], device=qb.device)[None, :] > rows[:, None] - w  # still in the window
        ss = ((qb @ sink_k.transpose(-1, -2)) * scale).masked_fill(late, float("-inf"))  # (bh, nb * c, ns)
        mx = torch.maximum(s.amax(-1).reshape(bh, nb * c), ss.amax(-1)).unsqueeze(-1)
        e = torch.exp(s - mx.view(bh, nb, c, 1))
        es = torch.exp(ss - mx)
        num = ((e @ v4).view(bh, nb * c, dv) + es @ sink_v)[:, :L] * gamma_rows
        den = (e.sum(-1).view(bh, nb * c, 1) + es.sum(-1, keepdim=True))[:, :L] * gamma_rows
        return torch.cat([num, den], -1)

    return extra


_EXP_FLOOR = -80.0  # exp(-80) ~ 2e-35: a masked key's weight relative to the row max


def window_inference(q, k, v, window: int, scale: float, gamma_rows: torch.Tensor, sub: int = 32,
                      piece: int = 8192, sinks: int = 0) -> torch.Tensor:
    """The sliding-window part of every query at once, without autograd: (BH, N, D + 1) = ``[num, den]``.

    Per head, queries go in sub-chunks of ``c`` rows, each against the ``c + w`` keys that end with it:
    an overlapping ``as_strided`` view of a zero-fronted copy of the head's keys, so one ``bmm`` per piece
    of the sequence reads them in place (a 4-D matmul over unfold views would copy every window).
    The mask (keys outside ``n - w < i <= n``) enters as an additive 0/-inf bias of the score matmul;
    ``gamma`` goes into the exponent (``g exp(s - c) = exp(s - (c - log g))``) and the denominator comes
    out of the value matmul against ``[v, 1]``.

    Speed detail: scores are clamped to ``_EXP_FLOOR`` below their row max before ``exp``: vectorised exp
    leaves its fast path for -inf and underflowing inputs (about 4x and 10x slower here). A masked key
    therefore weighs ``e^-80`` (~2e-35) of the row max instead of exactly 0 -- far below float32 rounding
    (with ``gamma = 0`` the floor is -inf and the head's window weighs exactly 0). ``sinks``: as in
    :func:`window_part`.
    """
    bh, n, d = q.shape
    D = v.shape[-1]
    w = window
    c = min(sub, w)
    pad = (-n) % c
    piece = max(c, piece // c * c)
    dev, dt = q.device, q.dtype
    j = torch.arange(c + w, device=dev)[None, :]
    b = torch.arange(c, device=dev)[:, None]
    bias = torch.zeros(c, c + w, dtype=dt, device=dev).masked_fill_((j <= b) | (j > b + w), float("-inf"))
    out = q.new_empty(bh, n + pad, D + 1)
    kp = q.new_zeros(w + n + pad, d)  # key rows shifted by w: row r holds key r - w (zeros outside 0..n-1)
    vp = q.new_zeros(w + n + pad, D + 1)  # [v, 1] likewise (zeros outside, so padding adds nothing)
    vp[w:w + n, D] = 1.0
    log_g = gamma_rows.reshape(bh).log().tolist()  # log 0 = -inf: that head's window weighs nothing
    ns = min(sinks, n)
    if ns:  # sink j joins row r once it has left r's window (j <= r - w)
        rows = torch.arange(n + pad, device=dev)
        late = torch.arange(ns, device=dev)[None, :] > rows[:, None] - w
        sinkV = q.new_ones(ns, D + 1)
    for h in range(bh):
        kp[w:w + n] = k[h]
        vp[w:w + n, :D] = v[h]
        qs = q[h] * scale
        if ns:
            sinkV[:, :D] = v[h, :ns]
        if pad:
            qs = F.pad(qs, (0, 0, 0, pad))
        for s0 in range(0, n + pad, piece):
            L = min(piece, n + pad - s0)
            nb = L // c
            K = kp.as_strided((nb, c + w, d), (c * d, d, 1), s0 * d)
            V = vp.as_strided((nb, c + w, D + 1), (c * (D + 1), D + 1, 1), s0 * (D + 1))
            sc = torch.baddbmm(bias, qs[s0:s0 + L].view(nb, c, d), K.transpose(1, 2))
            if s0 == 0:  # keys before position 0
                for m in range(min(nb, -(-w // c))):
                    sc[m, :, :w - m * c] = float("-inf")
            if not ns:
                e = sc.sub_(sc.amax(-1, keepdim=True).sub_(log_g[h])).clamp_min_(_EXP_FLOOR + log_g[h]).exp_()
                torch.bmm(e, V, out=out[h, s0:s0 + L].view(nb, c, D + 1))
                continue
            ss = (qs[s0:s0 + L] @ k[h, :ns].transpose(0, 1)).masked_fill_(late[s0:s0 + L], float("-inf"))
            mx = torch.maximum(sc.amax(-1).view(L), ss.amax(-1)).sub_(log_g[h]).unsqueeze(-1)  # (L, 1)
            e = sc.sub_(mx.view(nb, c, 1)).clamp_min_(_EXP_FLOOR + log_g[h]).exp_()
            es = ss.sub_(mx).clamp_min_(_EXP_FLOOR + log_g[h]).exp_()
            o = out[h, s0:s0 + L]
            torch.bmm(e, V, out=o.view(nb, c, D + 1))
            o.addmm_(es, sinkV)
    return out[:, :n]


def window_softmax_attention(q, k, v, window: int, sinks: int = 0, scale: Optional[float] = None) -> torch.Tensor:
    """Exact softmax attention limited to the last ``window`` keys and the first ``sinks`` (StreamingLLM), causal,
    in O(N * (window + sinks)): the hybrid's exact part alone. The no-training baseline of a converted model.

    Args: q, k (B, H, N, d); v (B, H, N, D). Returns y (B, H, N, D) in v's dtype. Differentiable.
    """
    B, H, N, d = q.shape
    if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q, k, v must share (batch, heads, seq): {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    acc = acc_dtype(v)
    scale = d ** -0.5 if scale is None else scale
    q3, k3, v3 = (t.to(acc).reshape(B * H, N, -1) for t in (q, k, v))
    if acc == torch.float32 and triton_window.serves(q3) and triton_window.fits(d, v.shape[-1], sinks):
        # CUDA: one Triton kernel
        num, den = triton_window.window_num_den(q3, k3, v3, window, scale, sinks)
        return (num / den.unsqueeze(-1)).reshape(B, H, N, -1).to(v.dtype)
    ones = torch.ones(B * H, 1, 1, dtype=acc, device=q.device)
    if records((q, k, v)):
        rows = lambda t: (lambda lo, hi: t[:, lo:hi])
        nd = window_part(rows(q3), rows(k3), rows(v3), window, scale, ones, acc, sinks=sinks)(0, 0, N)
    else:
        nd = window_inference(q3, k3, v3, window, scale, ones, sinks=sinks)
    D = v.shape[-1]
    return (nd[..., :D] / nd[..., D:]).reshape(B, H, N, D).to(v.dtype)
