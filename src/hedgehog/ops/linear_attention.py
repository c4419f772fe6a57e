"""Normalised linear attention in pure PyTorch: the float64-checkable reference and the fast CPU path.

Every function takes feature-mapped queries/keys, so it is agnostic of the feature map:

    y_i = sum_{j<=i} (phi_q_i . phi_k_j) v_j  /  sum_{j<=i} phi_q_i . phi_k_j      (causal)

Shapes: ``phi_q, phi_k: (batch, heads, seq, F)``, ``v: (batch, heads, seq, D)``.
The recurrent state is ``(S, z)`` with ``S = sum_j phi_k_j v_j^T: (B, H, F, D)`` and
``z = sum_j phi_k_j: (B, H, F)``.

Precision: half/bfloat16 inputs are promoted to float32 for every product and for the state
(the state is a long sum; accumulating it in 16 bits loses tokens). float64 stays float64, which is
what the tests use as ground truth. Outputs come back in ``v``'s dtype; states stay float32/64.

Denominator guard: the denominator is ``max(den, eps)`` (``eps=1e-6`` by default). With the
positive feature maps of this package ``den > 0`` almost always; the guard only fires on rows whose
features are all (numerically) zero, e.g. a ReLU map on a query with no positive entry. Such a row
then returns ``num / eps`` where ``num`` is itself ~0, i.e. a zero output instead of NaN/inf. The same
guard is applied in the quadratic reference so that the two agree exactly.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from hedgehog.ops import backends, cpu_kernel
from hedgehog.ops.masks import causal_drop_mask

State = Tuple[torch.Tensor, torch.Tensor]

DEFAULT_EPS = 1e-6


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _check_inputs(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("phi_q", phi_q), ("phi_k", phi_k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(
                f"{name} must have shape (batch, heads, seq, dim), got {tuple(t.shape)}; "
                "add the missing axes (e.g. x.unsqueeze(1) for a single head)"
            )
    if phi_q.shape[:2] != phi_k.shape[:2] or phi_q.shape[:2] != v.shape[:2]:
        raise ValueError(
            f"batch/heads differ: phi_q {tuple(phi_q.shape)}, phi_k {tuple(phi_k.shape)}, v {tuple(v.shape)}; "
            "for grouped-query attention repeat k/v heads to the query heads first"
        )
    if phi_q.shape[-1] != phi_k.shape[-1]:
        raise ValueError(
            f"feature dims differ: phi_q has {phi_q.shape[-1]}, phi_k has {phi_k.shape[-1]}; "
            "q and k must go through feature maps of the same feature_dim"
        )
    if phi_k.shape[2] != v.shape[2]:
        raise ValueError(f"phi_k has {phi_k.shape[2]} positions but v has {v.shape[2]}")


def _check_state(state: State, phi_k: torch.Tensor, v: torch.Tensor) -> None:
    S, z = state
    B, H, _, Fd = phi_k.shape
    D = v.shape[-1]
    if tuple(S.shape) != (B, H, Fd, D) or tuple(z.shape) != (B, H, Fd):
        raise ValueError(
            f"state shapes S {tuple(S.shape)}, z {tuple(z.shape)} do not match "
            f"expected S ({B}, {H}, {Fd}, {D}) and z ({B}, {H}, {Fd})"
        )


def quadratic_linear_attention(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    return_weights: bool = False,
    eps: float = DEFAULT_EPS,
):
    """O(N^2) reference: materialises the normalised attention weights.

    Args:
        phi_q: (B, H, Nq, F); phi_k: (B, H, Nk, F); v: (B, H, Nk, D).
        causal: query i sees keys j <= i + (Nk - Nq) (queries are the last Nq positions).
    Returns:
        y: (B, H, Nq, D) in v's dtype, and with ``return_weights`` also the weights
        (B, H, Nq, Nk) in the accumulation dtype (rows sum to 1 unless the guard fired).
    """
    _check_inputs(phi_q, phi_k, v)
    acc = _acc_dtype(v)
    a = phi_q.to(acc) @ phi_k.to(acc).transpose(-1, -2)
    if causal:
        nq, nk = a.shape[-2:]
        a = a.masked_fill(causal_drop_mask(nq, nk, a.device), 0.0)
    w = a / a.sum(-1, keepdim=True).clamp_min(eps)
    y = (w @ v.to(acc)).to(v.dtype)
    return (y, w) if return_weights else y


def kernel_linear_attention(a: torch.Tensor, v: torch.Tensor, causal: bool = True, eps: float = DEFAULT_EPS):
    """Linear attention from its kernel matrix ``a = phi(q) phi(k)^T`` (B, H, Nq, Nk), given directly.

    For maps with a closed-form kernel (Taylor: ``1 + s + s^2/2``) this quadratic form costs
    O(N^2 d) and beats the O(N F d) linear form while N < F. Same masking and normalisation as
    :func:`quadratic_linear_attention`; v: (B, H, Nk, D).
    """
    if a.dim() != 4 or v.dim() != 4 or a.shape[:2] != v.shape[:2] or a.shape[-1] != v.shape[2]:
        raise ValueError(f"kernel matrix (B, H, Nq, Nk) and v (B, H, Nk, D) do not match: "
                         f"{tuple(a.shape)}, {tuple(v.shape)}")
    acc = _acc_dtype(v)
    a = a.to(acc)
    if causal:
        nq, nk = a.shape[-2:]
        a = a.tril(nk - nq)
    # normalise after the readout: one (Nq, D) division instead of an (Nq, Nk) one
    return ((a @ v.to(acc)) / a.sum(-1, keepdim=True).clamp_min(eps)).to(v.dtype)


def _noncausal(phi_q, phi_k, v, eps):
    S = phi_k.transpose(-1, -2) @ v  # (B,H,F,D)
    z = phi_k.sum(-2)  # (B,H,F)
    num = phi_q @ S
    den = (phi_q @ z.unsqueeze(-1)).clamp_min(eps)
    return num / den, (S, z)


def _auto_block(bh: int, f: int, chunk: int, n: int) -> int:
    """Tokens per block so that per-block temporaries stay around a few MB (malloc reuses them)."""
    target = max(chunk, (1 << 19) // max(1, bh * f) // chunk * chunk)
    return min(target, -(-n // chunk) * chunk)


def _block_chunks(get_q, get_k, i, L, chunk, bh, acc):
    """Block i's features as chunks: (q4, k4) (bh, nb, chunk, F), nb, and the zero rows ``pad`` appended
    to reach a multiple of ``chunk`` (zero keys add nothing; padded query rows are dropped by callers)."""
    pq, pk = get_q(i).to(acc), get_k(i).to(acc)
    pad = (-L) % chunk
    if pad:
        pq, pk = (F.pad(t, (0, 0, 0, pad)) for t in (pq, pk))
    nb = (L + pad) // chunk
    return pq.reshape(bh, nb, chunk, -1), pk.reshape(bh, nb, chunk, -1), nb, pad


def _decay_factors(decay: torch.Tensor, chunk: int, nb: int, pad: int, acc):
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


def _causal_blocks(get_q, get_k, v_blocks, chunk, state, eps, acc, extra=None, decay=None):
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
    backward does not go through in-place buffers).

    Args: v_blocks in ``acc``; state None or (S (BH, F, D), z (BH, F)); ``extra(i, start, L)``, if given,
        returns ``[num, den]`` packed as (BH, L, D + 1), added to block i's numerator/denominator before
        the division (the hybrid layer's sliding-window softmax part); ``decay`` (BH,) ``log lambda`` of a
        decayed state (see :func:`_decay_factors`), None for the plain sum.
    Returns: y (BH, N, D) in ``acc``, (S, z).
    """
    n = sum(b.shape[1] for b in v_blocks)
    if n == 0:
        raise ValueError("linear attention needs at least one position (got seq length 0)")
    if not torch.is_grad_enabled():
        return _causal_blocks_inference(get_q, get_k, v_blocks, n, chunk, state, eps, acc, extra, decay)
    bh, _, d = v_blocks[0].shape
    outs = []
    S = z = None
    if state is not None:
        S, z = state
    s = 0
    for i, vb in enumerate(v_blocks):
        L = vb.shape[1]
        q4, k4, nb, pad = _block_chunks(get_q, get_k, i, L, chunk, bh, acc)
        fd = q4.shape[-1]
        if S is None:
            S, z = vb.new_zeros(bh, fd, d), vb.new_zeros(bh, fd)
        v4 = (F.pad(vb, (0, 0, 0, pad)) if pad else vb).reshape(bh, nb, chunk, d)
        a = (q4 @ k4.transpose(-1, -2)).tril_()  # tril_ on a matmul output is autograd-safe
        if decay is not None:
            q_in, intra, k_out, carry = _decay_factors(decay, chunk, nb, pad, acc)
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


def _causal_blocks_inference(get_q, get_k, v_blocks, n, chunk, state, eps, acc, extra, decay=None):
    """``_causal_blocks`` without autograd: values augmented with a ones column (see there), the
    state carried as one ``[S, z]`` tensor (BH, F, D + 1), one output tensor written block by block."""
    bh, _, d = v_blocks[0].shape
    y = v_blocks[0].new_empty(bh, n, d)
    L0 = v_blocks[0].shape[1]
    va_buf = v_blocks[0].new_empty(bh, L0 + (-L0) % chunk, d + 1)
    Sz = None
    s = 0
    for i, vb in enumerate(v_blocks):
        L = vb.shape[1]
        q4, k4, nb, pad = _block_chunks(get_q, get_k, i, L, chunk, bh, acc)
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
        if decay is not None:  # see _decay_factors
            q_in, intra, k_out, carry = _decay_factors(decay, chunk, nb, pad, acc)
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


def _check_chunking(chunk_size: int, block_size: Optional[int]) -> None:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if block_size is not None and (block_size < chunk_size or block_size % chunk_size):
        raise ValueError(f"block_size ({block_size}) must be a positive multiple of chunk_size ({chunk_size})")


def linear_attention(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    chunk_size: int = 64,
    initial_state: Optional[State] = None,
    return_state: bool = False,
    eps: float = DEFAULT_EPS,
    backend="auto",
    block_size: Optional[int] = None,
):
    """Normalised linear attention without an N x N tensor.

    Args:
        phi_q, phi_k: (B, H, N, F) non-negative features; v: (B, H, N, D).
        causal: chunked causal form (training/prefill); otherwise every query sees every key.
        chunk_size: tokens per chunk of the causal form; any N works, not only multiples.
        initial_state: ``(S (B,H,F,D), z (B,H,F))`` of earlier tokens (causal only), e.g. from a
            previous call with ``return_state=True``.
        return_state: also return the state after the last token, to continue with
            :func:`recurrent_step` or another call.
        backend: ``"auto"`` (fla kernels on CUDA when installed, else torch), ``"torch"``, ``"fla"``, or a
            :class:`~hedgehog.ops.backends.Backend` bound once by the caller (as the attention layer does).
        block_size: tokens per block of the causal form (a multiple of chunk_size); default sizes
            blocks so their temporaries stay ~ a few MB.
    Returns:
        y (B, H, N, D) in v's dtype, and ``(S, z)`` in float32/float64 when ``return_state``.
    """
    _check_inputs(phi_q, phi_k, v)
    if phi_q.shape[2] != phi_k.shape[2]:
        raise ValueError(
            f"phi_q has {phi_q.shape[2]} positions and phi_k {phi_k.shape[2]}; use "
            "quadratic_linear_attention for queries against a different number of keys"
        )
    if initial_state is not None:
        if not causal:
            raise ValueError("initial_state is only meaningful for causal attention")
        _check_state(initial_state, phi_k, v)
    _check_chunking(chunk_size, block_size)

    if causal:
        fast = backends.resolve(backend).causal(phi_q)  # CUDA: fla when bound (backend='fla' on CPU: an error)
        if fast is not None:
            out = fast(phi_q, phi_k, v, initial_state, eps)
        else:  # CPU, no autograd, float32/half: the fused kernel (None where it does not apply)
            out = cpu_kernel.fused_linear_attention(phi_q, phi_k, v, initial_state, eps)
        if out is not None:
            y, st = out
            return (y, st) if return_state else y

    acc = _acc_dtype(v)
    q, k, vv = phi_q.to(acc), phi_k.to(acc), v.to(acc)
    if causal:
        B, H, N, Fd = q.shape
        D = v.shape[-1]
        st = None
        if initial_state is not None:
            st = (initial_state[0].to(acc).reshape(B * H, Fd, D), initial_state[1].to(acc).reshape(B * H, Fd))
        chunk = max(1, min(chunk_size, N))
        blk = block_size or _auto_block(B * H, Fd, chunk, N)
        qb, kb, vb = (t.reshape(B * H, N, -1).split(blk, 1) for t in (q, k, vv))
        y, (S, z) = _causal_blocks(qb.__getitem__, kb.__getitem__, vb, chunk, st, eps, acc)
        y = y.reshape(B, H, N, D)
        st = (S.reshape(B, H, Fd, D), z.reshape(B, H, Fd))
    else:
        y, st = _noncausal(q, k, vv, eps)
    y = y.to(v.dtype)
    return (y, st) if return_state else y


def feature_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    feature_map_q,
    feature_map_k,
    causal: bool = True,
    positions: Optional[torch.Tensor] = None,
    chunk_size: int = 64,
    initial_state: Optional[State] = None,
    return_state: bool = False,
    eps: float = DEFAULT_EPS,
    block_size: Optional[int] = None,
    backend="auto",
):
    """Linear attention of raw q/k, applying the feature maps block by block (causal, torch path).

    Equal to ``linear_attention(feature_map_q(q), feature_map_k(k), v, ...)`` but never holds the
    N-sized feature tensors: features of each block are computed, used and dropped. This is the
    form to use for long prefills (peak memory and speed), and what the attention layer calls.

    Args:
        q: (B, H, N, d); k: (B, H_k, N, d); v: (B, H, N, D). ``feature_map_k`` must return H heads
            (for grouped-query attention it repeats its H_k heads' features).
        feature_map_q, feature_map_k: callables ``(x (B,H,n,d), positions) -> (B,H,n,F)``.
        positions: (N,) or (B, N) absolute positions, passed through to the feature maps
            (sliced per block); None means 0..N-1.
    Maps whose output depends on the whole call (``blockwise`` False, e.g. cosFormer without
    ``max_len``) are applied to the full sequence first. Causal Hedgehog maps on the CPU without autograd
    go through the fused kernel (:mod:`hedgehog.ops.cpu_kernel`; its own chunk size) when it is available.
    """
    if q.dim() != 4 or k.dim() != 4 or v.shape[:3] != q.shape[:3] or k.shape[0] != q.shape[0] \
            or k.shape[2] != q.shape[2]:
        raise ValueError(f"q, k, v must be (batch, heads, seq, dim) with equal batch/seq (and v with q's heads); "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, N, _ = q.shape
    if positions is None and N > 0:
        positions = torch.arange(N, device=q.device)
    if causal and not q.is_cuda and k.shape[1] == H:  # Hedgehog maps without autograd: the fused CPU kernel
        out = cpu_kernel.fused_hedgehog_attention(q, k, v, feature_map_q, feature_map_k, initial_state, eps)
        if out is not None:
            return out if return_state else out[0]
    blockwise = all(getattr(fm, "blockwise", False) for fm in (feature_map_q, feature_map_k))
    if not causal or not blockwise or (q.is_cuda and backends.resolve(backend).causal(q) is not None):
        return linear_attention(feature_map_q(q, positions), feature_map_k(k, positions), v, causal=causal,
                                chunk_size=chunk_size, initial_state=initial_state, return_state=return_state,
                                eps=eps, backend=backend, block_size=block_size)
    _check_chunking(chunk_size, block_size)
    D = v.shape[-1]
    acc = _acc_dtype(v)

    fd = feature_map_q.feature_dim if hasattr(feature_map_q, "feature_dim") else feature_map_q(q[:, :, :1]).shape[-1]
    chunk = max(1, min(chunk_size, N))
    blk = block_size or _auto_block(B * H, fd, chunk, N)
    pos_blocks = positions.split(blk, -1)

    def getter(fm, x):
        blocks = x.split(blk, 2)

        def get(i):
            phi = fm(blocks[i], pos_blocks[i])
            if phi.shape[:3] != (B, H, blocks[i].shape[2]):
                raise ValueError(f"feature map returned {tuple(phi.shape)}; expected ({B}, {H}, "
                                 f"{blocks[i].shape[2]}, F): a key map for fewer (grouped) heads must repeat "
                                 "its features to the query heads")
            return phi.reshape(B * H, blocks[i].shape[2], -1)
        return get

    st = None
    if initial_state is not None:
        st = (initial_state[0].to(acc).reshape(B * H, fd, D), initial_state[1].to(acc).reshape(B * H, fd))
    v_blocks = v.to(acc).reshape(B * H, N, D).split(blk, 1)
    y, (S, z) = _causal_blocks(getter(feature_map_q, q), getter(feature_map_k, k), v_blocks, chunk, st, eps, acc)
    y = y.reshape(B, H, N, D).to(v.dtype)
    if return_state:
        return y, (S.reshape(B, H, fd, D), z.reshape(B, H, fd))
    return y
