"""The hybrid's exact window part as a Triton kernel (hedgehog.ops.triton_window), run by Triton's CPU interpreter
against float64 references: the kernel's own (num, den) and its gradients (the row max's gradient included), the
hybrid and the window baseline through it, sinks and a decayed state. Triton reads TRITON_INTERPRET when a kernel
is defined, so each check runs in a fresh interpreter with it set; speed needs a GPU (`make test-gpu`)."""
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

PRELUDE = """
import torch
from hedgehog.ops import triton_window as tw
assert tw.serves(torch.zeros(1)), "the interpreter should be on"

def rel(a, b):
    return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
"""


def run(code: str) -> str:
    env = {**os.environ, "TRITON_INTERPRET": "1", "HEDGEHOG_CPU_KERNEL": "0"}
    proc = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_kernel_equals_the_float64_reference_with_the_row_max_gradient():
    out = run("""
    def ref(q, k, v, w, sinks, scale):
        n = q.shape[1]
        r, c = torch.arange(n)[:, None], torch.arange(n)[None, :]
        vis = (c <= r) & (((r - c) < w) | (c < sinks))
        s = (q @ k.transpose(-1, -2) * scale).masked_fill(~vis, float("-inf"))
        p = torch.exp(s - s.amax(-1, keepdim=True))
        return p @ v, p.sum(-1)

    torch.manual_seed(0)
    # odd lengths, windows below / at / above the block (32), sinks reached by the sink step or by the window
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
    print("ok")
    """)
    assert out.strip().endswith("ok")


@pytest.mark.gpu
def test_kernel_on_cuda_matches_the_float64_reference():
    """The compiled kernel on a GPU. Its float32 dots run in TF32 (10 explicit mantissa bits): scores carry
    ~2^-11 relative error, so weights exp(s - m) ~1e-3 relative at |s| ~ 1; the bound 1e-2 holds that with room
    and still fails a wrong mask or a missing term (O(1))."""
    import torch

    from hedgehog.ops import triton_window as tw

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.manual_seed(0)
    n, w, sinks, d = 300, 64, 4, 64
    q, k, v = (torch.randn(4, n, d, dtype=torch.float64) for _ in range(3))
    r, c = torch.arange(n)[:, None], torch.arange(n)[None, :]
    vis = (c <= r) & (((r - c) < w) | (c < sinks))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    s = (leaves[0] @ leaves[1].transpose(-1, -2) / 8).masked_fill(~vis, float("-inf"))
    p = torch.exp(s - s.amax(-1, keepdim=True))
    num, den = p @ leaves[2], p.sum(-1)
    gn, gd = torch.randn_like(num), torch.randn_like(den)
    want = torch.autograd.grad((num * gn).sum() + (den * gd).sum(), leaves)
    cuda = [t.float().cuda().requires_grad_() for t in (q, k, v)]
    num2, den2 = tw.window_num_den(*cuda, w, 1 / 8, sinks)
    got = torch.autograd.grad((num2 * gn.float().cuda()).sum() + (den2 * gd.float().cuda()).sum(), cuda)
    rel = lambda a, b: ((a.double().cpu() - b).abs().max() / b.abs().max()).item()
    assert rel(num2, num) < 1e-2 and rel(den2, den) < 1e-2
    assert max(rel(a, b) for a, b in zip(got, want)) < 1e-2
