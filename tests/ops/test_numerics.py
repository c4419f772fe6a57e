"""Half precision at long context: every feature map, and the hybrid, forward and backward in bf16 and fp16
at 64k tokens, with q/k of std 1 and of std 8 (far above unit scale), stay finite. The safe ranges are in docs/DESIGN.md ("Numerics")."""
import pytest
import torch

from hedgehog.modules.feature_maps import available_feature_maps, get_feature_map
from hedgehog.ops import feature_hybrid_attention, feature_linear_attention

N, D, H = 65536, 16, 1


def _inputs(dtype, scale, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(1, H, N, D, generator=g) * scale for _ in range(2))
    v = torch.randn(1, H, N, D, generator=g)
    return [t.to(dtype).requires_grad_(True) for t in (q, k, v)]


def _finite(*ts):
    return all(bool(torch.isfinite(t.float()).all()) for t in ts)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [1.0, 8.0])
@pytest.mark.parametrize("name", available_feature_maps())
def test_every_map_is_finite_at_64k_in_half_precision(name, scale, dtype):
    torch.manual_seed(0)
    fm_q = get_feature_map(name, D, H, max_len=N) if name == "cosformer" else get_feature_map(name, D, H)
    fm_k = get_feature_map(name, D, H, max_len=N) if name == "cosformer" else get_feature_map(name, D, H)
    q, k, v = _inputs(dtype, scale)
    y = feature_linear_attention(q, k, v, fm_q, fm_k)
    assert y.dtype == dtype and _finite(y), f"{name}: non-finite output"
    (y.float() * torch.randn_like(y, dtype=torch.float32)).sum().backward()
    assert _finite(q.grad, k.grad, v.grad), f"{name}: non-finite gradient"
    assert _finite(*(p.grad for p in fm_q.parameters()), *(p.grad for p in fm_k.parameters()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [1.0, 8.0])
def test_hybrid_is_finite_at_64k_in_half_precision(scale, dtype):
    torch.manual_seed(0)
    fm_q, fm_k = get_feature_map("hedgehog", D, H), get_feature_map("hedgehog", D, H)
    q, k, v = _inputs(dtype, scale)
    y = feature_hybrid_attention(q, k, v, fm_q, fm_k, window=64, scale=D ** -0.5)
    assert y.dtype == dtype and _finite(y)
    (y.float() * torch.randn_like(y, dtype=torch.float32)).sum().backward()
    assert _finite(q.grad, k.grad, v.grad, *(p.grad for p in fm_q.parameters()))
