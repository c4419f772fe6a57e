"""The fused Hedgehog kernels (hedgehog.ops.triton_fused: the feature maps inside the linear and hybrid kernels, for a
forward without autograd), run by Triton's CPU interpreter against float64 references: the kernels' output and
final state, the ops and the converted layers routing to them, and where they must not. Each check runs in a fresh
interpreter with TRITON_INTERPRET=1; speed and memory need a GPU (`make gpu-check`)."""
import pytest

from conftest import run_interpreted

pytest.importorskip("triton")

PRELUDE = """
import torch
from hedgehog.ops import triton_fused as tf
from hedgehog.ops.hybrid import hybrid_attention
from hedgehog.ops.linear_attention import linear_attention
from hedgehog.modules.feature_maps import HedgehogFeatureMap
assert tf.serves(torch.zeros(1)), "the interpreter should be on"

def rel(a, b):
    return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()

def maps(d, dp, H, Hk, bias=True):
    fq, fk = HedgehogFeatureMap(d, H, dp, bias=bias), HedgehogFeatureMap(d, Hk, dp, bias=bias)
    with torch.no_grad():
        for f in (fq, fk):
            f.weight.add_(0.3 * torch.randn_like(f.weight))
            if bias:
                f.bias.normal_()
    return fq, fk

def decayed_linear(pq, pk, v, ld):
    # float64 causal linear attention with key j weighed lambda^(i - j) by query i, and its state
    n = pq.shape[2]
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    a = (pq @ pk.transpose(-1, -2)) * torch.exp(ld.view(1, -1, 1, 1) * (i - j).clamp_min(0)) * (j <= i)
    w = torch.exp(ld.view(1, -1, 1) * (n - 1 - torch.arange(n)))[..., None]
    return (a @ v) / a.sum(-1, keepdim=True), ((pk * w).transpose(-1, -2) @ v, (pk * w).sum(2))
"""


def run(code: str) -> str:
    return run_interpreted(PRELUDE, code)


def test_the_fused_hybrid_equals_the_float64_hybrid_with_its_state():
    """Windows below, at and above the block of queries (32 here), sinks up to MAX_SINKS, a decayed state, gamma per
    head, grouped keys and values, head dims that need padding (d = 48: two slices of the projection), and several
    segments (their entering states from the scan) or the default count; output and the state of keys
    ``sinks .. N - w - 1`` against the float64 PyTorch form. A mask off by one key, a sink counted twice or a state
    missing a segment is O(1) off; float32 sums are ~1e-7."""
    out = run("""
    torch.manual_seed(0)
    B, H, Hk, N = 2, 4, 2, 150
    for d, dp, D, window, sinks, dec, seg in [(48, 24, 20, 5, 0, False, 32), (16, 16, 16, 32, 3, True, 32),
                                              (16, 12, 24, 45, 16, True, 64), (8, 8, 8, 20, 1, False, None),
                                              (16, 16, 16, 200, 2, True, 32)]:
        fq, fk = maps(d, dp, H, Hk)
        q, k, v = torch.randn(B, H, N, d) * 1.5, torch.randn(B, Hk, N, d), torch.randn(B, Hk, N, D)
        gamma = torch.rand(H)
        ld = torch.log(torch.rand(H) * 0.1 + 0.9) if dec else None
        with torch.no_grad():
            rep = lambda t: t.double().repeat_interleave(H // Hk, 1)
            want, ((S, z), _, _) = hybrid_attention(q.double(), rep(k), rep(v), fq(q.double()), rep(fk(k.double())),
                                                    window, gamma.double(), sinks=sinks, scale=0.3,
                                                    decay=None if ld is None else ld.double(), return_state=True)
            y, (S2, z2) = tf.fused_attention(q, k, v, tf.hedgehog_weights(fq), tf.hedgehog_weights(fk), window,
                                             sinks, gamma, ld, scale=0.3, seg=seg)
        errs = rel(y, want), rel(S2, S), rel(z2, z)
        assert y.dtype == v.dtype and y.shape == (B, H, N, D)
        assert max(errs) < 2e-6, (d, dp, D, window, sinks, dec, seg, errs)
        print("ok", window, sinks, dec, errs)
    """)
    assert out.count("ok") == 5, out


def test_the_fused_linear_form_equals_float64_from_a_state_with_decay_and_wide_maps():
    """Plain causal linear attention (window 0): from an initial state (a prefill on top of earlier tokens), with
    a decayed state, a map of d' = 80 (padded to 128) and 40 value columns (two programs of 32 per head), with and
    without bias."""
    out = run("""
    torch.manual_seed(1)
    B, H, Hk, N = 1, 2, 1, 100
    for d, dp, D, bias in [(16, 80, 40, True), (24, 16, 16, False)]:
        fq, fk = maps(d, dp, H, Hk, bias)
        assert tf.blocks_for(D) == ((16, 32, 8) if D > 32 else (16, 16, 8))
        q, k, v = torch.randn(B, H, N, d), torch.randn(B, Hk, N, d), torch.randn(B, H, N, D)
        with torch.no_grad():
            pq, pk = fq(q.double()), fk(k.double()).repeat_interleave(H // Hk, 1)
            S0, z0 = torch.rand(B, H, 2 * dp, D, dtype=torch.float64), torch.rand(B, H, 2 * dp, dtype=torch.float64)
            want, (S, z) = linear_attention(pq, pk, v.double(), initial_state=(S0, z0), return_state=True)
            y, (S2, z2) = tf.fused_attention(q, k, v, tf.hedgehog_weights(fq), tf.hedgehog_weights(fk),
                                             initial_state=(S0.float(), z0.float()), seg=32)
            assert max(rel(y, want), rel(S2, S), rel(z2, z)) < 2e-6, (dp, rel(y, want), rel(S2, S), rel(z2, z))
            ld = torch.log(torch.tensor([0.9, 0.97]))
            want, (S, z) = decayed_linear(pq, pk, v.double(), ld.double())
            y, (S2, z2) = tf.fused_attention(q, k, v, tf.hedgehog_weights(fq), tf.hedgehog_weights(fk), decay=ld)
            assert max(rel(y, want), rel(S2, S), rel(z2, z)) < 2e-6, (dp, rel(y, want), rel(S2, S), rel(z2, z))
        print("ok", dp)
    """)
    assert out.count("ok") == 2, out


def test_half_precision_inputs_stay_within_their_rounding():
    """bf16 q, k, v in, bf16 out: within bf16's rounding of the inputs and output (2^-8 relative each) of the float64
    form of the same rounded inputs. (The kernels compute every tile in float32: the interpreter multiplies bf16
    tiles wrongly, so no half-precision product is left untested here.)"""
    out = run("""
    torch.manual_seed(2)
    B, H, N, d = 1, 2, 90, 16
    fq, fk = maps(d, d, H, H)
    q, k, v = (torch.randn(B, H, N, d).bfloat16() for _ in range(3))
    with torch.no_grad():
        for window, sinks in [(0, 0), (20, 2)]:
            pq, pk = fq(q.double()), fk(k.double())
            if window:
                want = hybrid_attention(q.double(), k.double(), v.double(), pq, pk, window, 0.5, sinks=sinks)
            else:
                want = linear_attention(pq, pk, v.double())
            y, _ = tf.fused_attention(q, k, v, tf.hedgehog_weights(fq), tf.hedgehog_weights(fk), window, sinks, 0.5)
            assert y.dtype == torch.bfloat16
            assert rel(y, want) < 2 ** -7, (window, rel(y, want))
            print("ok", window, rel(y, want))
    """)
    assert out.count("ok") == 2, out


def test_the_ops_route_a_frozen_call_to_the_fused_kernels_and_nothing_else():
    """feature_hybrid_attention and feature_linear_attention with a bound backend take the fused kernels for
    Hedgehog maps (also scaled and grouped, as the layer wraps them) without autograd, and give the float64 PyTorch
    form's output and state. Trainable maps under autograd, an explicit 'torch' backend, other maps and more sinks
    than MAX_SINKS take the other paths (and still match)."""
    out = run("""
    from hedgehog.modules.feature_maps import get_feature_map
    from hedgehog.modules.heads import GroupedKeyMap, ScaledMap, repeat_heads
    from hedgehog.ops import feature_hybrid_attention, feature_linear_attention
    calls = []
    fused = tf.fused_attention
    tf.fused_attention = lambda *a, **kw: calls.append(1) or fused(*a, **kw)
    torch.manual_seed(3)
    B, H, Hk, N, d = 2, 4, 2, 70, 8
    fq, fk = maps(d, d, H, Hk)
    q, k, v = torch.randn(B, H, N, d), torch.randn(B, Hk, N, d), torch.randn(B, H, N, d)
    k_rep = repeat_heads(k, 2)
    mq, mk = ScaledMap(fq, 0.7), ScaledMap(GroupedKeyMap(fk, 2), 0.7, 2)
    gamma, ld = torch.rand(H), torch.log(torch.full((H,), 0.95))

    def hybrid(backend, sinks=2, a=mq, b=mk, **kw):
        return feature_hybrid_attention(q, k_rep, v, a, b, 16, gamma, 0.3, sinks=sinks, decay=ld, backend=backend,
                                        return_state=True, **kw)

    with torch.no_grad():
        want, (S, z) = hybrid(None)  # the PyTorch form
        got, (S2, z2) = hybrid("auto")
        assert calls == [1] and max(rel(got, want.double()), rel(S2, S.double())) < 2e-6
        hybrid("torch")
        hybrid("auto", sinks=tf.MAX_SINKS + 1)
        assert calls == [1], calls
        gk = GroupedKeyMap(fk, 2)
        want, (S, z) = feature_linear_attention(q, k, v, fq, gk, return_state=True, backend="torch")
        got, (S2, z2) = feature_linear_attention(q, k, v, fq, gk, return_state=True)
        assert calls == [1, 1] and max(rel(got, want.double()), rel(S2, S.double())) < 2e-6
        t2r = get_feature_map("t2r", d, H), GroupedKeyMap(get_feature_map("t2r", d, Hk), 2)
        feature_linear_attention(q, k, v, *t2r)
        assert calls == [1, 1], calls
    # under autograd with trainable maps: the autograd form, whose gradient reaches the maps
    y = hybrid("auto")[0]
    y.sum().backward()
    assert calls == [1, 1] and fq.weight.grad is not None and fq.weight.grad.abs().sum() > 0
    # grad mode alone (nothing requires grad) still takes the fused kernels
    for p in (*fq.parameters(), *fk.parameters()):
        p.requires_grad_(False)
    hybrid("auto")
    assert calls == [1, 1, 1], calls
    print("ok")
    """)
    assert "ok" in out, out


@pytest.mark.parametrize("attention", ["linear", "hybrid"])
def test_a_converted_model_prefills_and_decodes_through_the_fused_kernels(attention):
    """A converted model (grouped-query heads, head dim 8: padded to the kernels' 16) whose layers' backend is bound
    ("auto", as built): its full forward under no_grad runs every layer in the fused kernels and equals the same model
    on the PyTorch path ("torch"); a prefill into the recurrent-state cache (the linear state from the kernels' final
    state, the hybrid's ring of recent keys beside it) and decoding steps on top give the full forward's logits."""
    out = run(f"""
    attention = {attention!r}
    import sys
    sys.path.insert(0, "tests")
    from conftest import V, perturb_maps, tiny
    from hedgehog.layers.attention import HedgehogConfig, hedgehog_layers
    from hedgehog.layers.generation import HedgehogCache
    from hedgehog.models.convert import convert_model
    from hedgehog.ops import backends
    calls = []
    fused = tf.fused_attention
    tf.fused_attention = lambda *a, **kw: calls.append(kw.get("window", 0)) or fused(*a, **kw)
    torch.manual_seed(0)
    extra = dict(window=6, sinks=2, state_decay=0.9) if attention == "hybrid" else dict()
    m = convert_model(tiny("llama").eval(), HedgehogConfig(attention=attention, **extra))
    perturb_maps(m)
    layers = hedgehog_layers(m)
    ids = torch.randint(0, V, (2, 40))
    with torch.no_grad():
        for layer in layers:
            layer.kernels = backends.bind("torch")
        want = m(ids).logits
        assert calls == [], calls
        for layer in layers:
            layer.kernels = backends.bind("auto")
        full = m(ids).logits
        assert calls == [extra.get("window", 0)] * len(layers), calls
        assert (full - want).abs().max() < 1e-4, (full - want).abs().max()
        cache = HedgehogCache(m)
        parts = [m(ids[:, :30], past_key_values=cache, use_cache=True).logits]
        parts += [m(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits for t in range(30, 40)]
        assert len(calls) == 2 * len(layers), calls  # the prefill; the steps are recurrent
        assert (torch.cat(parts, 1) - want).abs().max() < 1e-4
    print("ok")
    """)
    assert "ok" in out, out


def test_segments_keep_the_states_within_their_share_and_refusals_name_the_fix():
    """The segments: towards TARGET_PROGRAMS programs, their states within STATE_SHARE of the output's bytes (SDPA's
    log-sum-exp beside its output), whole blocks; and the kernels refuse autograd, shapes and head dims they do not
    take with a message that says what to use instead."""
    out = run("""
    for bh, n in [(8, 65536), (8, 2048), (1, 100), (96, 16384), (1, 1 << 20), (8, 262144)]:
        C, fp, vp, out_bytes = 16, 64, 64, bh * n * 64 * 2
        seg = tf.segments(bh, n, C, fp, vp, out_bytes)
        p = -(-n // seg)
        assert seg % C == 0 and 1 <= p <= max(1, -(-tf.TARGET_PROGRAMS // bh)), (bh, n)
        assert p == 1 or p * bh * 2 * fp * (vp + 1) * 4 <= out_bytes * tf.STATE_SHARE, (bh, n, seg)
    # 64k tokens at 8 heads of 64 in bf16: a 64 MB output, 7 segments' states (1.8 MB)
    assert -(-65536 // tf.segments(8, 65536, 16, 64, 64, 8 * 65536 * 128)) == 7
    assert -(-(1 << 20) // tf.segments(1, 1 << 20, 16, 64, 64, (1 << 20) * 128)) == 126  # 4.2 MB: its share
    fq, fk = maps(8, 8, 2, 2)
    with torch.no_grad():
        wq, wk = tf.hedgehog_weights(fq), tf.hedgehog_weights(fk)
    q = torch.randn(1, 2, 20, 8, requires_grad=True)
    for bad, words in [(dict(q=q), "no backward"), (dict(window=0, sinks=2), "window must be"),
                       (dict(window=4, initial_state=(torch.zeros(1, 2, 16, 8), torch.zeros(1, 2, 16))),
                        "linear attention (window 0) only")]:
        kw = dict(q=torch.randn(1, 2, 20, 8), k=torch.randn(1, 2, 20, 8), v=torch.randn(1, 2, 20, 8),
                  wq=wq, wk=wk)
        kw.update(bad)
        try:
            tf.fused_attention(**kw)
        except ValueError as e:
            assert words in str(e), e
        else:
            raise AssertionError(bad)
    print("ok")
    """)
    assert "ok" in out, out


@pytest.mark.gpu
def test_the_fused_kernels_on_cuda_match_float64_in_float32_and_bf16():
    """On a GPU (no interpreter, so in this process): the hybrid (window 64, 4 sinks, decay) and the linear form of
    4,100 tokens, 8 query heads over 2 KV heads of head dim 64, through the ops as the layer calls them, against
    float64. float32 inputs: the kernels' products run in TF32 (~1e-3 relative each), so 2e-2; bf16 inputs add their
    rounding, so 3e-2. A wrong mask, state or segment boundary is O(1). Also: the forward's peak memory above its
    inputs is its output plus the segment states (at most STATE_SHARE = 1/32 of the output, about SDPA's
    log-sum-exp), the padded weights and the allocator's rounding: here two outputs (both forms are held)."""
    import torch

    from hedgehog.modules.feature_maps import get_feature_map
    from hedgehog.modules.heads import GroupedKeyMap, ScaledMap
    from hedgehog.ops import (feature_hybrid_attention, feature_linear_attention, quadratic_hybrid_attention,
                              quadratic_linear_attention, triton_fused)

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.manual_seed(6)
    B, H, Hk, N, d = 1, 8, 2, 4100, 64
    q, k, v = (torch.randn(B, h, N, d, device="cuda") / 2 for h in (H, Hk, H))
    fq, fk = get_feature_map("hedgehog", d, H).cuda(), GroupedKeyMap(get_feature_map("hedgehog", d, Hk).cuda(), 4)
    fk_rep = ScaledMap(fk, 1.0, 4)  # on k repeated to the query heads, as the layer passes it
    k_rep = k.repeat_interleave(4, 1)
    ld = torch.log(torch.linspace(0.9, 0.999, H, device="cuda"))
    rel = lambda a, b: ((a.double() - b).abs().max() / b.abs().max()).item()
    calls = []
    fused = triton_fused.fused_attention
    triton_fused.fused_attention = lambda *a, **kw: calls.append(1) or fused(*a, **kw)
    try:
        with torch.no_grad():
            pq, pk = fq(q).double(), fk(k).double()
            want = {"hybrid": quadratic_hybrid_attention(q.double(), k_rep.double(), v.double(), pq, pk, 64, 0.5,
                                                         sinks=4, decay=ld.double()),
                    "linear": quadratic_linear_attention(pq, pk, v.double())}
            for dtype, bound in ((torch.float32, 2e-2), (torch.bfloat16, 3e-2)):
                qq, kk, kr, vv = (t.to(dtype) for t in (q, k, k_rep, v))
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                got = {"hybrid": feature_hybrid_attention(qq, kr, vv, fq, fk_rep, window=64, gamma=0.5, sinks=4,
                                                          decay=ld, backend="auto"),
                       "linear": feature_linear_attention(qq, kk, vv, fq, fk, backend="auto")}
                peak = torch.cuda.max_memory_allocated() - base
                out = vv.numel() * vv.element_size()
                assert peak <= 2 * out * (1 + triton_fused.STATE_SHARE) + (4 << 20), (dtype, peak, out)
                for name in got:
                    assert got[name].dtype == dtype and rel(got[name], want[name]) < bound, (name, dtype,
                                                                                         rel(got[name], want[name]))
    finally:
        triton_fused.fused_attention = fused
    assert len(calls) == 4, calls
