"""The blocked, chunked causal form shared by linear and hybrid attention (:mod:`hedgehog.ops.linear_attention`,
:mod:`hedgehog.ops.hybrid`): the sequence in blocks of chunks, features fetched per block, a carried state, an
optional per-head decay; and the accumulation dtype every op uses (float32 for half inputs, float64 kept)."""
from __future__ import annotations

from typing import Callable, Union

import torch
import torch.nn.functional as F

# Features as a (B, H, N, F) tensor, or as a function ``(a, b) -> features of tokens a..b-1`` (so an op that splits a
# call computes them per piece)
Features = Union[torch.Tensor, Callable[[int, int], torch.Tensor]]

def acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# A CUDA forward without autograd through fla's kernels (the hybrid's device form, the linear form with feature maps)
# runs in pieces of about DEVICE_ROWS query rows (tokens x batch x heads), at least MIN_PIECE tokens: the features
# and fla's operands (several copies of F = 2d features per head and token), the exact part's float32 sums and fla's
# chunk states exist for one piece at a time, roughly 3 KB per row at head dim 64 in bf16 (~200 MB per piece). So a
# long prefill holds its output and one piece, where one call held all of it for every token (~2 GB at 64k tokens
# and 8 heads); the pieces stay few (8 at 64k tokens and 8 heads), each some 15-20 kernel launches. Not yet tuned
# on a GPU.
DEVICE_ROWS = 1 << 16
MIN_PIECE = 1024


def device_piece(rows_per_token: int) -> int:
    """Tokens per piece of a device forward without autograd, for ``rows_per_token`` (batch x heads) rows."""
    return max(MIN_PIECE, DEVICE_ROWS // max(1, rows_per_token))


def piece_bounds(n: int, piece: int):
    """``n`` tokens as ``max(1, n // piece)`` near-equal pieces of ``piece`` to ``2 * piece - 1`` tokens, as
    ``[(start, end), ...]``: no short tail (fla refuses fewer tokens than heads, and a hybrid piece's exact part needs
    ``window + sinks`` tokens before it)."""
    m = max(1, n // piece)
    return [(i * n // m, (i + 1) * n // m) for i in range(m)]


def feature_rows(phi: Features) -> Callable[[int, int], torch.Tensor]:
    """:data:`Features` as the function of a token range."""
    return phi if callable(phi) else (lambda a, b: phi[:, :, a:b])


def records(tensors=(), maps=(), features=()) -> bool:
    """Whether autograd records a call: grad mode is on and some input requires grad: a tensor in ``tensors``
    (None and numbers allowed), the output of a feature map in ``maps``, given as ``(fn, x, positions)``, or
    :data:`Features` in ``features``; maps and feature functions are probed on the first token (a map with
    trainable weights), only once the tensors have not decided. Grad mode alone is not enough: a frozen model
    called outside ``torch.no_grad()`` must still take the inference forms (less memory, faster).
    ``with torch.set_grad_enabled(records(...))`` runs a call as autograd would record it."""
    if not torch.is_grad_enabled():
        return False
    if any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
        return True
    if any(x.shape[2] > 0 and fn(x.narrow(2, 0, 1), pos.narrow(-1, 0, 1)).requires_grad for fn, x, pos in maps):
        return True
    return any(feature_rows(phi)(0, 1).requires_grad for phi in features)


def auto_block(bh: int, f: int, chunk: int, n: int) -> int:
    """Tokens per block so that per-block temporaries stay around a few MB (malloc reuses them)."""
    target = max(chunk, (1 << 19) // max(1, bh * f) // chunk * chunk)
    return min(target, -(-n // chunk) * chunk)


def block_chunks(get_q, get_k, i, L, chunk, bh, acc):
    """Block i's features as chunks: (q4, k4) (bh, nb, chunk, F), nb, and the zero rows ``pad`` appended
    to reach a multiple of ``chunk`` (zero keys add nothing; padded query rows are dropped by callers)."""
    pq, pk = get_q(i).to(acc), get_k(i).to(acc)
    pad = (-L) % chunk
    if pad:
        pq, pk = (F.pad(t, (0, 0, 0, pad)) for t in (pq, pk))
    nb = (L + pad) // chunk
    return pq.reshape(bh, nb, chunk, -1), pk.reshape(bh, nb, chunk, -1), nb, pad


def decay_factors(decay: torch.Tensor, chunk: int, nb: int, pad: int, acc):
    """Per-chunk factors of a decayed state, ``S_t = lambda S_{t-1} + phi_k_t v_t^T`` (query t then weighs key
    j <= t by ``lambda^(t - j)``), for ``decay = log lambda`` (bh,) and nb chunks, the last ``pad`` rows short:

    * ``q_in`` (bh, 1, C, 1): ``lambda^(t + 1)``, a query's view of the state entering its chunk;
    * ``intra`` (bh, 1, C, C): ``lambda^(t - j)`` on and below the diagonal;
    * ``k_out`` (bh, nb, C, 1): ``lambda^(len - 1 - j)``, a key's weight in the state leaving its chunk;
    * ``carry`` (bh, nb): ``lambda^len``, the decay of the state across a chunk (``len``: its real rows).
    Exponents are never negative, so every factor is in (0, 1] (padding keys are zero anyway)."""
    ld = decay.to(acc)
    t = torch.arange(chunk, device=ld.device, dtype=acc)
    lens = torch.full((nb,), float(chunk), device=ld.device, dtype=acc)
    lens[-1] = chunk - pad
    q_in = torch.exp(ld[:, None] * (t + 1)).view(-1, 1, chunk, 1)
    diff = t[:, None] - t[None, :]
    intra = torch.exp(ld[:, None, None] * diff.clamp_min(0)).masked_fill(diff < 0, 0.0).unsqueeze(1)
    k_out = torch.exp(ld[:, None, None] * (lens[:, None] - 1 - t[None, :]).clamp_min(0)).unsqueeze(-1)
    carry = torch.exp(ld[:, None] * lens)
    return q_in, intra, k_out, carry


def causal_blocks(get_q, get_k, v_blocks, chunk, state, eps, acc, extra=None, decay=None):
    """Blocked, chunked causal linear attention with a carried state.

    The sequence comes as blocks (``v_blocks``: (BH, L_i, D) each, every L_i but the last a multiple of
    ``chunk``); features are fetched per block through ``get_q(i)`` / ``get_k(i)`` -> (BH, L_i, F), so a
    caller can apply its feature maps block by block and never hold N-sized features. Inputs are
    split once with ``Tensor.split`` (its backward is one concat; slicing per block would make
    autograd zero-fill a full-size gradient per block). Within a block all
    chunks are processed in batched matmuls:

      * intra-chunk: the (C x C) masked product ``phi_q phi_k^T`` times v (and its row sums),
      * inter-chunk: ``phi_q @ S_excl`` (and ``phi_q . z_excl``), where the state entering each chunk
        is the carried state plus an exclusive prefix sum of the block's per-chunk ``phi_k^T v``.

    Cost O(N * C * (F + D) + N * F * D); memory O(block * (F + D)) besides the output. Blocks keep
    every temporary a few MB, which malloc recycles: on this class of CPU fresh large allocations
    (page faults) cost more than the arithmetic.

    Without autograd (inference, prefill) the values carry a column of ones, ``[v, 1]``: then the
    same three matmuls that give the numerator also give the denominator (``a @ [v, 1]`` holds the
    row sums of ``a``, ``phi_k^T [v, 1]`` holds ``z``, ``phi_q @ [S, z]`` holds ``phi_q . z``), instead
    of separate row sums and matrix-vector products. With autograd the plain form is kept (its
    backward does not go through in-place buffers). Grad mode picks the form: callers run this under
    ``torch.set_grad_enabled(records(...))``, so a call nothing in which requires grad is inference.

    Args: v_blocks in ``acc``; state None or (S (BH, F, D), z (BH, F)); ``extra(i, start, L)``, if given,
        returns ``[num, den]`` packed as (BH, L, D + 1), added to block i's numerator/denominator before
        the division (the hybrid layer's sliding-window softmax part); ``decay`` (BH,) ``log lambda`` of a
        decayed state (see :func:`decay_factors`), None for the plain sum.
    Returns: y (BH, N, D) in ``acc``, (S, z).
    """
    n = sum(b.shape[1] for b in v_blocks)
    if n == 0:
        raise ValueError("linear attention needs at least one position (got seq length 0)")
    if not torch.is_grad_enabled():
        return causal_blocks_inference(get_q, get_k, v_blocks, n, chunk, state, eps, acc, extra, decay)
    bh, _, d = v_blocks[0].shape
    outs = []
    S = z = None
    if state is not None:
        S, z = state
    s = 0
    for i, vb in enumerate(v_blocks):
        L = vb.shape[1]
        q4, k4, nb, pad = block_chunks(get_q, get_k, i, L, chunk, bh, acc)
        fd = q4.shape[-1]
        if S is None:
            S, z = vb.new_zeros(bh, fd, d), vb.new_zeros(bh, fd)
        v4 = (F.pad(vb, (0, 0, 0, pad)) if pad else vb).reshape(bh, nb, chunk, d)
        a = (q4 @ k4.transpose(-1, -2)).tril_()  # tril_ on a matmul output is autograd-safe
        if decay is not None:
            q_in, intra, k_out, carry = decay_factors(decay, chunk, nb, pad, acc)
            a = a * intra
            k4 = k4 * k_out
        kv = k4.transpose(-1, -2) @ v4  # (bh, nb, F, D): each chunk's own contribution
        ks = k4.sum(2)  # (bh, nb, F)
        if decay is None:
            S_ex = kv.cumsum(1) - kv + S.unsqueeze(1)
            z_ex = ks.cumsum(1) - ks + z.unsqueeze(1)
            S = S_ex[:, -1] + kv[:, -1]
            z = z_ex[:, -1] + ks[:, -1]
        else:  # the state entering chunk c: the one entering c - 1, decayed across it, plus its keys
            S_list, z_list = [], []
            for c in range(nb):
                S_list.append(S)
                z_list.append(z)
                S = carry[:, c, None, None] * S + kv[:, c]
                z = carry[:, c, None] * z + ks[:, c]
            S_ex, z_ex = torch.stack(S_list, 1), torch.stack(z_list, 1)
            q4 = q4 * q_in
        num = torch.baddbmm(
            (a @ v4).view(bh * nb, chunk, d), q4.reshape(bh * nb, chunk, fd), S_ex.view(bh * nb, fd, d)
        ).view(bh, nb * chunk, d)[:, :L]
        den = ((q4 @ z_ex.unsqueeze(-1)).squeeze(-1) + a.sum(-1)).view(bh, nb * chunk, 1)[:, :L]
        if extra is not None:
            nd_x = extra(i, s, L)
            num, den = num + nd_x[..., :d], den + nd_x[..., d:]
        # a list + one cat: slice-assigning into y would make autograd copy y's whole
        outs.append(num / den.clamp_min(eps))  # gradient once per block (O(N^2 / block))
        s += L
    y = outs[0] if len(outs) == 1 else torch.cat(outs, 1)
    return y, (S, z)


def causal_blocks_inference(get_q, get_k, v_blocks, n, chunk, state, eps, acc, extra, decay=None):
    """``causal_blocks`` without autograd: values augmented with a ones column (see there), the
    state carried as one ``[S, z]`` tensor (BH, F, D + 1), one output tensor written block by block."""
    bh, _, d = v_blocks[0].shape
    y = v_blocks[0].new_empty(bh, n, d)
    L0 = v_blocks[0].shape[1]
    va_buf = v_blocks[0].new_empty(bh, L0 + (-L0) % chunk, d + 1)
    Sz = None
    s = 0
    for i, vb in enumerate(v_blocks):
        L = vb.shape[1]
        q4, k4, nb, pad = block_chunks(get_q, get_k, i, L, chunk, bh, acc)
        fd = q4.shape[-1]
        if Sz is None:
            Sz = vb.new_zeros(bh, fd, d + 1)
            if state is not None:
                Sz[..., :d], Sz[..., d] = state
        va = va_buf[:, : L + pad]
        va[:, :L, :d] = vb
        va[:, :L, d] = 1.0
        if pad:
            va[:, L:] = 0.0
        v4 = va.view(bh, nb, chunk, d + 1)
        a = (q4 @ k4.transpose(-1, -2)).tril_()
        if decay is not None:  # see decay_factors
            q_in, intra, k_out, carry = decay_factors(decay, chunk, nb, pad, acc)
            a.mul_(intra)
            k4 = k4 * k_out
        kv = k4.transpose(-1, -2) @ v4  # (bh, nb, F, D + 1): each chunk's [S, z] contribution
        Sz_ex = torch.empty_like(kv)  # [S, z] entering each chunk (exclusive prefix sum)
        Sz_ex[:, 0] = Sz
        if decay is None:
            for c in range(1, nb):
                torch.add(Sz_ex[:, c - 1], kv[:, c - 1], out=Sz_ex[:, c])
            Sz = Sz_ex[:, -1] + kv[:, -1]
        else:
            for c in range(1, nb):
                torch.addcmul(kv[:, c - 1], Sz_ex[:, c - 1], carry[:, c - 1, None, None], out=Sz_ex[:, c])
            Sz = torch.addcmul(kv[:, -1], Sz_ex[:, -1], carry[:, -1, None, None])
            q4 = q4 * q_in
        nd = torch.baddbmm(
            (a @ v4).view(bh * nb, chunk, d + 1), q4.reshape(bh * nb, chunk, fd), Sz_ex.view(bh * nb, fd, d + 1)
        ).view(bh, nb * chunk, d + 1)[:, :L]
        if extra is not None:
            nd.add_(extra(i, s, L))
        num, den = nd[..., :d], nd[..., d:]
        torch.div(num, den.clamp_min_(eps), out=y[:, s:s + L])
        s += L
    return y, (Sz[..., :d].contiguous(), Sz[..., d].contiguous())
