"""The fla binding: chosen once, fla's exact calling convention (layout, state packing, the ones-column
normaliser), errors not swallowed. fla's Triton kernels do not run on a CPU, so here a pure-torch stand-in
with fla-core 0.6's signature and shape rules plays the kernel; on CUDA with fla installed the real one runs."""
import inspect

import pytest
import torch

from hedgehog.ops import backends, linear_attention, quadratic_linear_attention
from hedgehog.ops.backends import Backend, bind, check_fla_signature, fla_causal
from conftest import assert_tf32_kernel_matches, standin_chunk_linear_attn


def features(B, H, N, F, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, H, N, F, generator=g, dtype=torch.float64) + 0.05


def test_standin_has_fla_signature():
    assert list(inspect.signature(standin_chunk_linear_attn).parameters) == [
        "q", "k", "v", "scale", "initial_state", "output_final_state", "normalize", "cu_seqlens"]
    check_fla_signature(standin_chunk_linear_attn)


@pytest.mark.parametrize("D", [16, 33])  # 33: the ones column plus padding to a multiple of 16
def test_fla_call_matches_the_reference_and_carries_state(D):
    B, H, N, F = 2, 3, 37, 8
    q, k = features(B, H, N, F, 0), features(B, H, N, F, 1)
    v = torch.randn(B, H, N, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ref = quadratic_linear_attention(q, k, v)
    y, (S, z) = fla_causal(standin_chunk_linear_attn, q.float(), k.float(), v.float(), None, 1e-12)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(S.double(), k.transpose(-1, -2) @ v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z.double(), k.sum(2), rtol=1e-5, atol=1e-5)  # over time, not heads (fla#594)
    # two calls, the second on the first's state (fla#267: the key sum must be carried), equal one call
    cut = 20
    _, st = fla_causal(standin_chunk_linear_attn, q[:, :, :cut].float(), k[:, :, :cut].float(),
                       v[:, :, :cut].float(), None, 1e-12)
    y2, _ = fla_causal(standin_chunk_linear_attn, q[:, :, cut:].float(), k[:, :, cut:].float(),
                       v[:, :, cut:].float(), st, 1e-12)
    torch.testing.assert_close(y2.double(), ref[:, :, cut:], rtol=1e-5, atol=1e-5)


def test_feature_linear_attention_on_the_device_runs_in_pieces_without_autograd(monkeypatch):
    """With a device kernel bound (here fla's stand-in on CPU tensors), a call without autograd of at least two pieces
    runs piece by piece, the features asked for per piece, each piece from the state the last left: the output and
    state of one call and of the float64 reference. With trainable maps (autograd) it is one call."""
    import importlib

    from hedgehog.modules.feature_maps import get_feature_map
    from hedgehog.ops import feature_linear_attention

    la = importlib.import_module("hedgehog.ops.linear_attention")  # the module (the package exports the function)
    calls = []

    def fast(pq, pk, v, state, eps):
        calls.append(pq.shape[2])
        return fla_causal(standin_chunk_linear_attn, pq, pk, v, state, eps)

    monkeypatch.setattr(la, "_device_causal", lambda backend, x: fast)
    monkeypatch.setattr(Backend, "causal", lambda self, x: fast)  # what a whole call binds
    monkeypatch.setattr(la, "device_piece", lambda rows: 16)
    monkeypatch.setattr(la.cpu_kernel, "fused_hedgehog_attention", lambda *a, **kw: None)  # as on a GPU
    B, H, N, d, D = 2, 3, 53, 8, 5
    g = torch.Generator().manual_seed(5)
    q, k = (torch.randn(B, H, N, d, generator=g) for _ in range(2))
    v = torch.randn(B, H, N, D, generator=g)
    fq, fk = get_feature_map("hedgehog", d, H), get_feature_map("hedgehog", d, H)
    s0 = (torch.rand(B, H, 2 * d, D, generator=g), torch.rand(B, H, 2 * d, generator=g) + 1)
    with torch.no_grad():
        y, (S, z) = feature_linear_attention(q, k, v, fq, fk, initial_state=s0, return_state=True)
        pq, pk = fq(q).double(), fk(k).double()
    assert calls == [17, 18, 18]  # 53 tokens: three pieces of 16 to 31
    kv = pk.transpose(-1, -2) @ v.double()
    a = (pq @ pk.transpose(-1, -2)).tril()
    want = (a @ v.double() + pq @ s0[0].double()) / (a.sum(-1, keepdim=True) + pq @ s0[1].double().unsqueeze(-1))
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(S.double(), s0[0].double() + kv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z.double(), s0[1].double() + pk.sum(2), rtol=1e-5, atol=1e-5)
    calls.clear()
    y1 = feature_linear_attention(q, k, v, fq, fk, initial_state=s0)  # trainable maps: one call
    assert calls == [N] and y1.requires_grad
    torch.testing.assert_close(y1.detach().double(), want, rtol=1e-5, atol=1e-5)


def test_fewer_positions_than_heads_take_the_torch_path():
    q = features(1, 8, 3, 4, 0).float()
    assert fla_causal(standin_chunk_linear_attn, q, q, torch.randn(1, 8, 3, 5), None, 1e-6) is None


def test_bound_once_and_errors_propagate(monkeypatch):
    calls = []
    monkeypatch.setattr(backends, "_import_fla", lambda: calls.append(1) or standin_chunk_linear_attn)
    bind.cache_clear()
    try:
        a, b = bind("auto"), bind("auto")
        assert a is b and a.name == "fla" and calls == [1]  # imported and checked once, not per call
        x = torch.rand(1, 2, 8, 4)
        assert a.causal(x) is None  # CPU tensors: the torch path
        with pytest.raises(ValueError, match="CUDA"):
            bind("fla").causal(x)
        assert bind("torch").name == "torch"

        def broken(q, k, v, scale=None, initial_state=None, output_final_state=False, normalize=True):
            raise RuntimeError("kernel bug")

        with pytest.raises(RuntimeError, match="kernel bug"):  # not swallowed, no silent fallback
            fla_causal(broken, x, x, torch.rand(1, 2, 8, 3), None, 1e-6)
        monkeypatch.setattr(backends, "_import_fla", lambda: (lambda q, k, v, scale=None, head_first=True: None))
        bind.cache_clear()
        with pytest.raises(ImportError, match=r"lacks \['initial_state', 'output_final_state', 'normalize'\]"):
            bind("auto")
    finally:
        bind.cache_clear()


def test_the_attention_layer_binds_its_kernel_at_build():
    from conftest import tiny

    from hedgehog.layers.attention import hedgehog_layers
    from hedgehog.models.convert import convert_model

    model = convert_model(tiny("llama"))
    kernels = {id(layer.kernels) for layer in hedgehog_layers(model)}
    assert len(kernels) == 1 and isinstance(hedgehog_layers(model)[0].kernels, Backend)


@pytest.mark.gpu
@pytest.mark.skipif(not backends.is_fla_available(), reason="needs flash-linear-attention (fla-core)")
def test_real_fla_kernel_runs_on_cuda_and_matches(monkeypatch):
    ran = []
    real = bind("auto").fla
    b = Backend("fla", "auto", lambda *a, **kw: ran.append(1) or real(*a, **kw))
    q, k = features(2, 4, 300, 64, 0).float().cuda(), features(2, 4, 300, 64, 1).float().cuda()
    v = torch.randn(2, 4, 300, 64).cuda()
    y, st = linear_attention(q, k, v, backend=b, return_state=True)
    assert ran
    assert_tf32_kernel_matches(y, q, k, v)  # fla's matmuls run in TF32 for float32 inputs
    # the key sum is an fp32 accumulation of a ones column (exact in TF32): fp32 rounding over 300 keys
    torch.testing.assert_close(st[1], k.sum(2), rtol=1e-4, atol=1e-3)
