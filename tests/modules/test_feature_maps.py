import math

import pytest
import torch

from hedgehog.modules.feature_maps import available_feature_maps, get_feature_map, hedgehog_pair_features
from hedgehog.ops import feature_linear_attention, quadratic_linear_attention

ALL = ["hedgehog", "hedgehog_exp", "elu", "relu", "performer", "cosformer", "t2r", "taylor"]


def test_registry_has_every_map_and_errors_list_names():
    assert set(ALL) <= set(available_feature_maps())
    with pytest.raises(KeyError) as e:
        get_feature_map("softmaxx", 8, 2)
    for name in ALL:
        assert name in str(e.value)


@pytest.mark.parametrize("name", ALL)
def test_shapes_positivity_and_finite(name):
    d, h = 8, 3
    fm = get_feature_map(name, d, h)
    x = torch.randn(2, h, 11, d) * 3
    phi = fm(x)
    assert phi.shape == (2, h, 11, fm.feature_dim)
    assert torch.isfinite(phi).all()
    if name == "taylor":  # features can be negative; the kernel 1 + s + s^2/2 cannot
        assert ((phi @ phi.transpose(-1, -2)) > 0).all()
    else:
        assert (phi >= 0).all(), name
    with pytest.raises(ValueError, match="expects"):
        fm(torch.randn(2, h + 1, 11, d))


@pytest.mark.parametrize("name", ["hedgehog", "hedgehog_exp"])
def test_hedgehog_identity_init_and_large_inputs(name):
    d, h = 16, 4
    fm = get_feature_map(name, d, h)
    assert fm.feature_dim == 2 * d
    assert torch.equal(fm.weight, torch.eye(d).expand(h, d, d))
    assert torch.equal(fm.bias, torch.zeros(h, d))
    x = torch.randn(2, h, 5, d)
    phi = fm(x)
    if name == "hedgehog":  # identity init: [softmax(x), softmax(-x)] exactly
        torch.testing.assert_close(phi, torch.cat([x.softmax(-1), (-x).softmax(-1)], -1))
        torch.testing.assert_close(phi[..., :d].sum(-1), torch.ones(2, h, 5))
    else:  # exp map up to a per-token scale
        ratio = phi / torch.cat([x.exp(), (-x).exp()], -1)
        torch.testing.assert_close(ratio, ratio[..., :1].expand_as(ratio))
    big = fm(torch.randn(2, h, 5, d) * 1e3)
    assert torch.isfinite(big).all() and big.max() <= 1.0 + 1e-6 and big.sum(-1).min() > 0
    half = fm(x.to(torch.bfloat16))
    assert torch.isfinite(half).all()


def test_hedgehog_is_per_head_and_trainable():
    fm = get_feature_map("hedgehog", 4, 2)
    with torch.no_grad():
        fm.weight[1].mul_(3.0)
    x = torch.randn(1, 2, 6, 4)
    phi = fm(x)
    torch.testing.assert_close(phi[:, 0], torch.cat([x[:, 0].softmax(-1), (-x[:, 0]).softmax(-1)], -1))
    torch.testing.assert_close(phi[:, 1], torch.cat([(3 * x[:, 1]).softmax(-1), (-3 * x[:, 1]).softmax(-1)], -1))
    phi.sum().backward()
    assert fm.weight.grad is not None and fm.bias.grad is not None
    assert [n for n, p in fm.named_parameters()] == ["weight", "bias"]


def test_hedgehog_batch_with_bias_matches_loop():
    fm = get_feature_map("hedgehog", 4, 3)
    with torch.no_grad():
        fm.bias.normal_()
        fm.weight.add_(torch.randn_like(fm.weight))
    x = torch.randn(2, 3, 7, 4)
    u = torch.einsum("bhnd,hdf->bhnf", x, fm.weight) + fm.bias[None, :, None]
    torch.testing.assert_close(fm(x), torch.cat([u.softmax(-1), (-u).softmax(-1)], -1))


def test_taylor_identity_exact():
    d = 6
    fm = get_feature_map("taylor", d, 2, scale=1.0).double()
    q, k = torch.randn(1, 2, 5, d, dtype=torch.float64), torch.randn(1, 2, 7, d, dtype=torch.float64)
    s = q @ k.transpose(-1, -2)
    torch.testing.assert_close(fm(q) @ fm(k).transpose(-1, -2), 1 + s + s ** 2 / 2)
    fm_scaled = get_feature_map("taylor", d, 2).double()  # default scale d^-1/2
    s = s / math.sqrt(d)
    torch.testing.assert_close(fm_scaled(q) @ fm_scaled(k).transpose(-1, -2), 1 + s + s ** 2 / 2)
    assert fm.feature_dim == 1 + d + d * (d + 1) // 2
    # the closed-form kernel is the same matrix, for both scales
    torch.testing.assert_close(fm.kernel(q, k), fm(q) @ fm(k).transpose(-1, -2))
    torch.testing.assert_close(fm_scaled.kernel(q, k), fm_scaled(q) @ fm_scaled(k).transpose(-1, -2))
    with pytest.raises(ValueError, match="expects"):
        fm.kernel(q, k[..., :3])


def test_taylor_projected_identity_and_no_kernel():
    """feature_dim p: a trainable per-head (d, p) projection first, then the exact Taylor features of p dims."""
    d, p = 8, 3
    fq = get_feature_map("taylor", d, 2, feature_dim=p).double()
    fk = get_feature_map("taylor", d, 2, feature_dim=p).double()
    assert fq.feature_dim == 1 + p + p * (p + 1) // 2 == 10 and fq.weight.shape == (2, d, p) and fq.trainable
    assert not torch.equal(fq.weight, fk.weight) and not fq.has_kernel
    q, k = torch.randn(1, 2, 5, d, dtype=torch.float64), torch.randn(1, 2, 7, d, dtype=torch.float64)
    pq, pk = torch.einsum("bhnd,hdp->bhnp", q, fq.weight), torch.einsum("bhnd,hdp->bhnp", k, fk.weight)
    s = pq @ pk.transpose(-1, -2) / math.sqrt(p)
    torch.testing.assert_close(fq(q) @ fk(k).transpose(-1, -2), 1 + s + s ** 2 / 2)
    (fq(q).sum() + fk(k).sum()).backward()
    assert fq.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="goes through its features"):
        fq.kernel(q, k)
    assert get_feature_map("taylor", d, 2, feature_dim=d).has_kernel  # p = d: the plain map


def test_performer_approximates_softmax_kernel_and_redraws():
    d, m = 8, 16384
    fm = get_feature_map("performer", d, 1, num_features=m, seed=0).double()
    # positive random features are unbiased but heavy-tailed (relative variance ~ exp(|q'+k'|^2)),
    # so test at small norms where m=16384 features give a few percent
    q, k = torch.randn(1, 1, 4, d, dtype=torch.float64) * 0.25, torch.randn(1, 1, 4, d, dtype=torch.float64) * 0.25
    est = fm(q) @ fm(k).transpose(-1, -2)
    exact = torch.exp(q @ k.transpose(-1, -2) / math.sqrt(d))
    assert ((est - exact).abs() / exact).max() < 0.08
    before = fm.projection.clone()
    fm.redraw()
    assert not torch.equal(before, fm.projection)
    fm2 = get_feature_map("performer", d, 1, redraw_every=2).train()
    p0 = fm2.projection.clone()
    for _ in range(3):
        fm2(torch.randn(1, 1, 3, d))
    assert not torch.equal(p0, fm2.projection)
    assert "projection" in fm2.state_dict()


def test_performer_projection_rows_orthogonal_within_block():
    fm = get_feature_map("performer", 8, 2, seed=1)
    w = fm.projection[0].T  # (m, d)
    w = w / w.norm(dim=1, keepdim=True)
    torch.testing.assert_close(w @ w.T, torch.eye(8), atol=1e-5, rtol=0)


def test_cosformer_reweighting_and_positions():
    d = 4
    fm = get_feature_map("cosformer", d, 1).double()
    q, k = torch.randn(1, 1, 6, d, dtype=torch.float64), torch.randn(1, 1, 6, d, dtype=torch.float64)
    got = fm(q) @ fm(k).transpose(-1, -2)
    i = torch.arange(6, dtype=torch.float64)
    cos = torch.cos(math.pi / 2 * (i[:, None] - i[None, :]) / 6)
    torch.testing.assert_close(got[0, 0], (q.relu() @ k.relu().transpose(-1, -2))[0, 0] * cos)
    # positions shift both by the same offset: weights unchanged; explicit max_len is blockwise
    fm_fixed = get_feature_map("cosformer", d, 1, max_len=100).double()
    assert fm_fixed.blockwise and not fm.blockwise
    a = fm_fixed(q, torch.arange(6)) @ fm_fixed(k, torch.arange(6)).transpose(-1, -2)
    b = fm_fixed(q, torch.arange(10, 16)) @ fm_fixed(k, torch.arange(10, 16)).transpose(-1, -2)
    torch.testing.assert_close(a, b)
    bpos = fm_fixed(q.expand(2, 1, 6, d), torch.stack([torch.arange(6), torch.arange(10, 16)]))
    torch.testing.assert_close(bpos[1:], fm_fixed(q, torch.arange(10, 16)))


def test_t2r_and_relu_zero_rows_are_safe():
    fm = get_feature_map("relu", 4, 1)
    x = -torch.rand(1, 1, 5, 4)  # all negative: zero features
    y = quadratic_linear_attention(fm(x), fm(x), torch.randn(1, 1, 5, 2))
    assert torch.isfinite(y).all()
    t2r = get_feature_map("t2r", 4, 2, feature_dim=6)
    assert t2r(torch.randn(1, 2, 3, 4)).shape == (1, 2, 3, 6)


@pytest.mark.parametrize("name", ALL)
def test_every_map_runs_through_the_fused_op(name):
    fq, fk = get_feature_map(name, 8, 2, **({"seed": 0} if name == "performer" else {})), None
    fk = fq
    q, k, v = torch.randn(1, 2, 70, 8), torch.randn(1, 2, 70, 8), torch.randn(1, 2, 70, 4)
    ref = quadratic_linear_attention(fq(q).double(), fk(k).double(), v.double())
    out = feature_linear_attention(q, k, v, fq, fk, chunk_size=16, block_size=32)
    assert (out.double() - ref).abs().max() < 1e-4


def test_hedgehog_cached_signed_weights_follow_parameter_updates():
    fm = get_feature_map("hedgehog", 4, 2)
    x = torch.randn(1, 2, 3, 4)
    with torch.no_grad():
        a = fm(x)
        fm.weight.mul_(2.0)  # in-place update bumps the version counter: the cache must refresh
        b = fm(x)
    u = 2 * x
    torch.testing.assert_close(b, torch.cat([u.softmax(-1), (-u).softmax(-1)], -1))
    assert not torch.allclose(a, b)
    fm.load_state_dict({"weight": torch.eye(4).repeat(2, 1, 1), "bias": torch.ones(2, 4)})
    with torch.no_grad():
        c = fm(x)
    torch.testing.assert_close(c, torch.cat([(x + 1).softmax(-1), (-(x + 1)).softmax(-1)], -1))


def test_hedgehog_pair_features_equal_the_two_maps_and_follow_parameter_updates():
    """The decoding fast path (both maps of a layer in one matmul) equals calling the maps, also after
    the maps' parameters change in place (its stacked-weight cache must notice)."""
    fq, fk = get_feature_map("hedgehog", 8, 6), get_feature_map("hedgehog", 8, 2)
    q, k = torch.randn(1, 6, 1, 8), torch.randn(1, 2, 1, 8)
    with torch.no_grad():
        for step in range(2):
            for p in list(fq.parameters()) + list(fk.parameters()):
                p.add_(0.3 * torch.randn_like(p))
            pq, pk = hedgehog_pair_features(fq, fk, q, k)
            torch.testing.assert_close(pq, fq(q))
            torch.testing.assert_close(pk, fk(k))
        assert hedgehog_pair_features(fq, fk, torch.randn(2, 6, 1, 8), torch.randn(2, 2, 1, 8)) is None  # B > 1
    assert hedgehog_pair_features(fq, fk, q, k) is None  # autograd: the maps' own forward


@pytest.mark.parametrize("name", ["hedgehog", "hedgehog_exp", "t2r"])
def test_wide_maps_start_with_distinct_columns(name):
    """feature_dim > head_dim: identity first, then random columns; no two columns are clones.

    Equal columns see equal inputs and get equal gradients (the maps are symmetric in their columns),
    so clones (e.g. zero-initialised extra columns) would stay clones through training: check that the
    extra columns get different gradients after one backward.
    """
    d, p = 4, 12
    torch.manual_seed(0)
    fm = get_feature_map(name, d, 2, feature_dim=p)
    assert fm.feature_dim == (p if name == "t2r" else 2 * p)
    torch.testing.assert_close(fm.weight[:, :, :d], torch.eye(d).repeat(2, 1, 1))
    extra = fm.weight[:, :, d:].detach()
    assert extra.abs().min() > 0 and torch.cdist(extra.transpose(1, 2), extra.transpose(1, 2)).add(
        torch.eye(p - d) * 1e9).min() > 1e-3  # pairwise distinct
    x = torch.randn(1, 2, 9, d)
    (fm(x) * torch.randn(1, 2, 9, fm.feature_dim)).sum().backward()
    g = fm.weight.grad[:, :, d:]
    assert (g[:, :, 1:] - g[:, :, :1]).abs().amax() > 1e-6  # different columns move differently


def test_feature_dim_must_be_positive():
    with pytest.raises(ValueError, match="feature_dim must be positive"):
        get_feature_map("hedgehog", 4, 1, feature_dim=-2)
