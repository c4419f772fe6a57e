"""The student's attention inside a converted layer: linear or hybrid, as a prefill or decoding steps.

:class:`StudentPaths` is a mixin of :class:`hedgehog.layers.attention.HedgehogAttention`: it reads the layer's maps
(``feature_map_q``/``feature_map_k``, ``_grouped_k``), heads (``n_rep``, ``num_kv_heads``), ``hh_config``, the
hybrid's ``gamma()``/``log_decay()`` and the kernels bound at build (``kernels``; ``_pair_maps``: the fused CPU kernel fits); from the call
(:class:`~hedgehog.layers.interface.AttentionCall`) its mask, positions, cache and the teacher's scale, which the
hybrid's exact part uses. :meth:`StudentPaths.student` routes a call, in this order:

1. a hybrid layer with a sparse cache (``hh_config.sparse_cache``; inference and training) ->
   :meth:`_sparse_hybrid`, which carries a :class:`SparseStateLayer` between calls;
2. a decode-state layer in the cache (``HybridStateLayer`` / ``HedgehogStateLayer``) -> the recurrent forms, which
   extend its ring buffer or state;
3. any other cache keeps k/v and attends over all of them; no cache: the causal form over the sequence
   (chunked, or the fused CPU kernel for inference), or the non-causal one for encoders.
"""
from __future__ import annotations

import torch

from hedgehog.modules.feature_maps import hedgehog_pair_features
from hedgehog.modules.heads import ScaledMap, repeat_heads
from hedgehog.ops import (feature_linear_attention, kernel_linear_attention, linear_attention, packed_recurrent_step,
                          quadratic_linear_attention, triton_fused)
from hedgehog.modules.state import HedgehogStateLayer, HybridStateLayer, SparseStateLayer
from hedgehog.ops.cpu_kernel import fused_hedgehog_attention, fused_hybrid_attention
from hedgehog.ops.hybrid import feature_hybrid_attention, hybrid_weights
from hedgehog.ops.linear_attention import DEFAULT_EPS
from hedgehog.ops.recurrent import ring_hybrid_step
from hedgehog.ops.sparse_cache import sparse_hybrid_attention



class StudentPaths:
    """Prefill and decode for linear and hybrid attention (a mixin: ``self`` is the converted layer)."""

    def student(self, q, k, v, call):
        """q (B,Hq,N,d), k/v (B,Hkv,N,d) -> (B,Hq,N,d): the layer's linear or hybrid attention for this call."""
        n = q.shape[2]
        cache = call.cache
        if self.hybrid and self.hh_config.sparse_cache and self.causal:  # in training too: LoRA fits what it meets
            return self._sparse_hybrid(q, k, v, call, cache)
        if cache is not None:
            idx = self.adapter.cache_index(self)
            layer = cache.layers[idx] if idx < len(cache.layers) else None
            if isinstance(layer, HybridStateLayer) and self.hybrid:
                return self._hybrid_recurrent(q, k, v, call, layer)
            if isinstance(layer, HedgehogStateLayer) and not self.hybrid:
                return self._linear_recurrent(q, k, v, call, layer)
        if cache is not None:
            # Generic fallback for any HF Cache: keep k/v in it and attend over all of them (the
            # recurrent-state cache replaces this with O(1) state updates).
            k, v = cache.update(k, v, self.adapter.cache_index(self))
        nk = k.shape[2]
        pos_k = call.positions(nk, 0, q.device) if nk == n else torch.arange(nk, device=q.device)
        pos_q = pos_k[..., nk - n:]
        valid = call.valid_keys(nk)
        s = self.hh_config.qk_scale
        v_rep = repeat_heads(v, self.n_rep)
        if not self.causal:  # encoder: every query sees every real key
            if self._kernel_form(max(n, nk)):
                return self._kernel_attention(q, k, v_rep, causal=False, valid=valid)
            phi_q = self.feature_map_q(q * s, pos_q)
            phi_k = self._grouped_k(k * s, pos_k)
            if valid is not None:
                phi_k = phi_k * valid[:, None, :, None].to(phi_k.dtype)
            return linear_attention(phi_q, phi_k, v_rep, causal=False)
        if self.hybrid:
            return self._hybrid_full(q, k, v_rep, pos_q, pos_k, valid, call.teacher.scale)
        if nk != n or valid is not None:
            phi_q = self.feature_map_q(q * s, pos_q)
            phi_k = self._grouped_k(k * s, pos_k)
            if valid is not None:
                phi_k = phi_k * valid[:, None, :, None].to(phi_k.dtype)
            if nk == n:
                return linear_attention(phi_q, phi_k, v_rep, chunk_size=self.hh_config.chunk_size,
                                        backend=self.kernels)
            return quadratic_linear_attention(phi_q, phi_k, v_rep, causal=True)
        if self._kernel_form(n):  # e.g. Taylor on short sequences: O(N^2 d) beats O(N F d)
            return self._kernel_attention(q, k, v_rep, causal=True)
        fused = fused_hedgehog_attention(q * s, k * s, v, self.feature_map_q, self.feature_map_k) \
            if self._cpu_inference(q) else None
        if fused is not None:  # CPU, no autograd: one pass per key head, no repeated k/v
            return fused[0]
        return feature_linear_attention(
            q * s, k * s, v_rep, self.feature_map_q, self._grouped_k, positions=pos_q,
            chunk_size=self.hh_config.chunk_size, backend=self.kernels,
        )

    def _sparse_hybrid(self, q, k, v, call, cache):
        """The hybrid with a sparse cache of exact keys: a prefill (also under autograd: stage 2 trains with the
        cache), decoding steps that extend the :class:`SparseStateLayer`'s state, or, with any other cache, the whole
        sequence so far recomputed."""
        c = self.hh_config
        n = q.shape[2]
        layer = None
        if cache is not None:
            idx = self.adapter.cache_index(self)
            layer = cache.layers[idx] if idx < len(cache.layers) else None
            if not isinstance(layer, SparseStateLayer):
                layer = None
                k, v = cache.update(k, v, idx)  # a generic cache: every key so far
        nk = k.shape[2]
        start = layer.seen if layer is not None else 0
        pos = call.positions(nk, start, q.device) if nk == n else torch.arange(nk, device=q.device)
        s = c.qk_scale
        # features per piece of the call (the op computes them piece by piece where it splits a long prefill)
        q_pos = pos[..., nk - n:]
        phi_q = lambda a, b: self.feature_map_q(q[:, :, a:b] * s, q_pos[..., a:b])
        phi_k = lambda a, b: self.feature_map_k(k[:, :, a:b] * s, pos[..., a:b])  # per KV head, like the state
        if nk > n:  # the state depends on keys and values only: earlier rows need no queries
            pad = lambda t: torch.cat([t.new_zeros(*t.shape[:2], nk - n, t.shape[-1]), t], 2)
            phi_q = pad(self.feature_map_q(q * s, q_pos))
            q = pad(q)
        y, state = sparse_hybrid_attention(q, k, v, phi_q, phi_k, c.window, c.sparse_cache, self.gamma(),
                                           call.teacher.scale, c.sinks, self.log_decay(per_query_head=False),
                                           c.sparse_chunk, call.valid_keys(nk),
                                           state=None if layer is None else layer.state, score=c.sparse_score)
        if layer is not None:
            layer.state = state
            layer.seen += n
            layer.is_initialized = True
        return y[:, :, nk - n:]

    def _cpu_inference(self, x) -> bool:
        """Whether the fused CPU kernel bound at build serves this call (CPU tensors; the kernel itself declines
        under autograd and for float64)."""
        return self._pair_maps and x.device.type == "cpu"

    def _kernel_form(self, n: int) -> bool:
        """True where the maps have a closed-form kernel (same map for q and k) and N < F makes it cheaper."""
        fq, fk = self.feature_map_q, self.feature_map_k
        return (hasattr(fq, "kernel") and getattr(fq, "has_kernel", True) and getattr(fk, "has_kernel", True)
                and type(fq) is type(fk) and getattr(fq, "scale", None) == getattr(fk, "scale", None)
                and n <= fq.feature_dim)

    def _kernel_attention(self, q, k, v_rep, causal: bool, valid=None):
        """Linear attention through the maps' closed-form kernel; ``valid`` (B, Nk) zeroes padding keys' columns."""
        s = self.hh_config.qk_scale
        a = self.feature_map_q.kernel(q * s, repeat_heads(k * s, self.n_rep))
        if valid is not None:
            a = a * valid[:, None, None, :].to(a.dtype)
        return kernel_linear_attention(a, v_rep, causal=causal)

    def _linear_recurrent(self, q, k, v, call, layer):
        """Prefill (fills the state) or decode (updates it) with a HedgehogStateLayer; state per KV head."""
        n = q.shape[2]
        s = self.hh_config.qk_scale
        pos = None  # built only for maps that read positions (a decode step is a few dozen small ops)
        if self.feature_map_q.uses_positions or self.feature_map_k.uses_positions:
            pos = torch.arange(layer.seen, layer.seen + n, device=q.device)
        if s != 1.0:
            q, k = q * s, k * s
        if n > 1 and (layer.Sz is not None or call.valid_keys(n) is None):
            init = None if layer.Sz is None else (layer.S, layer.z)
            fused = fused_hedgehog_attention(q, k, v, self.feature_map_q, self.feature_map_k, init) \
                if self._cpu_inference(q) else None
            if fused is not None:  # prefill in the fused CPU kernel; its state is per key head already
                y, (S, z) = fused
                layer.set_state(S, z, n)
                return y
            if self.kernels.causal(q) is not None or triton_fused.bound(self.kernels, q):
                # CUDA: the fused Triton kernels (Hedgehog maps), or fla in pieces, features per piece
                y, (S, z) = feature_linear_attention(q, k, repeat_heads(v, self.n_rep), self.feature_map_q,
                                                     self._grouped_k, positions=pos, initial_state=self._query_state(
                                                         layer), return_state=True, backend=self.kernels)
                self._set_linear_state(layer, S, z, n)
                return y
        pair = hedgehog_pair_features(self.feature_map_q, self.feature_map_k, q, k) \
            if self._pair_maps and layer.Sz is not None else None
        if pair is not None:  # one decoding token: both maps in one matmul
            phi_q, phi_k = pair
        else:
            phi_q = self.feature_map_q(q, pos)
            phi_k = self.feature_map_k(k, pos)  # (B, Hkv, n, F): not repeated
        if layer.Sz is None:
            valid = call.valid_keys(n)
            if valid is not None:  # padding never enters the state
                phi_k = phi_k * valid[:, None, :, None].to(phi_k.dtype)
        elif n == 1:
            y = packed_recurrent_step(phi_q, phi_k, v, layer.Sz)
            layer.seen += 1
            return y
        y, (S, z) = linear_attention(phi_q, repeat_heads(phi_k, self.n_rep), repeat_heads(v, self.n_rep),
                                     chunk_size=self.hh_config.chunk_size, initial_state=self._query_state(layer),
                                     return_state=True, backend=self.kernels)
        self._set_linear_state(layer, S, z, n)
        return y

    def _query_state(self, layer):
        """The layer's state expanded to the query heads (several new tokens on top of it), or None."""
        if layer.S is None:
            return None
        return repeat_heads(layer.S, self.n_rep), repeat_heads(layer.z.unsqueeze(-1), self.n_rep).squeeze(-1)

    def _set_linear_state(self, layer, S, z, n: int) -> None:
        """Keep one state per KV head (every query head of a group holds the same) after ``n`` tokens."""
        b = S.shape[0]
        S = S.view(b, self.num_kv_heads, self.n_rep, *S.shape[2:])[:, :, 0].contiguous()
        z = z.view(b, self.num_kv_heads, self.n_rep, -1)[:, :, 0].contiguous()
        layer.set_state(S, z, n)

    def _hybrid_full(self, q, k, v_rep, pos_q, pos_k, valid, scale, return_state=False):
        """Hybrid attention of n queries (the last n positions) over all nk keys; chunked when n == nk
        and there is no padding, else the O(n * nk) form (short prompts, generic caches). With
        ``return_state`` returns ``(y, state)``: the chunked path's linear state of keys ``0..n-w-1`` per KV
        head, or None from the other path."""
        s, w, sinks = self.hh_config.qk_scale, self.hh_config.window, self.hh_config.sinks
        decay = self.log_decay()
        k_rep = repeat_heads(k, self.n_rep)
        n, nk = q.shape[2], k.shape[2]
        if n == nk and valid is None:
            if not sinks and decay is None and self._cpu_inference(q):  # the fused kernel: the plain hybrid
                fused = fused_hybrid_attention(q, k, v_rep[:, ::self.n_rep], self.feature_map_q, self.feature_map_k,
                                               w, self.gamma(), scale, feature_scale=s)
                if fused is not None:  # CPU, no autograd: the fused kernel, state per KV head already
                    return fused if return_state else fused[0]
            out = feature_hybrid_attention(q, k_rep, v_rep, ScaledMap(self.feature_map_q, s),
                                           ScaledMap(self._grouped_k, s, self.n_rep), window=w, gamma=self.gamma(),
                                           scale=scale, positions=pos_q,
                                           chunk_size=self.hh_config.chunk_size, return_state=return_state,
                                           sinks=sinks, decay=decay, backend=self.kernels)
            if not return_state:
                return out
            y, (S, z) = out  # per query head; the heads of a group hold the same state
            return y, (S[:, ::self.n_rep].contiguous(), z[:, ::self.n_rep].contiguous())
        phi_q = self.feature_map_q(q * s, pos_q)
        phi_k = self._grouped_k(k * s, pos_k)
        a, _, _ = hybrid_weights(q, k_rep, phi_q, phi_k, w, self.gamma(), scale,
                                 q_positions=torch.arange(nk - n, nk, device=q.device), key_valid=valid,
                                 sinks=sinks, decay=decay)
        y = (a / a.sum(-1, keepdim=True).clamp_min(DEFAULT_EPS)) @ v_rep.to(a.dtype)
        return (y.to(v_rep.dtype), None) if return_state else y.to(v_rep.dtype)

    def _hybrid_recurrent(self, q, k, v, call, layer):
        """Hybrid prefill (window of the last w keys + state of older ones) or decode, per KV head. The first
        ``sinks`` keys also keep slots of their own after the window (see :class:`HybridStateLayer`)."""
        s, w, sinks = self.hh_config.qk_scale, self.hh_config.window, self.hh_config.sinks
        b, _, n, _ = q.shape
        if layer.Sz is None:  # prefill: one parallel pass, then build the cache from its keys
            valid = call.valid_keys(n)
            pos = torch.arange(n, device=q.device)
            y, state = self._hybrid_full(q, k, repeat_heads(v, self.n_rep), pos, pos, valid, call.teacher.scale,
                                         return_state=True)
            valid = torch.ones(b, n, dtype=torch.bool, device=q.device) if valid is None else valid
            old = max(0, n - w)
            acc = torch.float64 if v.dtype == torch.float64 else torch.float32
            fd = self.feature_map_k.feature_dim
            if state is not None:  # the chunked pass already summed the keys older than the window
                S, z = state[0].to(acc), state[1].to(acc)
            else:
                S = v.new_zeros(b, self.num_kv_heads, fd, v.shape[-1], dtype=acc)
                z = v.new_zeros(b, self.num_kv_heads, fd, dtype=acc)
            if old and state is None:  # the keys older than the window, as the state holds them (see _hybrid)
                keep = valid[:, :old] & (pos[:old] >= sinks)[None, :]
                phi_k = self.feature_map_k(k[:, :, :old] * s, pos[:old]) * keep[:, None, :, None].to(k.dtype)
                ld = self.log_decay(per_query_head=False)
                if ld is not None:  # key i weighs lambda^(n - 1 - w - i) for the last query n - 1
                    age = (old - 1 - pos[:old]).to(acc)
                    phi_k = phi_k.to(acc) * torch.exp(ld.to(acc)[:, None] * age[None, :])[None, :, :, None]
                S += phi_k.to(acc).transpose(-1, -2) @ v[:, :, :old].to(acc)
                z += phi_k.to(acc).sum(2)
            layer.set_window(S, z, k[:, :, old:], v[:, :, old:], valid[:, old:], n, window=w,
                             sinks=(k[:, :, :sinks], v[:, :, :sinks], valid[:, :sinks]) if sinks else None,
                             sink_slots=sinks)
            return y
        ys = []
        needs_pos = self.feature_map_q.uses_positions or self.feature_map_k.uses_positions
        Sz3 = layer.Sz.view(b * self.num_kv_heads, *layer.Sz.shape[2:])
        ld = self.log_decay(per_query_head=False)
        lam = None if ld is None else torch.exp(ld.to(Sz3.dtype)).repeat(b).view(-1, 1, 1)
        for t in range(n):  # decode, one token at a time: it takes ring slot seen % w
            p = layer.seen % w
            if layer.seen >= w:  # that slot's token leaves the window: fold it into the state
                if lam is not None:
                    Sz3.mul_(lam)
                leaving = layer.seen - w
                if leaving < sinks:  # a sink keeps its own slot (written when it arrived) instead
                    layer.valid[:, w + leaving] = layer.valid[:, p]
                else:
                    pos = torch.tensor([leaving], device=q.device) if needs_pos else None
                    k_old = layer.k_win[:, :, p:p + 1]
                    phi = self.feature_map_k(k_old * s if s != 1.0 else k_old, pos)
                    phi = phi * layer.valid[:, p].view(b, 1, 1, 1).to(phi.dtype)
                    Sz3.baddbmm_(phi.to(Sz3.dtype).reshape(-1, phi.shape[-1], 1),
                                 layer.v_win[:, :, p:p + 1].to(Sz3.dtype).reshape(Sz3.shape[0], 1, -1))
            layer.k_win[:, :, p] = k[:, :, t]
            layer.v_win[:, :, p, :-1] = v[:, :, t]
            layer.v_win[:, :, p, -1] = 1.0
            layer.valid[:, p] = True
            if layer.seen < sinks:  # a sink token: its slot after the window, seen once it leaves the window
                layer.k_win[:, :, w + layer.seen] = k[:, :, t]
                layer.v_win[:, :, w + layer.seen] = layer.v_win[:, :, p]
            layer.seen += 1
            qt = q[:, :, t:t + 1]
            pos = torch.tensor([layer.seen - 1], device=q.device) if needs_pos else None
            phi_q = self.feature_map_q(qt * s if s != 1.0 else qt, pos)
            ys.append(ring_hybrid_step(qt, phi_q, layer.k_win, layer.v_win, layer.valid, layer.Sz, self.gamma(),
                                       call.teacher.scale))
        return ys[0] if n == 1 else torch.cat(ys, 2)

