"""The hybrid's exact window part as a Triton kernel (hedgehog.ops.triton_window), run by Triton's CPU interpreter
against float64 references: the kernel's own (num, den) and its gradients (the row max's gradient included), the
hybrid and the window baseline through it, sinks and a decayed state. Triton reads TRITON_INTERPRET when a kernel
is defined, so each check runs in a fresh interpreter with it set; speed needs a GPU (`make test-gpu`)."""
import textwrap

import pytest

from conftest import run_interpreted

pytest.importorskip("triton")

PRELUDE = """
import torch
from hedgehog.ops import triton_window as tw
assert tw.serves(torch.zeros(1)), "the interpreter should be on"

def rel(a, b):
    return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
"""


def run(code: str) -> str:
    return run_interpreted(PRELUDE, code)


# wide: the blocks of 16 a head dim of 256 gets (Gemma-2/3; tw.WIDE_FROM lowered so these small shapes take them)
@pytest.mark.parametrize("wide", [False, True])
def test_kernel_equals_the_float64_reference_with_the_row_max_gradient(wide):
    out = run(f"    tw.WIDE_FROM = {16 if wide else 256}\n" + """
    def ref(q, k, v, w, sinks, scale):
        n = q.shape[1]
        r, c = torch.arange(n)[:, None], torch.arange(n)[None, :]
        vis = (c <= r) & (((r - c) < w) | (c < sinks))
        s = (q @ k.transpose(-1, -2) * scale).masked_fill(~vis, float("-inf"))
        p = torch.exp(s - s.amax(-1, keepdim=True))
        return p @ v, p.sum(-1)

    torch.manual_seed(0)
    assert tw.block_for(8, 8) == (16 if tw.WIDE_FROM == 16 else 32)
    # odd lengths, windows below / at / above the block (32, or 16), sinks reached by the sink step or the window
    for n, w, sinks, d, dv in [(45, 8, 0, 8, 8), (100, 16, 4, 16, 12), (77, 40, 3, 24, 32), (64, 64, 0, 16, 16),
                               (130, 5, 1, 16, 8)]:
        q, k, v = (torch.randn(3, n, dd, dtype=torch.float64) for dd in (d, d, dv))
        q, k, v = (q * 1.5).requires_grad_(), k.requires_grad_(), v.requires_grad_()
        gn, gd = torch.randn(3, n, dv, dtype=torch.float64), torch.randn(3, n, dtype=torch.float64)
        num, den = ref(q, k, v, w, sinks, 0.3)
        want = torch.autograd.grad((num * gn).sum() + (den * gd).sum(), (q, k, v))
        qf, kf, vf = (x.detach().float().requires_grad_() for x in (q, k, v))
        num2, den2 = tw.window_num_den(qf, kf, vf, w, 0.3, sinks)
        got = torch.autograd.grad((num2 * gn.float()).sum() + (den2 * gd.float()).sum(), (qf, kf, vf))
        # float32 sums of <= 2w terms: ~1e-7 relative; a wrong mask or a missing term is O(1)
        assert rel(num2, num) < 2e-6 and rel(den2, den) < 2e-6, (n, w, sinks)
        assert max(rel(a, b) for a, b in zip(got, want)) < 5e-6, (n, w, sinks)
        # the row max's own gradient matters: without it dq is off by far more than the bound
        with torch.no_grad():
            r, c = torch.arange(n)[:, None], torch.arange(n)[None, :]
            vis = (c <= r) & (((r - c) < w) | (c < sinks))
            m = (q @ k.transpose(-1, -2) * 0.3).masked_fill(~vis, float("-inf")).amax(-1, keepdim=True)
        s = (q @ k.transpose(-1, -2) * 0.3).masked_fill(~vis, float("-inf"))
        p = torch.exp(s - m)
        wrong = torch.autograd.grad(((p @ v) * gn).sum() + (p.sum(-1) * gd).sum(), q)[0]
        assert rel(wrong, want[0]) > 1e-3
    print("ok")
    """)
    assert out.strip().endswith("ok")


def test_hybrid_and_baseline_through_the_kernel_equal_float64_references():
    out = run("""
    from hedgehog.ops import hybrid_attention, quadratic_hybrid_attention, window_softmax_attention
    from hedgehog.ops import softmax_attention_weights

    torch.manual_seed(1)
    B, H, N, d, D, F = 2, 3, 70, 16, 8, 12
    for w, sinks, decay in [(16, 0, None), (24, 4, torch.log(torch.tensor([0.9, 0.97, 0.99])))]:
        q, k, v = torch.randn(B, H, N, d) * 1.3, torch.randn(B, H, N, d), torch.randn(B, H, N, D)
        pq, pk = torch.rand(B, H, N, F) + 0.05, torch.rand(B, H, N, F) + 0.05
        g = torch.tensor([0.3, 0.5, 0.8], requires_grad=True)
        leaves = [t.requires_grad_() for t in (q, k, v, pq, pk)]
        y = hybrid_attention(q, k, v, pq, pk, window=w, gamma=g, scale=0.25, sinks=sinks, decay=decay)
        gy = torch.randn_like(y)
        got = torch.autograd.grad((y * gy).sum(), leaves + [g])
        dd = lambda t: t.detach().double().requires_grad_()
        l64 = [dd(t) for t in leaves]
        g64 = dd(g)
        want_y = quadratic_hybrid_attention(*l64, w, g64, scale=0.25, sinks=sinks,
                                            decay=None if decay is None else decay.double())
        want = torch.autograd.grad((want_y * gy.double()).sum(), l64 + [g64])
        assert rel(y, want_y) < 1e-5, rel(y, want_y)
        assert max(rel(a, b) for a, b in zip(got, want)) < 1e-4, [rel(a, b) for a, b in zip(got, want)]
    # the no-training baseline (window + sinks softmax) through the kernel, against the masked softmax rows
    q, k, v = torch.randn(B, H, N, d), torch.randn(B, H, N, d), torch.randn(B, H, N, D)
    y = window_softmax_attention(q, k, v, 16, sinks=4, scale=0.25)
    r, c = torch.arange(N)[:, None], torch.arange(N)[None, :]
    vis = (c <= r) & (((r - c) < 16) | (c < 4))
    s = (q.double() @ k.double().transpose(-1, -2) * 0.25).masked_fill(~vis, float("-inf"))
    assert rel(y, torch.softmax(s, -1) @ v.double()) < 1e-5
    # more sinks than one key block holds (blocks of 16, as at head dim 256): the kernel is not called, and both
    # callers take the PyTorch path with the same rows
    tw.WIDE_FROM = 16
    calls = []
    kernel = tw.window_num_den
    tw.window_num_den = lambda *a, **kw: calls.append(1) or kernel(*a, **kw)
    for sinks, kernel_calls in ((16, 1), (20, 0)):
        calls.clear()
        y = window_softmax_attention(q, k, v, 16, sinks=sinks, scale=0.25)
        vis = (c <= r) & (((r - c) < 16) | (c < sinks))
        s = (q.double() @ k.double().transpose(-1, -2) * 0.25).masked_fill(~vis, float("-inf"))
        assert rel(y, torch.softmax(s, -1) @ v.double()) < 1e-5 and len(calls) == kernel_calls, (sinks, calls)
        calls.clear()
        y = hybrid_attention(q, k, v, pq, pk, window=16, gamma=0.5, scale=0.25, sinks=sinks)
        want_y = quadratic_hybrid_attention(*(t.detach().double() for t in (q, k, v, pq, pk)), 16, 0.5, scale=0.25,
                                            sinks=sinks)
        assert rel(y, want_y) < 1e-5 and len(calls) == kernel_calls, (sinks, calls)
    print("ok")
    """)
    assert out.strip().endswith("ok")


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 256])
def test_kernel_on_cuda_matches_the_float64_reference(d):
    """The compiled kernel on a GPU, at head dim 64 and 256 (Gemma-2/3: blocks of 16). Its float32 dots run in TF32
    (10 explicit mantissa bits): scores carry ~2^-11 relative error, so weights exp(s - m) ~1e-3 relative at
    |s| ~ 1; the bound 1e-2 holds that with room and still fails a wrong mask or a missing term (O(1))."""
    import torch

    from hedgehog.ops import triton_window as tw

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.manual_seed(0)
    n, w, sinks = 300, 64, 4
    q, k, v = (torch.randn(4, n, d, dtype=torch.float64) for _ in range(3))
    r, c = torch.arange(n)[:, None], torch.arange(n)[None, :]
    vis = (c <= r) & (((r - c) < w) | (c < sinks))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    s = (leaves[0] @ leaves[1].transpose(-1, -2) * d ** -0.5).masked_fill(~vis, float("-inf"))
    p = torch.exp(s - s.amax(-1, keepdim=True))
    num, den = p @ leaves[2], p.sum(-1)
    gn, gd = torch.randn_like(num), torch.randn_like(den)
    want = torch.autograd.grad((num * gn).sum() + (den * gd).sum(), leaves)
    cuda = [t.float().cuda().requires_grad_() for t in (q, k, v)]
    num2, den2 = tw.window_num_den(*cuda, w, d ** -0.5, sinks)
    got = torch.autograd.grad((num2 * gn.float().cuda()).sum() + (den2 * gd.float().cuda()).sum(), cuda)
    rel = lambda a, b: ((a.double().cpu() - b).abs().max() / b.abs().max()).item()
    assert rel(num2, num) < 1e-2 and rel(den2, den) < 1e-2
    assert max(rel(a, b) for a, b in zip(got, want)) < 1e-2


GLA_STANDIN = '''
def standin_chunk_simple_gla(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None, output_final_state=False,
                             state_v_first=False, cu_seqlens=None, cu_seqlens_cpu=None, **kwargs):
    """fla-core 0.6.0's chunk_simple_gla in float64: [B, T, H, K] in; S_t = exp(g_t) S_{t-1} + k_t v_t^T from
    S_0 = initial_state [B, H, K, V] (zeros if None), o_t = scale q_t S_t; the final state [B, H, K, V]."""
    assert g_gamma is None and cu_seqlens is None and not state_v_first
    scale = k.shape[-1] ** -0.5 if scale is None else scale
    B, T, H, K = q.shape
    G = torch.zeros(B, T, H, dtype=torch.float64) if g is None else g.double().cumsum(1)
    Gh = G.permute(0, 2, 1)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    w = (Gh[..., :, None] - Gh[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    a = torch.einsum("bnhk,bphk->bhnp", q.double() * scale, k.double()) * w
    o = torch.einsum("bhnp,bphv->bnhv", a, v.double())
    last = (G[:, -1:] - G).exp()
    S = torch.einsum("bph,bphk,bphv->bhkv", last, k.double(), v.double())
    if initial_state is not None:  # S_0 decays by exp(G_t) up to each step
        S0 = initial_state.double()
        o = o + torch.einsum("bnhk,bhkv->bnhv", q.double() * scale * G.exp()[..., None], S0)
        S = S + G[:, -1].exp()[..., None, None] * S0
    return o.to(q.dtype), (S.float() if output_final_state else None)
'''


def test_device_hybrid_joins_the_kernel_and_fla_gla_like_the_float64_reference():
    """The CUDA hybrid: our window kernel + fla's gated chunk kernel on shifted keys, one normalisation; here fla is
    a float64 stand-in with fla-core 0.6.0's signature (its Triton kernels need a GPU)."""
    out = run(GLA_STANDIN + textwrap.dedent("""
    import inspect
    from hedgehog.ops import quadratic_hybrid_attention
    from hedgehog.ops.backends import GLA_PARAMS
    from hedgehog.ops.hybrid import device_hybrid_attention

    params = list(inspect.signature(standin_chunk_simple_gla).parameters)
    assert params == ["q", "k", "v", "g", "g_gamma", "scale", "initial_state", "output_final_state", "state_v_first",
                      "cu_seqlens", "cu_seqlens_cpu", "kwargs"] and all(p in params for p in GLA_PARAMS)
    torch.manual_seed(2)
    B, H, N, d, D, F = 2, 3, 75, 16, 8, 12
    for w, sinks, decay in [(16, 0, None), (24, 4, torch.log(torch.tensor([0.9, 0.97, 0.99])))]:
        q, k, v = torch.randn(B, H, N, d) * 1.3, torch.randn(B, H, N, d), torch.randn(B, H, N, D)
        pq, pk = torch.rand(B, H, N, F) + 0.05, torch.rand(B, H, N, F) + 0.05
        g = torch.tensor([0.3, 0.5, 0.8], requires_grad=True)
        ld = None if decay is None else decay.clone().requires_grad_()
        leaves = [t.requires_grad_() for t in (q, k, v, pq, pk)]
        y, (S, z) = device_hybrid_attention(q, k, v, pq, pk, w, g, 0.25, standin_chunk_simple_gla, sinks, ld)
        gy = torch.randn_like(y)
        extra = [g] + ([] if ld is None else [ld])
        got = torch.autograd.grad((y * gy).sum(), leaves + extra)
        dd = lambda t: t.detach().double().requires_grad_()
        l64, e64 = [dd(t) for t in leaves], [dd(t) for t in extra]
        want_y = quadratic_hybrid_attention(*l64, w, e64[0], scale=0.25, sinks=sinks,
                                            decay=None if ld is None else e64[1])
        want = torch.autograd.grad((want_y * gy.double()).sum(), l64 + e64)
        assert rel(y, want_y) < 1e-5, rel(y, want_y)
        assert max(rel(a, b) for a, b in zip(got, want)) < 1e-4, [rel(a, b) for a, b in zip(got, want)]
        # the state of keys 0 .. N-w-1 (not the sinks), each decayed to the last query
        i = torch.arange(N - w)
        wt = (i >= sinks).double() * (1.0 if decay is None else
                                      torch.exp(decay.double()[:, None] * (N - 1 - w - i)[None, :]))
        wt = torch.as_tensor(wt).expand(H, N - w) if torch.as_tensor(wt).dim() == 1 else wt
        S_ref = torch.einsum("hi,bhif,bhid->bhfd", wt, pk.double()[:, :, :N - w], v.double()[:, :, :N - w])
        z_ref = torch.einsum("hi,bhif->bhf", wt, pk.double()[:, :, :N - w])
        assert rel(S, S_ref) < 1e-5 and rel(z, z_ref) < 1e-5
    print("ok")
    """))
    assert out.strip().endswith("ok")


def test_device_hybrid_without_autograd_runs_in_pieces_with_features_per_piece():
    """Without autograd the CUDA hybrid runs in pieces (here of 20 to 39 queries): the features are asked for per
    piece (the keys' shifted by the window), fla continues from the state of the piece before, the window kernel
    reads a piece's keys, the window before them and the sinks; the output and state equal the one-call (autograd)
    form's and the float64 reference's. Under autograd, one piece."""
    out = run(GLA_STANDIN + textwrap.dedent("""
    from hedgehog.ops import quadratic_hybrid_attention
    from hedgehog.ops.hybrid import device_hybrid_attention

    torch.manual_seed(4)
    B, H, N, d, D, F = 2, 3, 75, 16, 8, 12
    for w, sinks, decay in [(16, 0, None), (12, 4, torch.log(torch.tensor([0.9, 0.97, 0.99])))]:
        q, k, v = torch.randn(B, H, N, d) * 1.3, torch.randn(B, H, N, d), torch.randn(B, H, N, D)
        pq, pk = torch.rand(B, H, N, F) + 0.05, torch.rand(B, H, N, F) + 0.05
        g = torch.tensor([0.3, 0.5, 0.8])
        asked = []
        def feat(phi, name, grad=False):
            def rows(a, b):
                asked.append((name, a, b))
                return phi[:, :, a:b].clone().requires_grad_(grad)
            return rows
        with torch.no_grad():
            y, (S, z) = device_hybrid_attention(q, k, v, feat(pq, "q"), feat(pk, "k"), w, g, 0.25,
                                                standin_chunk_simple_gla, sinks, decay, piece=20)
        assert asked == [("q", 0, 25), ("k", 0, 25 - w), ("q", 25, 50), ("k", 25 - w, 50 - w),
                         ("q", 50, 75), ("k", 50 - w, 75 - w)], asked
        asked.clear()
        y1, (S1, z1) = device_hybrid_attention(q, k, v, feat(pq, "q", True), feat(pk, "k", True), w, g, 0.25,
                                               standin_chunk_simple_gla, sinks, decay, piece=20)
        probes = asked[:-2]  # whether the features require grad, asked of the first token until one does
        assert probes == [("q", 0, 1)] and asked[-2:] == [("q", 0, N), ("k", 0, N - w)], asked
        want = quadratic_hybrid_attention(*(t.double() for t in (q, k, v, pq, pk)), w, g.double(), scale=0.25,
                                          sinks=sinks, decay=None if decay is None else decay.double())
        assert rel(y, want) < 1e-5 and rel(y, y1.detach().double()) < 1e-5, (rel(y, want), rel(y, y1.double()))
        assert rel(S, S1.detach().double()) < 1e-5 and rel(z, z1.detach().double()) < 1e-5
    print("ok")
    """))
    assert out.strip().endswith("ok")


def test_the_layer_takes_the_device_hybrid_where_the_backend_binds_fla(monkeypatch):
    """Routing, without Triton: feature_hybrid_attention hands CUDA-like calls to device_hybrid_attention with the
    backend's bound gla, and the torch form otherwise."""
    import torch

    from hedgehog.ops import hybrid
    from hedgehog.ops.backends import Backend

    calls = []
    monkeypatch.setattr(hybrid.triton_window, "serves", lambda x: True)
    monkeypatch.setattr(Backend, "hybrid_linear", lambda self, x: self.gla)
    monkeypatch.setattr(hybrid, "device_hybrid_attention",
                        lambda *a, **kw: calls.append(a[8]) or (torch.zeros_like(a[2]), None))
    q = torch.randn(1, 2, 10, 4)
    ident = lambda x, pos: x
    gla = object()
    hybrid.feature_hybrid_attention(q, q, q, ident, ident, window=4, backend=Backend("fla", "auto", None, gla))
    assert calls == [gla]
    hybrid.feature_hybrid_attention(q, q, q, ident, ident, window=4, backend=Backend("torch", "auto"))
    hybrid.feature_hybrid_attention(q, q, q, ident, ident, window=4)
    assert calls == [gla]


@pytest.mark.gpu
def test_hybrid_on_cuda_with_fla_matches_the_float64_reference():
    """The whole CUDA hybrid (our window kernel + fla's chunk_simple_gla where fla is installed, else the torch
    linear part) against the float64 quadratic reference, forward and gradients. TF32 in both kernels: ~1e-3
    relative per score or feature product, so 2e-2 on outputs and gradients, far below a wrong term's O(1)."""
    import torch

    from hedgehog.ops import hybrid_attention, quadratic_hybrid_attention

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.manual_seed(3)
    B, H, N, d, D, F = 2, 4, 700, 64, 64, 128
    q, k, v = torch.randn(B, H, N, d) / 2, torch.randn(B, H, N, d) / 2, torch.randn(B, H, N, D)
    pq, pk = torch.rand(B, H, N, F) / F, torch.rand(B, H, N, F) / F
    gam, ld = torch.full((H,), 0.5), torch.log(torch.tensor([0.9, 0.95, 0.99, 0.999]))
    dev = [t.cuda().requires_grad_() for t in (q, k, v, pq, pk, gam, ld)]
    y = hybrid_attention(*dev[:5], window=64, gamma=dev[5], scale=0.125, sinks=4, decay=dev[6], backend="auto")
    gy = torch.randn(B, H, N, D)
    got = torch.autograd.grad((y * gy.cuda()).sum(), dev)
    ref = [t.double().requires_grad_() for t in (q, k, v, pq, pk, gam, ld)]
    want_y = quadratic_hybrid_attention(*ref[:5], 64, ref[5], scale=0.125, sinks=4, decay=ref[6])
    want = torch.autograd.grad((want_y * gy.double()).sum(), ref)
    rel = lambda a, b: ((a.double().cpu() - b).abs().max() / b.abs().max()).item()
    assert rel(y, want_y) < 2e-2
    assert max(rel(a, b) for a, b in zip(got, want)) < 2e-2, [rel(a, b) for a, b in zip(got, want)]


@pytest.mark.gpu
def test_a_cuda_forward_without_autograd_runs_in_pieces_and_matches_one_call(monkeypatch):
    """On CUDA with fla: the hybrid (window kernel + chunk_simple_gla) and the linear form (chunk_linear_attn), with
    Hedgehog maps, in pieces of 512 to 1,023 queries without autograd, against the same call in one piece (under
    autograd) and the float64 reference. TF32 in the kernels: ~1e-3 relative per product, so 2e-2, far below the
    O(1) error of a piece that started from a wrong state or read the wrong window."""
    import importlib

    import torch

    from hedgehog.modules.feature_maps import get_feature_map
    from hedgehog.ops import (feature_hybrid_attention, feature_linear_attention, quadratic_hybrid_attention,
                              quadratic_linear_attention)
    from hedgehog.ops import backends, chunked, hybrid, triton_fused

    if not torch.cuda.is_available() or not backends.is_fla_available():
        pytest.skip("needs CUDA and fla")
    la = importlib.import_module("hedgehog.ops.linear_attention")
    monkeypatch.setattr(triton_fused, "bound", lambda backend, x: False)  # Hedgehog maps would take the fused kernels
    monkeypatch.setattr(hybrid, "device_piece", lambda rows: 512)
    monkeypatch.setattr(la, "device_piece", lambda rows: 512)
    torch.manual_seed(5)
    B, H, N, d = 1, 4, 2100, 64
    q, k, v = (torch.randn(B, H, N, d, device="cuda") / 2 for _ in range(3))
    fq, fk = get_feature_map("hedgehog", d, H).cuda(), get_feature_map("hedgehog", d, H).cuda()
    ld = torch.log(torch.tensor([0.9, 0.95, 0.99, 0.999], device="cuda"))
    rel = lambda a, b: ((a.double() - b).abs().max() / b.abs().max()).item()
    with torch.no_grad():
        pq, pk = fq(q).double(), fk(k).double()
    runs = {
        "hybrid": (lambda: feature_hybrid_attention(q, k, v, fq, fk, window=64, gamma=0.5, sinks=4, decay=ld,
                                                    backend="auto"),
                   quadratic_hybrid_attention(q.double(), k.double(), v.double(), pq, pk, 64, 0.5, sinks=4,
                                              decay=ld.double())),
        "linear": (lambda: feature_linear_attention(q, k, v, fq, fk, backend="auto"),
                   quadratic_linear_attention(pq, pk, v.double())),
    }
    for name, (call, want) in runs.items():
        with torch.no_grad():
            pieces = call()
        whole = call()  # the maps' weights require grad: one piece
        assert whole.requires_grad and not pieces.requires_grad
        assert rel(pieces, want) < 2e-2 and rel(pieces, whole.detach()) < 2e-2, (name, rel(pieces, want))
    assert chunked.piece_bounds(N, 512) == [(0, 525), (525, 1050), (1050, 1575), (1575, 2100)]
