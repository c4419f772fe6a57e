"""Every op against the float64 quadratic reference: causal/non-causal, odd lengths, chunk
boundaries, states, gradients and half precision."""
import pytest
import torch

from hedgehog.ops import (
    feature_linear_attention,
    kernel_linear_attention,
    linear_attention,
    packed_recurrent_step,
    quadratic_linear_attention,
    recurrent_step,
    softmax_attention,
    softmax_attention_weights,
)
from hedgehog.modules.feature_maps import get_feature_map
from conftest import assert_tf32_kernel_matches, rand_features

LENGTHS = [1, 7, 63, 64, 65, 513]


def naive_loop(phi_q, phi_k, v, causal=True):
    """Transcription of the formula, one query at a time (float64)."""
    B, H, N, _ = phi_q.shape
    out = torch.zeros(B, H, N, v.shape[-1], dtype=torch.float64)
    for i in range(N):
        end = i + 1 if causal else N
        w = (phi_q[:, :, i:i + 1] @ phi_k[:, :, :end].transpose(-1, -2))  # (B,H,1,end)
        out[:, :, i] = ((w @ v[:, :, :end]) / w.sum(-1, keepdim=True)).squeeze(2)
    return out


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_quadratic_matches_naive_loop(causal):
    q, k = rand_features(2, 3, 20, 5), rand_features(2, 3, 20, 5)
    v = torch.randn(2, 3, 20, 4, dtype=torch.float64)
    y, w = quadratic_linear_attention(q, k, v, causal=causal, return_weights=True)
    torch.testing.assert_close(y, naive_loop(q, k, v, causal), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3, 20, dtype=torch.float64))
    if causal:
        assert torch.all(w.triu(1) == 0)


@pytest.mark.parametrize("n", LENGTHS, ids=lambda n: f"N{n}")
@pytest.mark.parametrize("chunk,block", [(64, None), (16, None), (5, None), (7, 21), (64, 128)],
                         ids=lambda x: str(x))
def test_chunked_equals_quadratic_causal(n, chunk, block):
    q, k = rand_features(2, 3, n, 8), rand_features(2, 3, n, 8)
    v = torch.randn(2, 3, n, 6, dtype=torch.float64)
    ref = quadratic_linear_attention(q, k, v, causal=True)
    out = linear_attention(q.clone().requires_grad_(), k, v, causal=True, chunk_size=chunk, block_size=block)
    torch.testing.assert_close(out.detach(), ref, rtol=1e-11, atol=1e-12)
    with torch.no_grad():  # the no-grad path builds the prefix differently
        torch.testing.assert_close(linear_attention(q, k, v, chunk_size=chunk, block_size=block), ref,
                                   rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("n", LENGTHS, ids=lambda n: f"N{n}")
def test_noncausal_equals_quadratic(n):
    q, k = rand_features(2, 2, n, 8), rand_features(2, 2, n, 8)
    v = torch.randn(2, 2, n, 3, dtype=torch.float64)
    torch.testing.assert_close(linear_attention(q, k, v, causal=False),
                               quadratic_linear_attention(q, k, v, causal=False), rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("n", [1, 7, 65], ids=lambda n: f"N{n}")
def test_recurrent_equals_quadratic(n):
    q, k = rand_features(2, 3, n, 8), rand_features(2, 3, n, 8)
    v = torch.randn(2, 3, n, 5, dtype=torch.float64)
    ref = quadratic_linear_attention(q, k, v, causal=True)
    state, outs = None, []
    for t in range(n):
        y, state = recurrent_step(q[:, :, t], k[:, :, t], v[:, :, t], state)
        outs.append(y)
    torch.testing.assert_close(torch.stack(outs, 2), ref, rtol=1e-11, atol=1e-12)
    # the final state is exactly sum phi(k) v^T and sum phi(k) (fla#267: key sum must be carried)
    torch.testing.assert_close(state[0], k.transpose(-1, -2) @ v)
    torch.testing.assert_close(state[1], k.sum(2))


def test_recurrent_step_accepts_seq_axis_and_keeps_input_state():
    q, k = rand_features(1, 2, 1, 4), rand_features(1, 2, 1, 4)
    v = torch.randn(1, 2, 1, 3, dtype=torch.float64)
    S0, z0 = torch.rand(1, 2, 4, 3, dtype=torch.float64), torch.rand(1, 2, 4, dtype=torch.float64)
    S_copy = S0.clone()
    y, (S, z) = recurrent_step(q, k, v, (S0, z0))
    assert y.shape == (1, 2, 1, 3)
    torch.testing.assert_close(S0, S_copy)
    torch.testing.assert_close(S, S0 + k[:, :, 0].unsqueeze(-1) * v[:, :, 0].unsqueeze(-2))


@pytest.mark.parametrize("split", [1, 50, 64, 99], ids=lambda s: f"split{s}")
@pytest.mark.parametrize("chunk", [16, 64], ids=lambda c: f"C{c}")
def test_prefill_state_then_continue_equals_one_pass(split, chunk):
    n = 100
    q, k = rand_features(2, 2, n, 8), rand_features(2, 2, n, 8)
    v = torch.randn(2, 2, n, 4, dtype=torch.float64)
    full = linear_attention(q, k, v, chunk_size=chunk)
    y1, st = linear_attention(q[:, :, :split], k[:, :, :split], v[:, :, :split], chunk_size=chunk, return_state=True)
    # continue with another chunked call ...
    y2 = linear_attention(q[:, :, split:], k[:, :, split:], v[:, :, split:], chunk_size=chunk, initial_state=st)
    torch.testing.assert_close(torch.cat([y1, y2], 2), full, rtol=1e-11, atol=1e-12)
    # ... and token by token with the recurrent step
    outs = []
    for t in range(split, n):
        y, st = recurrent_step(q[:, :, t], k[:, :, t], v[:, :, t], st)
        outs.append(y)
    torch.testing.assert_close(torch.stack(outs, 2), full[:, :, split:], rtol=1e-11, atol=1e-12)
    # the no-grad path (ones-augmented values, one [S, z] state) hands over the same state
    with torch.no_grad():
        y1n, stn = linear_attention(q[:, :, :split], k[:, :, :split], v[:, :, :split], chunk_size=chunk,
                                    return_state=True)
        y2n, (S, z) = linear_attention(q[:, :, split:], k[:, :, split:], v[:, :, split:], chunk_size=chunk,
                                       initial_state=stn, return_state=True)
    torch.testing.assert_close(torch.cat([y1n, y2n], 2), full, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(S, k.transpose(-1, -2) @ v, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(z, k.sum(2), rtol=1e-11, atol=1e-12)


def test_return_state_matches_closed_form():
    q, k = rand_features(1, 2, 37, 6), rand_features(1, 2, 37, 6)
    v = torch.randn(1, 2, 37, 3, dtype=torch.float64)
    _, (S, z) = linear_attention(q, k, v, chunk_size=8, return_state=True)
    torch.testing.assert_close(S, k.transpose(-1, -2) @ v)
    torch.testing.assert_close(z, k.sum(2))  # sum over time, not heads (fla#594)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_gradcheck_linear_attention(causal):
    q = rand_features(1, 2, 9, 3).requires_grad_()
    k = rand_features(1, 2, 9, 3).requires_grad_()
    v = torch.randn(1, 2, 9, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: linear_attention(a, b, c, causal=causal, chunk_size=4),
                                    (q, k, v))


def test_gradcheck_with_initial_state_and_recurrent():
    q, k = rand_features(1, 1, 6, 3).requires_grad_(), rand_features(1, 1, 6, 3).requires_grad_()
    v = torch.randn(1, 1, 6, 2, dtype=torch.float64, requires_grad=True)
    S = torch.rand(1, 1, 3, 2, dtype=torch.float64, requires_grad=True)
    z = torch.rand(1, 1, 3, dtype=torch.float64, requires_grad=True) + 0.1
    assert torch.autograd.gradcheck(
        lambda a, b, c, s, zz: linear_attention(a, b, c, chunk_size=4, initial_state=(s, zz)), (q, k, v, S, z))
    assert torch.autograd.gradcheck(
        lambda a, b, c, s, zz: recurrent_step(a[:, :, 0], b[:, :, 0], c[:, :, 0], (s, zz))[0], (q, k, v, S, z))


@pytest.mark.parametrize("n", [63, 130], ids=lambda n: f"N{n}")
def test_chunked_gradients_equal_quadratic_gradients(n):
    q, k = rand_features(2, 2, n, 8).requires_grad_(), rand_features(2, 2, n, 8).requires_grad_()
    v = torch.randn(2, 2, n, 4, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 2, n, 4, dtype=torch.float64)
    grads_ref = torch.autograd.grad((quadratic_linear_attention(q, k, v) * g).sum(), (q, k, v))
    grads = torch.autograd.grad((linear_attention(q, k, v, chunk_size=16, block_size=32) * g).sum(), (q, k, v))
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3), (torch.float32, 1e-5)],
                         ids=["bf16", "fp16", "fp32"])
def test_low_precision_within_tolerance(dtype, tol):
    """Inputs are rounded to `dtype`; everything after that is accumulated in fp32, so the error
    vs a float64 run on the *same rounded inputs* is fp32-level, and vs the unrounded inputs it is
    bounded by the input rounding (the stated tolerance)."""
    q, k = rand_features(2, 2, 200, 16), rand_features(2, 2, 200, 16)
    v = torch.randn(2, 2, 200, 8, dtype=torch.float64)
    qd, kd, vd = q.to(dtype), k.to(dtype), v.to(dtype)
    y, (S, z) = linear_attention(qd, kd, vd, return_state=True)
    assert y.dtype == dtype and S.dtype == torch.float32 and z.dtype == torch.float32
    assert torch.isfinite(y.float()).all()
    ref_same_inputs = quadratic_linear_attention(qd.double(), kd.double(), vd.double())
    ref_exact = quadratic_linear_attention(q, k, v)
    assert (y.double() - ref_same_inputs).abs().max() <= max(tol / 4, 2 * torch.finfo(dtype).eps)
    assert (y.double() - ref_exact).abs().max() <= tol
    yr, _ = recurrent_step(qd[:, :, 0], kd[:, :, 0], vd[:, :, 0])
    assert yr.dtype == dtype


def test_denominator_guard_gives_zero_not_nan():
    q = torch.zeros(1, 1, 5, 4)  # e.g. ReLU features of an all-negative query
    k = torch.rand(1, 1, 5, 4)
    v = torch.randn(1, 1, 5, 3)
    for y in (linear_attention(q, k, v), linear_attention(q, k, v, causal=False),
              quadratic_linear_attention(q, k, v), recurrent_step(q[:, :, 0], k[:, :, 0], v[:, :, 0])[0]):
        assert torch.isfinite(y).all() and torch.all(y == 0)


def test_large_length_stays_finite_and_exact():
    q, k = rand_features(1, 1, 3000, 4, dtype=torch.float32), rand_features(1, 1, 3000, 4, dtype=torch.float32)
    v = torch.randn(1, 1, 3000, 2)
    ref = quadratic_linear_attention(q.double(), k.double(), v.double())
    assert (linear_attention(q, k, v).double() - ref).abs().max() < 1e-5


@pytest.mark.parametrize("name", ["hedgehog", "cosformer"])
def test_feature_linear_attention_equals_unfused(name):
    n = 150
    fq, fk = get_feature_map(name, 8, 2).double(), get_feature_map(name, 8, 2).double()
    if name == "hedgehog":
        with torch.no_grad():
            for fm in (fq, fk):
                fm.weight.add_(0.3 * torch.randn_like(fm.weight))
                fm.bias.add_(0.3 * torch.randn_like(fm.bias))
    q, k = torch.randn(2, 2, n, 8, dtype=torch.float64), torch.randn(2, 2, n, 8, dtype=torch.float64)
    v = torch.randn(2, 2, n, 4, dtype=torch.float64)
    ref = quadratic_linear_attention(fq(q), fk(k), v)
    out, st = feature_linear_attention(q, k, v, fq, fk, chunk_size=16, block_size=48, return_state=True)
    torch.testing.assert_close(out, ref, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(st[1], fk(k).sum(2))
    # gradients reach the feature-map parameters
    if name == "hedgehog":
        feature_linear_attention(q, k, v, fq, fk, chunk_size=16).sum().backward()
        assert fq.weight.grad is not None and fq.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("nq", [9, 5], ids=["square", "last-queries"])
def test_kernel_form_equals_features_taylor(causal, nq):
    """Taylor through its closed-form kernel = the same linear attention through its features (values, grads)."""
    fm = get_feature_map("taylor", 6, 2).double()
    q = torch.randn(2, 2, nq, 6, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 9, 6, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 9, 3, dtype=torch.float64, requires_grad=True)
    got = kernel_linear_attention(fm.kernel(q, k), v, causal=causal)
    want = quadratic_linear_attention(fm(q), fm(k), v, causal=causal)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    if causal and nq == 9:  # the first row sees one key: its output is that key's value
        torch.testing.assert_close(got[:, :, 0], v[:, :, 0].detach())
    g = torch.randn_like(got)
    ga = torch.autograd.grad((got * g).sum(), (q, k, v))
    gb = torch.autograd.grad((want * g).sum(), (q, k, v))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)
    with pytest.raises(ValueError, match="kernel matrix"):
        kernel_linear_attention(fm.kernel(q, k), v[:, :, :8])


def test_softmax_reference():
    q, k, v = (torch.randn(1, 2, 9, 4, dtype=torch.float64) for _ in range(3))
    w = softmax_attention_weights(q, k, causal=True)
    s = (q @ k.transpose(-1, -2)) / 2.0
    s = s.masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(w, torch.softmax(s, -1))
    torch.testing.assert_close(softmax_attention(q, k, v), w @ v)


@pytest.mark.parametrize("bad", [
    dict(q=(2, 10, 4), k=(2, 10, 4), v=(2, 10, 3)),
    dict(q=(1, 2, 10, 4), k=(1, 3, 10, 4), v=(1, 2, 10, 3)),
    dict(q=(1, 2, 10, 4), k=(1, 2, 10, 5), v=(1, 2, 10, 3)),
    dict(q=(1, 2, 10, 4), k=(1, 2, 10, 4), v=(1, 2, 9, 3)),
], ids=["3d", "heads", "featdim", "seq"])
def test_shape_errors_name_the_problem(bad):
    with pytest.raises(ValueError, match=r"phi_q|phi_k|batch|feature|positions|shape"):
        linear_attention(torch.rand(*bad["q"]), torch.rand(*bad["k"]), torch.rand(*bad["v"]))


def test_bad_state_and_chunk_errors():
    q = k = torch.rand(1, 2, 10, 4)
    v = torch.rand(1, 2, 10, 3)
    with pytest.raises(ValueError, match="state shapes"):
        linear_attention(q, k, v, initial_state=(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4)))
    with pytest.raises(ValueError, match="chunk_size"):
        linear_attention(q, k, v, chunk_size=0)
    with pytest.raises(ValueError, match="only meaningful for causal"):
        linear_attention(q, k, v, causal=False, initial_state=(torch.zeros(1, 2, 4, 3), torch.zeros(1, 2, 4)))
    with pytest.raises(ValueError, match="one token"):
        recurrent_step(q, k, v)
    with pytest.raises(ValueError, match="backend"):
        linear_attention(q, k, v, backend="cuda-magic")
    from hedgehog.ops import backends

    if backends.is_fla_available():  # CPU tensors: fla needs CUDA
        with pytest.raises(ValueError, match="CUDA"):
            linear_attention(q, k, v, backend="fla")
    else:  # asked for by name and missing: said at bind time
        with pytest.raises(ImportError, match="pip install flash-linear-attention"):
            linear_attention(q, k, v, backend="fla")


def _tf32(x):
    """float32 rounded to TF32's 10 explicit mantissa bits (round to nearest), as a tensor core reads it."""
    i = x.float().contiguous().view(torch.int32)
    return ((i + 0x1000) & ~0x1FFF).view(torch.float32)


def test_the_tf32_bound_passes_tf32_rounding_and_fails_an_off_by_one():
    """The GPU tests' tolerance, checked here: attention of TF32-rounded inputs (what the kernel's matmuls see)
    is within it, and the right formula shifted by one key is not."""
    q, k = rand_features(2, 4, 300, 64, dtype=torch.float32), rand_features(2, 4, 300, 64, dtype=torch.float32)
    v = torch.randn(2, 4, 300, 64)
    assert (_tf32(v) != v).any() and (_tf32(v) - v).abs().max() <= 2.0 ** -11 * v.abs().max()
    y = quadratic_linear_attention(_tf32(q), _tf32(k), _tf32(v))
    assert_tf32_kernel_matches(y, q, k, v)
    wrong = torch.cat([v[:, :, :1], quadratic_linear_attention(q[:, :, 1:], k[:, :, :-1], v[:, :, :-1])], 2)
    with pytest.raises(AssertionError, match="above the TF32 bound"):
        assert_tf32_kernel_matches(wrong, q, k, v)


@pytest.mark.gpu
def test_gpu_paths_match_reference():
    dev = "cuda"
    q, k = rand_features(2, 4, 300, 64, dtype=torch.float32), rand_features(2, 4, 300, 64, dtype=torch.float32)
    v = torch.randn(2, 4, 300, 64)
    ref = quadratic_linear_attention(q.double(), k.double(), v.double())
    torch.backends.cuda.matmul.allow_tf32 = False  # PyTorch's default: the torch path is plain float32
    y, st = linear_attention(q.to(dev), k.to(dev), v.to(dev), backend="torch", return_state=True)
    assert (y.double().cpu() - ref).abs().max() < 1e-4  # fp32 rounding over 300 keys, ~1e-6 relative
    torch.testing.assert_close(st[1].cpu(), k.sum(2), rtol=1e-4, atol=1e-3)
    # "auto" takes fla's kernel where installed, whose matmuls run in TF32 for float32 inputs
    y, st = linear_attention(q.to(dev), k.to(dev), v.to(dev), backend="auto", return_state=True)
    assert_tf32_kernel_matches(y, q, k, v)
    torch.testing.assert_close(st[1].cpu(), k.sum(2), rtol=1e-4, atol=1e-3)
    # bf16 inputs: 7 explicit mantissa bits (unit roundoff 2^-8), inputs and outputs rounded
    yb = linear_attention(q.to(dev, torch.bfloat16), k.to(dev, torch.bfloat16), v.to(dev, torch.bfloat16))
    assert (yb.double().cpu() - ref).abs().max() < 8 * 2.0 ** -8 * v.abs().max().item()


def grouped_heads_case(B=2, Hq=6, Hk=2, n=9, F=5, D=3):
    """Features for Hq query heads and Hk key heads (GQA) and the quadratic reference with k/v repeated."""
    q = rand_features(B, Hq, n, F)
    k = rand_features(B, Hk, n, F)
    v = torch.randn(B, Hk, n, D, dtype=torch.float64)
    ref = quadratic_linear_attention(q, k.repeat_interleave(Hq // Hk, 1), v.repeat_interleave(Hq // Hk, 1))
    return q, k, v, ref


def test_recurrent_step_grouped_heads_equals_repeated_and_inplace():
    q, k, v, ref = grouped_heads_case()
    (B, Hk, n, F), D = k.shape, v.shape[-1]
    st, st_inplace, outs, outs2 = None, None, [], []
    for t in range(n):
        y, st = recurrent_step(q[:, :, t], k[:, :, t], v[:, :, t], st)
        y2, st_inplace = recurrent_step(q[:, :, t], k[:, :, t], v[:, :, t], st_inplace, inplace=True)
        outs.append(y)
        outs2.append(y2)
    torch.testing.assert_close(torch.stack(outs, 2), ref, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(torch.stack(outs2, 2), ref, rtol=1e-11, atol=1e-12)
    assert st[0].shape == (B, Hk, F, D)  # state per key head, not per query head
    with pytest.raises(ValueError, match="divide"):
        recurrent_step(q[:, :5, 0], k[:, :, 0], v[:, :, 0])


def test_packed_recurrent_step_equals_quadratic_with_grouped_heads():
    """The decoding loop's packed [S, z] state: same outputs as the quadratic reference, state in place."""
    q, k, v, ref = grouped_heads_case()
    (B, Hk, n, F), D = k.shape, v.shape[-1]
    Sz = torch.zeros(B, Hk, F, D + 1, dtype=torch.float64)
    ptr = Sz.data_ptr()
    outs = [packed_recurrent_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], Sz) for t in range(n)]
    torch.testing.assert_close(torch.cat(outs, 2), ref, rtol=1e-11, atol=1e-12)
    assert Sz.data_ptr() == ptr  # updated in place, no growth
    torch.testing.assert_close(Sz[..., :D], k.transpose(-1, -2) @ v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(Sz[..., D], k.sum(2), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="do not fit"):
        packed_recurrent_step(q[:, :, :1], k[:, :, :1], v[:, :, :1, :2], Sz)


def test_device_pieces_cover_the_call_without_a_short_tail():
    """piece_bounds: consecutive pieces from 0 to n, each of piece to 2 * piece - 1 tokens (one piece below that);
    device_piece: 65,536 rows of batch x heads per piece, never under MIN_PIECE tokens."""
    from hedgehog.ops.chunked import MIN_PIECE, device_piece, piece_bounds

    for piece in (1, 7, 16):
        for n in range(1, 120):
            b = piece_bounds(n, piece)
            assert b[0][0] == 0 and b[-1][1] == n and all(x[1] == y[0] for x, y in zip(b, b[1:]))
            lengths = [e - s for s, e in b]
            assert lengths == [n] if n < piece else all(piece <= L < 2 * piece for L in lengths), (n, piece, b)
    assert device_piece(8) == 8192 and device_piece(1) == 65536 and device_piece(4096) == MIN_PIECE == 1024
