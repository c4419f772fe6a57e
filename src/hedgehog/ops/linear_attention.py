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

from typing import Callable, Optional, Tuple

import torch

from hedgehog.ops import backends, cpu_kernel, triton_fused
from hedgehog.ops.chunked import acc_dtype, auto_block, causal_blocks, device_piece, piece_bounds, records
from hedgehog.ops.masks import causal_drop_mask

State = Tuple[torch.Tensor, torch.Tensor]

DEFAULT_EPS = 1e-6


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
    acc = acc_dtype(v)
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
    acc = acc_dtype(v)
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

    acc = acc_dtype(v)
    q, k, vv = phi_q.to(acc), phi_k.to(acc), v.to(acc)
    if causal:
        B, H, N, Fd = q.shape
        D = v.shape[-1]
        st = None
        if initial_state is not None:
            st = (initial_state[0].to(acc).reshape(B * H, Fd, D), initial_state[1].to(acc).reshape(B * H, Fd))
        chunk = max(1, min(chunk_size, N))
        blk = block_size or auto_block(B * H, Fd, chunk, N)
        qb, kb, vb = (t.reshape(B * H, N, -1).split(blk, 1) for t in (q, k, vv))
        with torch.set_grad_enabled(records((q, k, vv, *(st or ())))):
            y, (S, z) = causal_blocks(qb.__getitem__, kb.__getitem__, vb, chunk, st, eps, acc)
        y = y.reshape(B, H, N, D)
        st = (S.reshape(B, H, Fd, D), z.reshape(B, H, Fd))
    else:
        y, st = _noncausal(q, k, vv, eps)
    y = y.to(v.dtype)
    return (y, st) if return_state else y


def _device_causal(backend, x: torch.Tensor) -> Optional[Callable]:
    """The causal kernel ``backend`` binds for CUDA tensors like ``x`` (fla), or None."""
    return backends.resolve(backend).causal(x) if x.is_cuda else None


def pieces_linear_attention(fast: Callable, feat_q: Callable, feat_k: Callable, v: torch.Tensor, bounds,
                            state: Optional[State] = None, eps: float = DEFAULT_EPS):
    """Causal linear attention without autograd in pieces: for each ``(a, b)`` of ``bounds`` (consecutive, from
    0 to N), ``fast`` (a :meth:`~hedgehog.ops.backends.Backend.causal` kernel, ``fn(phi_q, phi_k, v, state, eps)``)
    on the features ``feat_q(a, b)``, ``feat_k(a, b)`` (B, H, b - a, F) from the state the piece before left, each
    piece writing its rows of the output. So the features and the kernel's operands exist for one piece at a time
    (:func:`~hedgehog.ops.chunked.device_piece`). Returns ``(y (B, H, N, D), (S, z))``."""
    y = None
    for a, b in bounds:
        out = fast(feat_q(a, b), feat_k(a, b), v[:, :, a:b], state, eps)
        if out is None:
            raise ValueError(f"a piece of {b - a} tokens is too short for the kernel: pass longer pieces")
        if y is None:
            y = v.new_empty(*v.shape[:3], out[0].shape[-1])
        y[:, :, a:b], state = out
    return y, state


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
    go through the fused kernel (:mod:`hedgehog.ops.cpu_kernel`; its own chunk size) when it is available; on CUDA
    with fla bound, a call without autograd of at least two pieces (:func:`~hedgehog.ops.chunked.device_piece`)
    runs in pieces, features per piece (:func:`pieces_linear_attention`).
    """
    if q.dim() != 4 or k.dim() != 4 or v.shape[:3] != q.shape[:3] or k.shape[0] != q.shape[0] \
            or k.shape[2] != q.shape[2]:
        raise ValueError(f"q, k, v must be (batch, heads, seq, dim) with equal batch/seq (and v with q's heads); "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, N, _ = q.shape
    if causal and triton_fused.bound(backend, q):  # Hedgehog maps without autograd: the fused Triton kernels
        out = triton_fused.fused_maps(q, k, v, feature_map_q, feature_map_k, positions, tuple(initial_state or ()),
                                      initial_state=initial_state, eps=eps)
        if out is not None:
            return out if return_state else out[0]
    if positions is None and N > 0:
        positions = torch.arange(N, device=q.device)
    if causal and not q.is_cuda and k.shape[1] == H:  # Hedgehog maps without autograd: the fused CPU kernel
        out = cpu_kernel.fused_hedgehog_attention(q, k, v, feature_map_q, feature_map_k, initial_state, eps)
        if out is not None:
            return out if return_state else out[0]
    blockwise = all(getattr(fm, "blockwise", False) for fm in (feature_map_q, feature_map_k))
    fast = _device_causal(backend, q) if causal else None
    bounds = piece_bounds(N, max(device_piece(B * H), H))
    if fast is not None and blockwise and len(bounds) > 1 and not records(
            (q, k, v, *(initial_state or ())), maps=((feature_map_q, q, positions), (feature_map_k, k, positions))):
        feats = lambda fm, x: (lambda a, b: fm(x[:, :, a:b], positions[..., a:b]))
        y, st = pieces_linear_attention(fast, feats(feature_map_q, q), feats(feature_map_k, k), v, bounds,
                                        initial_state, eps)
        return (y, st) if return_state else y
    if not causal or not blockwise or fast is not None:
        return linear_attention(feature_map_q(q, positions), feature_map_k(k, positions), v, causal=causal,
                                chunk_size=chunk_size, initial_state=initial_state, return_state=return_state,
                                eps=eps, backend=backend, block_size=block_size)
    _check_chunking(chunk_size, block_size)
    D = v.shape[-1]
    acc = acc_dtype(v)

    fd = feature_map_q.feature_dim if hasattr(feature_map_q, "feature_dim") else feature_map_q(q[:, :, :1]).shape[-1]
    chunk = max(1, min(chunk_size, N))
    blk = block_size or auto_block(B * H, fd, chunk, N)
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
    rec = records((q, k, v, *(st or ())), maps=((feature_map_q, q, positions), (feature_map_k, k, positions)))
    with torch.set_grad_enabled(rec):
        y, (S, z) = causal_blocks(getter(feature_map_q, q), getter(feature_map_k, k), v_blocks, chunk, st, eps, acc)
    y = y.reshape(B, H, N, D).to(v.dtype)
    if return_state:
        return y, (S.reshape(B, H, fd, D), z.reshape(B, H, fd))
    return y
