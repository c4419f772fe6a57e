"""The fused CPU kernel against the float64 quadratic reference: lengths around its chunk, grouped heads,
carried states, precision, dispatch and fallback."""
import platform
import shutil

import pytest
import torch

from conftest import needs_kernel, spy_on_kernel
from hedgehog.modules.feature_maps import get_feature_map
from hedgehog.ops import cpu_kernel, feature_linear_attention, quadratic_linear_attention
from hedgehog.ops.cpu_kernel import fused_hedgehog_attention

C = cpu_kernel.CHUNK
LENGTHS = [1, 7, C - 1, C, C + 1, 63, 257, 513]

def test_kernel_builds_on_linux_x86_with_gcc():
    """Where it can be built (the CI machine), it is: a silent fallback would hide a broken kernel."""
    if not (platform.system() == "Linux" and platform.machine() == "x86_64" and shutil.which("g++")):
        pytest.skip("the kernel targets Linux x86-64 with g++")
    assert cpu_kernel.enabled()
    mod = cpu_kernel.load()
    assert mod is not None
    flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "")
    assert mod.avx512 == (" avx512f" in flags)  # -march=native takes the vector paths where the CPU has them


def trained_maps(h, hk, d, proj=None, seed=0):
    """Hedgehog maps moved away from the identity init (random weights and biases)."""
    g = torch.Generator().manual_seed(seed)
    maps = []
    for heads in (h, hk):
        fm = get_feature_map("hedgehog", d, heads, feature_dim=proj)
        with torch.no_grad():
            fm.weight.add_(0.3 * torch.randn(fm.weight.shape, generator=g))
            fm.bias.copy_(0.5 * torch.randn(fm.bias.shape, generator=g))
        maps.append(fm)
    return maps


def reference(q, k, v, fq, fk, state=None):
    """float64: features, heads repeated to the query heads, quadratic causal attention (+ the state)."""
    fq64, fk64 = (get_feature_map("hedgehog", m.head_dim, m.num_heads, feature_dim=m.proj_dim,
                                  bias=m.bias is not None).double() for m in (fq, fk))
    fq64.load_state_dict(fq.state_dict())
    fk64.load_state_dict(fk.state_dict())
    with torch.no_grad():
        pq, pk = fq64(q.double()), fk64(k.double())
    rep = q.shape[1] // k.shape[1]
    pk_r, v_r = (t.repeat_interleave(rep, 1) for t in (pk, v.double()))
    if state is None:
        return quadratic_linear_attention(pq, pk_r, v_r), (pk.transpose(-1, -2) @ v.double(), pk.sum(2))
    # a carried state acts as one extra key whose contribution to every query is phi_q . [S, z]
    S, z = (t.double().repeat_interleave(rep, 1) for t in state)
    a = (pq @ pk_r.transpose(-1, -2)).tril()
    num = a @ v_r + pq @ S
    den = a.sum(-1, keepdim=True) + pq @ z.unsqueeze(-1)
    return num / den, None


def assert_matches(got, want):
    """Output and state (y, S, z) against the float64 reference."""
    for g, w, atol in zip(got, want, (2e-6, 2e-5, 2e-5)):
        torch.testing.assert_close(g.double(), w, rtol=2e-5, atol=atol)


@needs_kernel
@pytest.mark.parametrize("n", LENGTHS, ids=lambda n: f"N{n}")
def test_fused_matches_float64_reference(n):
    B, H, d, D = 2, 4, 16, 8
    fq, fk = trained_maps(H, H, d)
    q, k = 2 * torch.randn(B, H, n, d), 2 * torch.randn(B, H, n, d)
    v = torch.randn(B, H, n, D)
    with torch.no_grad():
        y, (S, z) = fused_hedgehog_attention(q, k, v, fq, fk)
    ref, (S_ref, z_ref) = reference(q, k, v, fq, fk)
    assert_matches((y, S, z), (ref, S_ref, z_ref))


@needs_kernel
@pytest.mark.parametrize("b,h,hk", [(1, 6, 2), (2, 6, 3), (1, 3, 1), (1, 9, 3)], ids=lambda x: str(x))
def test_fused_grouped_query_heads(b, h, hk):
    """Query head i reads key head i // (H / Hk); both task layouts (one per key head, one per query head
    when there are fewer key heads than threads) give the reference, and the state is per key head."""
    d, D, n = 16, 8, 100
    fq, fk = trained_maps(h, hk, d, seed=1)
    q, k, v = torch.randn(b, h, n, d), torch.randn(b, hk, n, d), torch.randn(b, hk, n, D)
    with torch.no_grad():
        y, (S, z) = fused_hedgehog_attention(q, k, v, fq, fk)
    ref, (S_ref, z_ref) = reference(q, k, v, fq, fk)
    assert S.shape == (b, hk, 2 * d, D)
    assert_matches((y, S, z), (ref, S_ref, z_ref))


@needs_kernel
def test_fused_task_layouts_agree(monkeypatch):
    """One thread (a task per key head) and two (a task per query head with its own state copy)."""
    fq, fk = trained_maps(4, 1, 16, seed=2)
    q, k, v = torch.randn(1, 4, 70, 16), torch.randn(1, 1, 70, 16), torch.randn(1, 1, 70, 8)
    outs = []
    prev = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with torch.no_grad():
                outs.append(fused_hedgehog_attention(q, k, v, fq, fk))
    finally:
        torch.set_num_threads(prev)
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[0][1][0], outs[1][1][0], rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("split", [1, C, 45, 99], ids=lambda s: f"split{s}")
def test_fused_state_carries_between_calls(split):
    """A prefill of the first part and a call on the rest from its state == one pass."""
    fq, fk = trained_maps(6, 2, 16, seed=3)
    n = 100
    q, k, v = torch.randn(1, 6, n, 16), torch.randn(1, 2, n, 16), torch.randn(1, 2, n, 8)
    with torch.no_grad():
        full, (S_full, z_full) = fused_hedgehog_attention(q, k, v, fq, fk)
        y1, st = fused_hedgehog_attention(q[:, :, :split], k[:, :, :split], v[:, :, :split], fq, fk)
        y2, (S2, z2) = fused_hedgehog_attention(q[:, :, split:], k[:, :, split:], v[:, :, split:], fq, fk, st)
    torch.testing.assert_close(torch.cat([y1, y2], 2), full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(S2, S_full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z2, z_full, rtol=1e-5, atol=1e-5)
    ref, _ = reference(q[:, :, split:], k[:, :, split:], v[:, :, split:], fq, fk, st)
    torch.testing.assert_close(y2.double(), ref, rtol=2e-5, atol=2e-6)


@needs_kernel
@pytest.mark.parametrize("d,proj", [(64, None), (24, 40), (8, 5)], ids=["d64", "d24p40", "d8p5"])
def test_fused_head_and_feature_sizes(d, proj):
    """The vectorised softmax (P a multiple of 16) and its scalar tail (other P), D != d."""
    fq, fk = trained_maps(2, 2, d, proj=proj, seed=4)
    q, k, v = torch.randn(1, 2, 77, d), torch.randn(1, 2, 77, d), torch.randn(1, 2, 77, 12)
    with torch.no_grad():
        y, _ = fused_hedgehog_attention(q, k, v, fq, fk)
    torch.testing.assert_close(y.double(), reference(q, k, v, fq, fk)[0], rtol=2e-5, atol=2e-6)


@needs_kernel
def test_fused_stable_at_large_inputs_and_half_precision():
    fq, fk = trained_maps(2, 2, 16, seed=5)
    q, k, v = 1e3 * torch.randn(1, 2, 50, 16), 1e3 * torch.randn(1, 2, 50, 16), torch.randn(1, 2, 50, 8)
    with torch.no_grad():
        y, _ = fused_hedgehog_attention(q, k, v, fq, fk)
        assert torch.isfinite(y).all()
        torch.testing.assert_close(y.double(), reference(q, k, v, fq, fk)[0], rtol=1e-4, atol=1e-4)
        qb, kb, vb = (t.bfloat16() for t in (q / 1e3, k / 1e3, v))
        yb, _ = fused_hedgehog_attention(qb, kb, vb, fq, fk)
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.double(), reference(qb.float(), kb.float(), vb.float(), fq, fk)[0],
                               rtol=2e-2, atol=2e-2)


@needs_kernel
def test_feature_linear_attention_dispatch(monkeypatch):
    """No autograd on the CPU: the kernel serves and agrees with the PyTorch path; with autograd, or when
    disabled, the PyTorch path runs (and gradients flow)."""
    fq, fk = trained_maps(3, 3, 16, seed=6)
    q, k, v = torch.randn(2, 3, 90, 16), torch.randn(2, 3, 90, 16), torch.randn(2, 3, 90, 8)
    calls = spy_on_kernel(monkeypatch, "causal_forward")
    with torch.no_grad():
        fused = feature_linear_attention(q, k, v, fq, fk)
    assert calls == [1]
    monkeypatch.setenv("HEDGEHOG_CPU_KERNEL", "0")
    with torch.no_grad():
        plain = feature_linear_attention(q, k, v, fq, fk)
    assert calls == [1]
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    monkeypatch.delenv("HEDGEHOG_CPU_KERNEL")
    qg = q.clone().requires_grad_()
    y = feature_linear_attention(qg, k, v, fq, fk)
    assert calls == [1] and y.grad_fn is not None
    y.sum().backward()
    assert qg.grad is not None and torch.isfinite(qg.grad).all()


def test_unavailable_kernel_falls_back(monkeypatch):
    """A machine where the build fails: callers get None and feature_linear_attention the PyTorch path."""
    monkeypatch.setattr(cpu_kernel, "_tried", True)
    monkeypatch.setattr(cpu_kernel, "_module", None)
    fq, fk = trained_maps(2, 2, 8, seed=7)
    q, k, v = torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 4)
    with torch.no_grad():
        assert fused_hedgehog_attention(q, k, v, fq, fk) is None
        y = feature_linear_attention(q, k, v, fq, fk)
    torch.testing.assert_close(y.double(), reference(q, k, v, fq, fk)[0], rtol=2e-5, atol=2e-6)


def test_not_applicable_inputs():
    """Other maps, float64, CUDA-less autograd and empty sequences are left to the PyTorch path."""
    fq, fk = trained_maps(2, 2, 8)
    q, k, v = torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 4)
    elu = get_feature_map("elu", 8, 2)
    with torch.no_grad():
        assert not cpu_kernel.applicable(q, k, v, elu, elu)
        assert not cpu_kernel.applicable(q.double(), k.double(), v.double(), fq, fk)
        assert not cpu_kernel.applicable(q[:, :, :0], k[:, :, :0], v[:, :, :0], fq, fk)
    assert not cpu_kernel.applicable(q, k, v, fq, fk)  # the maps' parameters need gradients


def hybrid_reference(q, k, v, fq, fk, window, gamma, feature_scale=1.0):
    """float64 quadratic hybrid and the linear state of keys 0 .. N - w - 1 per key head."""
    from hedgehog.ops import quadratic_hybrid_attention

    rep = q.shape[1] // k.shape[1]
    with torch.no_grad():
        pq, pk = fq(q * feature_scale).double(), fk(k * feature_scale).double()
    y = quadratic_hybrid_attention(q.double(), k.double().repeat_interleave(rep, 1),
                                   v.double().repeat_interleave(rep, 1), pq, pk.repeat_interleave(rep, 1), window,
                                   torch.as_tensor(gamma).double())
    old = max(0, q.shape[2] - window)
    return y, (pk[:, :, :old].transpose(-1, -2) @ v[:, :, :old].double(), pk[:, :, :old].sum(2))


@needs_kernel
@pytest.mark.parametrize("n,window", [(1, 4), (7, 4), (C - 1, C), (C + 1, C), (100, 5), (300, 64), (300, 299),
                                      (70, 200), (600, 300)], ids=lambda x: str(x))
def test_fused_hybrid_matches_float64_reference(n, window):
    """Windows shorter and longer than the chunk and the feature block (256), longer than the sequence."""
    fq, fk = trained_maps(3, 3, 16, seed=8)
    q, k, v = 2 * torch.randn(2, 3, n, 16), 2 * torch.randn(2, 3, n, 16), torch.randn(2, 3, n, 8)
    gamma = torch.tensor([0.2, 0.5, 0.9])
    with torch.no_grad():
        y, (S, z) = cpu_kernel.fused_hybrid_attention(q, k, v, fq, fk, window, gamma)
    ref, (S_ref, z_ref) = hybrid_reference(q, k, v, fq, fk, window, gamma)
    assert_matches((y, S, z), (ref, S_ref, z_ref))


@needs_kernel
@pytest.mark.parametrize("b,h,hk", [(1, 6, 2), (1, 3, 1), (2, 4, 2)], ids=lambda x: str(x))
def test_fused_hybrid_grouped_heads_and_feature_scale(b, h, hk):
    fq, fk = trained_maps(h, hk, 16, seed=9)
    q, k, v = torch.randn(b, h, 150, 16), torch.randn(b, hk, 150, 16), torch.randn(b, hk, 150, 8)
    with torch.no_grad():
        y, (S, z) = cpu_kernel.fused_hybrid_attention(q, k, v, fq, fk, 40, 0.3, feature_scale=0.6)
    ref, (S_ref, z_ref) = hybrid_reference(q, k, v, fq, fk, 40, 0.3, feature_scale=0.6)
    assert_matches((y, S, z), (ref, S_ref, z_ref))


@needs_kernel
def test_feature_hybrid_attention_dispatch(monkeypatch):
    """The op takes the kernel without autograd and agrees with its PyTorch path; with gradients it does not."""
    from hedgehog.ops import feature_hybrid_attention

    fq, fk = trained_maps(2, 2, 16, seed=10)
    q, k, v = torch.randn(1, 2, 130, 16), torch.randn(1, 2, 130, 16), torch.randn(1, 2, 130, 8)
    calls = spy_on_kernel(monkeypatch, "hybrid_forward")
    with torch.no_grad():
        fused, (S, z) = feature_hybrid_attention(q, k, v, fq, fk, window=24, gamma=0.4, return_state=True)
        monkeypatch.setenv("HEDGEHOG_CPU_KERNEL", "0")
        plain, (S0, z0) = feature_hybrid_attention(q, k, v, fq, fk, window=24, gamma=0.4, return_state=True)
    assert calls == [1]
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(S, S0, rtol=1e-5, atol=1e-5)
    monkeypatch.delenv("HEDGEHOG_CPU_KERNEL")
    y = feature_hybrid_attention(q.requires_grad_(), k, v, fq, fk, window=24, gamma=0.4)
    assert calls == [1] and y.grad_fn is not None


PORTABLE_CHECK = r"""
import json, torch
from hedgehog.modules.feature_maps import get_feature_map
from hedgehog.ops import cpu_kernel, quadratic_hybrid_attention, quadratic_linear_attention
torch.manual_seed(0)
mod = cpu_kernel.load()
errs = []
for d, proj in ((16, None), (8, 5)):  # P = 16 (the vector width) and 5
    fq, fk = get_feature_map("hedgehog", d, 4), get_feature_map("hedgehog", d, 2)
    with torch.no_grad():
        for p in [*fq.parameters(), *fk.parameters()]:
            p.add_(0.3 * torch.randn_like(p))
    q, k, v = torch.randn(1, 4, 90, d), torch.randn(1, 2, 90, d), torch.randn(1, 2, 90, 6)
    with torch.no_grad():
        pq, pk = fq(q).double(), fk(k).double().repeat_interleave(2, 1)
        kr, vr = k.double().repeat_interleave(2, 1), v.double().repeat_interleave(2, 1)
        y, _ = cpu_kernel.fused_hedgehog_attention(q, k, v, fq, fk)
        errs.append((y.double() - quadratic_linear_attention(pq, pk, vr)).abs().max().item())
        y, _ = cpu_kernel.fused_hybrid_attention(q, k, v, fq, fk, 20, 0.4)
        ref = quadratic_hybrid_attention(q.double(), kr, vr, pq, pk, 20, torch.tensor(0.4, dtype=torch.float64))
        errs.append((y.double() - ref).abs().max().item())
print(json.dumps({"avx512": bool(mod.avx512), "errors": errs}))
"""


@needs_kernel
def test_portable_build_without_avx512(tmp_path):
    """The kernel's plain loops (machines without AVX-512): an x86-64-v3 (AVX2) build, in a fresh process."""
    import json
    import os
    import subprocess
    import sys

    if platform.machine() != "x86_64":
        pytest.skip("x86-64 only")
    env = {**os.environ, "HEDGEHOG_CPU_KERNEL_ARCH": "x86-64-v3"}
    out = subprocess.run([sys.executable, "-c", PORTABLE_CHECK], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["avx512"] is False
    assert len(res["errors"]) == 4 and max(res["errors"]) < 1e-5, res


@needs_kernel
def test_fused_maps_without_bias():
    fq, fk = (get_feature_map("hedgehog", 16, 2, bias=False) for _ in range(2))
    with torch.no_grad():
        for m in (fq, fk):
            m.weight.add_(0.3 * torch.randn(m.weight.shape))
    q, k, v = torch.randn(1, 2, 45, 16), torch.randn(1, 2, 45, 16), torch.randn(1, 2, 45, 8)
    with torch.no_grad():
        y, (S, z) = fused_hedgehog_attention(q, k, v, fq, fk)
        yh, _ = cpu_kernel.fused_hybrid_attention(q, k, v, fq, fk, 10, 0.5)
    ref, (S_ref, z_ref) = reference(q, k, v, fq, fk)
    assert_matches((y, S, z), (ref, S_ref, z_ref))
    torch.testing.assert_close(yh.double(), hybrid_reference(q, k, v, fq, fk, 10, 0.5)[0], rtol=2e-5, atol=2e-6)


# ---- the plain op on precomputed features ------------------------------------------------------------------

def _features(b, h, n, f, d, seed):
    g = torch.Generator().manual_seed(seed)
    pq = torch.rand(b, h, n, f, generator=g, dtype=torch.float64) + 0.01
    pk = torch.rand(b, h, n, f, generator=g, dtype=torch.float64) + 0.01
    return pq, pk, torch.randn(b, h, n, d, generator=g, dtype=torch.float64)


@needs_kernel
@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("f, d", [(10, 7), (128, 64)])
def test_plain_op_fused_matches_float64_reference(n, f, d, monkeypatch):
    """``linear_attention`` on precomputed float32 features, without autograd, is the fused kernel's; it
    matches the float64 quadratic form, and its state is exactly sum phi(k) v^T and sum phi(k)."""
    from hedgehog.ops import linear_attention

    calls = []
    real = cpu_kernel.fused_linear_attention
    monkeypatch.setattr(cpu_kernel, "fused_linear_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    pq, pk, v = _features(2, 3, n, f, d, n)
    with torch.no_grad():
        y, (S, z) = linear_attention(pq.float(), pk.float(), v.float(), return_state=True)
    assert calls and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), quadratic_linear_attention(pq, pk, v), rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(S.double(), pk.transpose(-1, -2) @ v, rtol=2e-5, atol=2e-4)
    torch.testing.assert_close(z.double(), pk.sum(2), rtol=2e-5, atol=2e-4)


@needs_kernel
def test_plain_op_fused_carries_state_and_leaves_autograd_alone():
    from hedgehog.ops import linear_attention

    pq, pk, v = _features(1, 2, 3 * C + 5, 12, 9, 1)
    ref = quadratic_linear_attention(pq, pk, v)
    cut = C + 3
    with torch.no_grad():
        _, st = linear_attention(pq[:, :, :cut].float(), pk[:, :, :cut].float(), v[:, :, :cut].float(),
                                 return_state=True)
        y2 = linear_attention(pq[:, :, cut:].float(), pk[:, :, cut:].float(), v[:, :, cut:].float(),
                              initial_state=st)
    torch.testing.assert_close(y2.double(), ref[:, :, cut:], rtol=2e-5, atol=2e-5)
    # inputs that need gradients: the PyTorch path (the kernel has no backward)
    q32 = pq.float().requires_grad_(True)
    assert cpu_kernel.fused_linear_attention(q32, pk.float(), v.float()) is None
    y = linear_attention(q32, pk.float(), v.float())
    y.sum().backward()
    assert q32.grad is not None and torch.isfinite(q32.grad).all()
    assert cpu_kernel.fused_linear_attention(pq, pk, v) is None  # float64: the reference path


@needs_kernel
def test_outputs_reuse_their_pages():
    """A freed output goes back to the kernel's cache and the next call of that size gets the same memory
    (no fresh pages to fault in, with no process-wide malloc setting)."""
    pq, pk, v = (t.float() for t in _features(1, 2, 4096, 16, 64, 2))
    with torch.no_grad():
        y = cpu_kernel.fused_linear_attention(pq, pk, v)[0]
        ptr = y.data_ptr()
        del y
        assert cpu_kernel.pool_bytes() >= 2 * 4096 * 64 * 4
        y2 = cpu_kernel.fused_linear_attention(pq, pk, v)[0]
    assert y2.data_ptr() == ptr
    y2.mul_(2).add_(1)  # an ordinary tensor to its user


@needs_kernel
@pytest.mark.parametrize("n, window", [(1, 4), (C - 1, 8), (C + 1, 8), (97, 64), (300, 5)])
def test_hybrid_op_on_precomputed_features_is_fused_and_exact(n, window, monkeypatch):
    """``hybrid_attention`` with given features, without autograd, takes the fused kernel and matches the
    float64 quadratic hybrid, including the state it hands to decoding."""
    from hedgehog.ops import hybrid_attention, quadratic_hybrid_attention

    calls = []
    real = cpu_kernel.fused_hybrid_features
    monkeypatch.setattr(cpu_kernel, "fused_hybrid_features", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    g = torch.Generator().manual_seed(n)
    B, H, d, F, D = 2, 3, 16, 10, 7
    q, k = (torch.randn(B, H, n, d, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, H, n, D, generator=g, dtype=torch.float64)
    pq, pk = (torch.rand(B, H, n, F, generator=g, dtype=torch.float64) + 0.01 for _ in range(2))
    gamma = torch.rand(H, generator=g, dtype=torch.float64)
    ref = quadratic_hybrid_attention(q, k, v, pq, pk, window=window, gamma=gamma)
    with torch.no_grad():
        y, ((S, z), kt, vt) = hybrid_attention(*(t.float() for t in (q, k, v, pq, pk)), window=window,
                                               gamma=gamma.float(), return_state=True)
    assert calls
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-5)
    old = max(0, n - window)
    torch.testing.assert_close(S.double(), pk[:, :, :old].transpose(-1, -2) @ v[:, :, :old], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z.double(), pk[:, :, :old].sum(2), rtol=1e-5, atol=1e-5)
    assert kt.shape[2] == min(n, window)
