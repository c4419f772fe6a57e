"""The hybrid with a sparse cache (LoLA) against a float64 reference that follows the definition key by key."""

import pytest
import torch

from conftest import rand_features
from hedgehog.ops.hybrid import quadratic_hybrid_attention
from hedgehog.ops.sparse_cache import sparse_hybrid_attention


def reference(q, k, v, pq, pk, window, cache_size, gamma, sinks=0, decay=None, chunk=None, key_valid=None,
              score="unique"):
    """Per query, the sets the definition names: sinks, cache, recent keys exact; the folded keys through phi.
    Cache selection by explicit self-recall errors against the explicitly summed state ("state"), or that state
    plus every other candidate ("memory"), or the smaller of that and the distance to the nearest value of a newer
    candidate ("unique"). Float64, loops; differentiable (the choice of the cached keys is not)."""
    B, Hq, n, d = q.shape
    Hk = k.shape[1]
    g = Hq // Hk
    chunk = chunk or window
    scale = d ** -0.5
    gam = torch.as_tensor(gamma, dtype=torch.float64).expand(Hq)
    lam = torch.ones(Hk, dtype=torch.float64) if decay is None else torch.exp(decay.double())
    ok = torch.ones(B, n, dtype=torch.bool) if key_valid is None else key_valid
    y = torch.zeros(B, Hq, n, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for hk in range(Hk):
            cache, folded, handled = [], [], 0  # handled: keys < handled have left the recent buffer
            t = 0
            for i in range(n):
                if i and i % chunk == 0:
                    t = i
                    leaving = [j for j in range(handled, t - window + 1)]
                    handled = max(handled, t - window + 1)
                    cands = [j for j in cache + leaving if j >= sinks and ok[b, j]]
                    if cache_size:
                        def read_back(j):
                            summed = folded + ([i for i in cands if i != j] if score != "state" else [])
                            S = sum((lam[hk] ** (t - window - i) * torch.outer(pk[b, hk, i], v[b, hk, i])
                                     for i in summed), torch.zeros(pk.shape[-1], v.shape[-1], dtype=torch.float64))
                            z = sum((lam[hk] ** (t - window - i) * pk[b, hk, i] for i in summed),
                                    torch.zeros(pk.shape[-1], dtype=torch.float64))
                            return pk[b, hk, j] @ S / max(float(pk[b, hk, j] @ z), 1e-6)
                        err = {j: (v[b, hk, j] - read_back(j)).pow(2).sum().item() for j in cands}
                        if score == "unique":  # or given back by a newer candidate's value
                            err = {j: min([e] + [(v[b, hk, j] - v[b, hk, i]).pow(2).sum().item()
                                                 for i in cands if i > j]) for j, e in err.items()}
                        cache = sorted(cands, key=lambda j: -err[j])[:cache_size]
                    else:
                        cache = []
                    folded += [j for j in cands if j not in cache]
                exact = [j for j in range(n) if ok[b, j] and j <= i and (j > t - window or j < sinks or j in cache)]
                for h in range(hk * g, (hk + 1) * g):
                    s = [q[b, h, i] @ k[b, hk, j] * scale for j in exact]
                    c = torch.stack(s).max() if exact else 0.0
                    num = sum((gam[h] * torch.exp(sj - c) * v[b, hk, j] for sj, j in zip(s, exact)),
                              torch.zeros(v.shape[-1], dtype=torch.float64))
                    den = sum((gam[h] * torch.exp(sj - c) for sj in s), torch.zeros((), dtype=torch.float64))
                    for j in folded:
                        a = lam[hk] ** (i - window - j) * (pq[b, h, i] @ pk[b, hk, j])
                        num = num + a * v[b, hk, j]
                        den = den + a
                    y[b, h, i] = num / den.clamp_min(1e-6)
    return y


def inputs(B=2, Hq=4, Hk=2, n=40, d=4, D=3, F=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, n, d, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hk, n, d, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hk, n, D, generator=g, dtype=torch.float64)
    return q, k, v, rand_features(B, Hq, n, F), rand_features(B, Hk, n, F)


@pytest.mark.parametrize("score", ["unique", "memory", "state"])
@pytest.mark.parametrize("window,chunk,cache_size,sinks,decayed", [
    (6, 4, 3, 0, False), (5, 5, 4, 2, True), (4, 7, 2, 1, True), (8, 3, 0, 0, False), (3, 2, 6, 0, True)])
def test_equals_the_definition(window, chunk, cache_size, sinks, decayed, score):
    q, k, v, pq, pk = inputs()
    decay = torch.log(torch.tensor([0.9, 0.97], dtype=torch.float64)) if decayed else None
    gamma = torch.tensor([0.3, 0.5, 0.6, 0.8], dtype=torch.float64)
    y, _ = sparse_hybrid_attention(q, k, v, pq, pk, window, cache_size, gamma, sinks=sinks, decay=decay, chunk=chunk,
                                   score=score)
    ref = reference(q, k, v, pq, pk, window, cache_size, gamma, sinks, decay, chunk, score=score)
    assert torch.allclose(y, ref, atol=1e-10), (y - ref).abs().max()


def test_gradients_equal_the_definitions():
    """Stage 2 trains through the cache: the op's gradients (q, k, v, both features, gamma, decay) equal autograd
    through the float64 definition with the same keys chosen. The softmax's row max c is part of the formula (the
    linear part is not rescaled by it), so a detached c would fail here."""
    q, k, v, pq, pk = inputs(B=1, n=26)
    gamma = torch.tensor([0.3, 0.5, 0.6, 0.8], dtype=torch.float64)
    decay = torch.log(torch.tensor([0.9, 0.97], dtype=torch.float64))
    w = torch.randn(1, 4, 26, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def grads(fn):
        xs = [t.clone().requires_grad_() for t in (q, k, v, pq, pk, gamma, decay)]
        (fn(*xs) * w).sum().backward()
        return [x.grad for x in xs]

    got = grads(lambda *a: sparse_hybrid_attention(*a[:5], 5, 3, a[5], sinks=1, decay=a[6], chunk=4)[0])
    want = grads(lambda *a: reference(*a[:5], 5, 3, a[5], 1, a[6], 4))
    for name, a, b in zip(("q", "k", "v", "phi_q", "phi_k", "gamma", "decay"), got, want):
        assert torch.allclose(a, b, atol=1e-9), (name, (a - b).abs().max())


def test_the_cache_changes_the_output():
    """Guards the reference test against a cache that is never read: 0 slots and 4 slots differ."""
    q, k, v, pq, pk = inputs()
    y0, _ = sparse_hybrid_attention(q, k, v, pq, pk, 4, 0, 0.5, chunk=4)
    y4, _ = sparse_hybrid_attention(q, k, v, pq, pk, 4, 4, 0.5, chunk=4)
    assert (y0 - y4).abs().max() > 1e-3


@pytest.mark.parametrize("sinks,decayed", [(0, False), (2, True)])
def test_one_token_chunks_without_cache_are_the_plain_hybrid(sinks, decayed):
    q, k, v, pq, pk = inputs(Hk=4)
    decay = torch.log(torch.tensor([0.9, 0.95, 0.97, 0.99], dtype=torch.float64)) if decayed else None
    y, _ = sparse_hybrid_attention(q, k, v, pq, pk, 6, 0, 0.4, sinks=sinks, decay=decay, chunk=1)
    ref = quadratic_hybrid_attention(q, k, v, pq, pk, window=6, gamma=0.4, sinks=sinks, decay=decay)
    assert torch.allclose(y, ref, atol=1e-10)


@pytest.mark.parametrize("split", [[1] * 40, [13, 1, 1, 25], [8, 8, 24], [39, 1]])
def test_calls_in_pieces_continue_the_state_exactly(split):
    """Decoding token by token (or any split of the sequence) equals one call over all of it."""
    q, k, v, pq, pk = inputs()
    decay = torch.log(torch.tensor([0.9, 0.97], dtype=torch.float64))
    full, st_full = sparse_hybrid_attention(q, k, v, pq, pk, 5, 3, 0.5, sinks=1, decay=decay, chunk=4)
    st, ys, a = None, [], 0
    for m in split:
        sl = slice(a, a + m)
        y, st = sparse_hybrid_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], pq[:, :, sl], pk[:, :, sl], 5, 3, 0.5,
                                        sinks=1, decay=decay, chunk=4, state=st)
        ys.append(y)
        a += m
    assert torch.allclose(torch.cat(ys, 2), full, atol=1e-12)
    assert torch.equal(st.cache_pos, st_full.cache_pos)


@pytest.mark.parametrize("start", [0, 7])
def test_a_long_call_without_autograd_runs_in_pieces_with_features_per_piece(monkeypatch, start):
    """Without autograd a call longer than PREFILL_PIECE runs piece by piece (ending at multiples of the chunk),
    its features computed per piece when passed as functions, and gives the one-call output and state; the float64
    definition agrees. Grad mode with nothing that requires grad (an inference forward outside no_grad) runs in
    pieces too; under autograd (an input or a feature requires grad) the same call is one piece."""
    from hedgehog.ops import sparse_cache as sc

    q, k, v, pq, pk = inputs(n=60)
    decay = torch.log(torch.tensor([0.9, 0.97], dtype=torch.float64))
    valid = torch.ones(2, 60, dtype=torch.bool)
    valid[1, :9] = False
    kw = dict(sinks=1, decay=decay, chunk=4, key_valid=valid)
    ref = reference(q, k, v, pq, pk, 5, 3, 0.5, **kw)
    sl = lambda t, a, b: t[..., a:b] if t.dim() == 2 else t[:, :, a:b]
    calls = []

    def feature(phi, trained=False):
        def per_piece(a, b):
            calls.append((a, b))
            out = phi[:, :, start + a:start + b]
            return out.clone().requires_grad_() if trained else out  # a map with trainable weights
        return per_piece

    def run(piece, grad=False, leaf=False, trained=False):
        monkeypatch.setattr(sc, "PREFILL_PIECE", piece)
        calls.clear()
        # ``start`` tokens in an earlier call, then the rest in one (a piece boundary falls off the call's start)
        _, st = sparse_hybrid_attention(*(sl(t, 0, start) for t in (q, k, v, pq, pk)), 5, 3, 0.5,
                                        **{**kw, "key_valid": valid[:, :start]}) if start else (None, None)
        qn, kn, vn = (sl(t, start, 60) for t in (q, k, v))
        qn = qn.clone().requires_grad_() if leaf else qn
        with torch.set_grad_enabled(grad):
            y, st = sparse_hybrid_attention(qn, kn, vn, feature(pq, trained), feature(pk, trained), 5, 3,
                                            0.5, **{**kw, "key_valid": valid[:, start:]}, state=st)
        return y, st, list(calls)

    y1, st1, calls1 = run(10 ** 9)
    y, st, pieces = run(16)
    ends = [start + b for a, b in pieces[::2]]
    assert pieces[::2] == pieces[1::2] and len(pieces) == 2 * 4  # q and k features, 4 pieces of <= 16 tokens
    assert all(e % 16 == 0 for e in ends[:-1]) and ends[-1] == 60 and pieces[0][0] == 0
    assert calls1 == [(0, 60 - start)] * 2
    assert torch.allclose(y, y1, atol=1e-12) and torch.equal(st.cache_pos, st1.cache_pos)
    assert torch.allclose(st.S, st1.S, atol=1e-12) and st.seen == 60
    assert torch.allclose(y[0], ref[0, :, start:], atol=1e-10)
    assert torch.allclose(y[1, :, max(0, 9 - start):], ref[1, :, max(9, start):], atol=1e-10)
    y2, _, calls_grad = run(16, grad=True)  # grad mode, nothing requires grad: each feature probed, then pieces
    assert calls_grad == [(0, 1)] * 2 + pieces and torch.equal(y2, y)
    _, _, calls_leaf = run(16, grad=True, leaf=True)  # q requires grad: one piece, no probe
    assert calls_leaf == [(0, 60 - start)] * 2
    _, _, calls_trained = run(16, grad=True, trained=True)  # the features require grad: one piece
    assert calls_trained == [(0, 1)] + [(0, 60 - start)] * 2


def test_state_size_does_not_grow_with_length():
    sizes = []
    for n in (40, 80, 160):
        q, k, v, pq, pk = inputs(n=n)
        _, st = sparse_hybrid_attention(q, k, v, pq, pk, 6, 4, 0.5, sinks=2, chunk=4)
        sizes.append(st.nbytes())
    assert sizes[1] == sizes[2]
    assert sizes[0] <= sizes[1]


def test_padding_keys_are_never_cached_or_summed():
    q, k, v, pq, pk = inputs()
    valid = torch.ones(2, 40, dtype=torch.bool)
    valid[0, :7] = False  # left padding in row 0
    y, st = sparse_hybrid_attention(q, k, v, pq, pk, 5, 3, 0.5, sinks=1, chunk=4, key_valid=valid)
    ref = reference(q, k, v, pq, pk, 5, 3, 0.5, sinks=1, chunk=4, key_valid=valid)
    assert torch.allclose(y[0, :, 7:], ref[0, :, 7:], atol=1e-10)
    assert torch.allclose(y[1], ref[1], atol=1e-10)
    assert (st.cache_pos[0][st.cache_ok[0]] >= 7).all()


def test_a_badly_represented_key_is_kept():
    """A key whose value the state cannot read back (one outlier among repeated filler) stays in the cache."""
    B, H, n, d, F = 1, 1, 64, 4, 6
    base_k = torch.randn(4, d, dtype=torch.float64)
    k = base_k.repeat(n // 4, 1)[None, None].clone()
    v = torch.randn(4, 3, dtype=torch.float64).repeat(n // 4, 1)[None, None].clone()
    pk = torch.softmax(k @ torch.randn(d, F, dtype=torch.float64), -1)
    v[0, 0, 10] = 25.0  # the needle
    q = torch.randn(B, H, n, d, dtype=torch.float64)
    pq = torch.softmax(q @ torch.randn(d, F, dtype=torch.float64), -1)
    _, st = sparse_hybrid_attention(q, k, v, pq, pk, 8, 2, 0.5, chunk=8)
    assert 10 in st.cache_pos[0, 0].tolist()


NEEDLE, COPIES = 3, [5, 8, 11, 14]


def kept_after_copies(score: str, copies_own_feature: bool) -> set:
    """The cache (2 slots, window 2, chunk 1) after 20 keys: filler on feature 0 with small values, a unique needle
    (|v| = 3) on feature 2 and four copies of one value (|v| = 5), on feature 1 of their own or on the filler's."""
    n, F, D = 20, 3, 3
    pk = torch.zeros(1, 1, n, F, dtype=torch.float64)
    pk[..., 0] = 1.0
    v = 0.1 * torch.randn(1, 1, n, D, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    pk[0, 0, NEEDLE] = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    v[0, 0, NEEDLE] = torch.tensor([0.0, 3.0, 0.0], dtype=torch.float64)
    for j in COPIES:
        if copies_own_feature:
            pk[0, 0, j] = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
        v[0, 0, j] = torch.tensor([5.0, 0.0, 0.0], dtype=torch.float64)
    q, k = torch.randn(1, 1, n, 4, dtype=torch.float64), torch.randn(1, 1, n, 4, dtype=torch.float64)
    _, st = sparse_hybrid_attention(q, k, v, pk.clone(), pk, 2, 2, 0.5, chunk=1, score=score)
    return set(st.cache_pos[0, 0].tolist())


@pytest.mark.parametrize("score", ["unique", "memory", "state"])
def test_copies_of_a_repeated_key_do_not_push_out_a_unique_one(score):
    """The copies on a feature of their own. Read by the state as it is (LoLA's rule) every copy looks
    unrepresented, so the copies take both slots when the needle competes and it is folded; read with the other
    candidates folded in, the copies recall one another and the needle stays."""
    kept = kept_after_copies(score, copies_own_feature=True)
    if score != "state":
        assert NEEDLE in kept, kept
    else:
        assert NEEDLE not in kept, kept  # folded while the copies held the slots


@pytest.mark.parametrize("score", ["unique", "memory"])
def test_copies_the_state_reads_back_badly_leave_only_by_their_value(score):
    """The copies on the filler's feature, so even with the other copies folded the state reads back a blend of
    filler and copy: by that error alone ("memory") they hold both slots and the needle is folded; a newer copy's
    value ("unique") sends all but the newest to the state."""
    kept = kept_after_copies(score, copies_own_feature=False)
    if score == "unique":
        assert kept == {NEEDLE, COPIES[-1]}, kept
    else:
        assert NEEDLE not in kept and kept <= set(COPIES), kept


def test_bad_shapes_raise():
    q, k, v, pq, pk = inputs()
    with pytest.raises(ValueError, match="shapes do not fit"):
        sparse_hybrid_attention(q, k[:, :1].expand(2, 3, 40, 4), v, pq, pk, 5, 2)
    with pytest.raises(ValueError, match="window >= 1"):
        sparse_hybrid_attention(q, k, v, pq, pk, 0, 2)


# -- in a converted model ------------------------------------------------------------------------------
def test_exact_copies_score_zero_and_ties_go_to_the_earlier_pool_entry():
    """A repeated value (a repeated token's value in the first layer) is at distance exactly 0 from its newer copy,
    though the expansion |a|^2 + |b|^2 - 2 a.b leaves it a rounding residue that depends on the device; a value 5%
    away is not a copy. Among equal scores the earlier pool entry ranks first (as the Triton schedule ranks them)."""
    from hedgehog.ops.sparse_cache import _top, newer_copy_error

    residue = lambda v: (v.pow(2).sum(-1)[0] * 2 - 2 * v @ v.T)[0, 2]
    for seed in range(50):  # values whose expansion leaves a residue on this device (by chance it may not)
        g = torch.Generator().manual_seed(seed)
        a = 30 + torch.randn(64, generator=g)  # a large norm: a large residue
        b = torch.randn(64, generator=g)
        v = torch.stack([a, b, a, a * 1.05, b])  # entries 0 and 2 are copies of a, 1 and 4 of b
        if residue(v) != 0:
            break
    assert residue(v) != 0  # the residue the expansion leaves here
    err = newer_copy_error(v[None, None], torch.ones(1, 1, 5, dtype=torch.bool), torch.arange(5)[None, None],
                           torch.float32)[0, 0]
    assert err[0] == 0.0 and err[1] == 0.0  # the older copies of a and of b
    assert err[2] > 100 and err[3] > 1e4 and torch.isinf(err[4])  # a vs 1.05 a: |0.05 a|^2 ~ 144; b has none newer
    scores = torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0, 1.0]])
    assert _top(scores, 4).tolist() == [[2, 0, 5, 1]]


def test_gradients_are_the_same_run_to_run_on_several_threads():
    """Stage 2 trains through this op: its gradients must not depend on thread timing or on where the allocator puts
    tensors. On the CPU the backward of ``t[:, :, idx]`` with repeated indices (an accumulating index_put) summed in
    a varying order with 2 threads: 4 of 20 runs here gave other k/v gradients, and the main job's stage 2 printed
    other losses from run to run. Allocations of random sizes between runs move the tensors."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        g = torch.Generator().manual_seed(0)
        B, Hq, Hk, n, d, F = 1, 3, 1, 512, 64, 128
        q = torch.randn(B, Hq, n, d, generator=g)
        k, v = torch.randn(B, Hk, n, d, generator=g), torch.randn(B, Hk, n, d, generator=g)
        pq, pk = torch.rand(B, Hq, n, F, generator=g), torch.rand(B, Hk, n, F, generator=g)
        w = torch.linspace(0, 1, B * Hq * n * d).view(B, Hq, n, d)

        def grads():
            leaves = [t.clone().requires_grad_() for t in (q, k, v, pq, pk)]
            y, _ = sparse_hybrid_attention(*leaves, window=64, cache_size=128, chunk=32, sinks=4, gamma=0.5,
                                           decay=torch.log(torch.tensor([0.99])))
            (y * w).sum().backward()
            return [t.grad for t in leaves]

        ref, junk = grads(), []
        for _ in range(20):
            junk.append(torch.empty(int(torch.randint(1, 100_000, (), generator=g))))
            assert all(torch.equal(a, b) for a, b in zip(grads(), ref))
    finally:
        torch.set_num_threads(threads)


from conftest import FAMILIES, V, perturb_maps, tiny  # noqa: E402
from conftest import assert_decoding_matches_full_forward, assert_greedy_generate_is_argmax  # noqa: E402

from hedgehog.layers.attention import HedgehogConfig, hedgehog_layers  # noqa: E402
from hedgehog.layers.generation import SparseStateLayer  # noqa: E402
from hedgehog.models.convert import convert_model  # noqa: E402


def sparse_model(family, cache=3, chunk=3):
    torch.manual_seed(0)
    m = convert_model(tiny(family).eval(), HedgehogConfig(attention="hybrid", window=4, sinks=1, state_decay=0.8,
                                                          sparse_cache=cache, sparse_chunk=chunk))
    perturb_maps(m)
    with torch.no_grad():
        for layer in hedgehog_layers(m):
            layer.window_gate.normal_()
            layer.state_decay.add_(torch.randn_like(layer.state_decay))
    return m


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "gemma2"])
@pytest.mark.parametrize("prefill", [1, 7, 20], ids=lambda p: f"prefill{p}")
def test_decode_equals_the_full_forward_across_chunks(family, prefill):
    m = sparse_model(family)
    ids, cache = assert_decoding_matches_full_forward(m, prefill, n=30)
    assert isinstance(cache.layers[0], SparseStateLayer)
    assert cache.layers[0].state.cache_ok.all()  # 30 tokens, window 4: the cache is full
    with torch.no_grad():
        more = m(ids[:, :5], past_key_values=cache, use_cache=True).logits  # several tokens on a state
        want_more = m(torch.cat([ids, ids[:, :5]], 1)).logits[:, 30:]
    torch.testing.assert_close(more, want_more, atol=1e-5, rtol=1e-5)


def test_a_plain_transformers_cache_recomputes_the_same_output():
    from transformers import DynamicCache

    m = sparse_model("llama")
    ids = torch.randint(0, V, (2, 26))
    with torch.no_grad():
        full = m(ids).logits
        cache = DynamicCache()
        first = m(ids[:, :20], past_key_values=cache, use_cache=True).logits
        rest = m(ids[:, 20:], past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(torch.cat([first, rest], 1), full, atol=1e-5, rtol=1e-5)


def test_training_runs_the_cache_as_inference_does():
    """Under autograd (stage 2) the layer computes what inference computes, the cache included (not the plain
    hybrid), and the gradient reaches the projections, the maps, the window gate and the decay."""
    m, plain = sparse_model("llama"), sparse_model("llama", cache=0)
    ids = torch.randint(0, V, (2, 30))
    with torch.no_grad():
        inference, without = m(ids).logits, plain(ids).logits
    trained = m(ids).logits
    torch.testing.assert_close(trained.detach(), inference, atol=1e-5, rtol=1e-5)
    assert (inference - without).abs().max() > 1e-3
    trained.logsumexp(-1).sum().backward()
    lay = hedgehog_layers(m)[1]
    for name, p in (("q_proj", lay.q_proj.weight), ("v_proj", lay.v_proj.weight), ("gate", lay.window_gate),
                    ("decay", lay.state_decay), *(("map " + n, p) for n, p in lay.feature_map_q.named_parameters())):
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_generate_is_greedy_argmax_and_the_state_is_bounded():
    """The state holds sinks + cache + between w - 1 and w + chunk - 1 recent keys: the same size at the same
    phase of the chunk, whatever the length, and never more than at the end of a chunk."""
    m = sparse_model("llama")
    ids = torch.randint(0, V, (2, 6))
    assert_greedy_generate_is_argmax(m, ids)
    size = lambda new: m.generate(ids, max_new_tokens=new, do_sample=False, pad_token_id=0,
                                  return_dict_in_generate=True).past_key_values.state_nbytes()
    sizes = [size(n) for n in (40, 41, 42, 79, 80, 81)]  # 6 + n tokens, chunk 3: phases 1, 2, 0 twice
    assert sizes[:3] == sizes[3:] and len(set(sizes[:3])) == 3


def test_config_checks_the_cache():
    with pytest.raises(ValueError, match="sparse_cache"):
        HedgehogConfig(attention="linear", sparse_cache=4)
    with pytest.raises(ValueError, match="sparse_chunk"):
        HedgehogConfig(attention="hybrid", sparse_cache=4, sparse_chunk=0)
    with pytest.raises(ValueError, match="sparse_score"):
        HedgehogConfig(attention="hybrid", sparse_cache=4, sparse_score="loo")
    q, k, v, pq, pk = inputs()
    with pytest.raises(ValueError, match="score"):
        sparse_hybrid_attention(q, k, v, pq, pk, 4, 2, score="loo")
