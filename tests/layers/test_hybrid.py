"""Hybrid sliding-window + linear attention: the op against its float64 reference, the loss, and the
converted layer through prefill, decoding, generate and save/load."""
import pytest
import torch
import torch.nn.functional as F

from conftest import assert_greedy_generate_is_argmax_with_a_constant_state, hybrid_layer_case, rand_features
from hedgehog.layers.attention import HedgehogConfig, hedgehog_layers, set_attention_mode
from hedgehog.modules.losses import attention_distillation_loss, attention_output_mse_loss
from hedgehog.ops import (hybrid_attention, hybrid_recurrent_step, quadratic_hybrid_attention, ring_hybrid_step,
                          softmax_attention)
from hedgehog.ops import hybrid as hyb
from hedgehog.ops.window import window_inference, window_part
from hedgehog.ops.settings import HybridSettings
from hedgehog.ops.softmax import softmax_attention_weights

B, H, D, FD = 2, 3, 8, 16


def inputs(n, dtype=torch.float64, heads=H):
    q, k, v = (torch.randn(B, heads, n, D, dtype=dtype) for _ in range(3))
    return q, k, v, rand_features(B, heads, n, FD, dtype=dtype), rand_features(B, heads, n, FD, dtype=dtype)


def steps(q, k, v, pq, pk, w, g):
    """Token-by-token decoding from scratch: window of the last w keys, older keys folded into a state."""
    ys, st = [], None
    for t in range(q.shape[2]):
        if t >= w:
            kv = pk[:, :, t - w].unsqueeze(-1) * v[:, :, t - w].unsqueeze(-2)
            st = (kv, pk[:, :, t - w]) if st is None else (st[0] + kv, st[1] + pk[:, :, t - w])
        lo = max(0, t - w + 1)
        ys.append(hybrid_recurrent_step(q[:, :, t], pq[:, :, t], k[:, :, lo:t + 1], v[:, :, lo:t + 1], st, g))
    return torch.stack(ys, 2), st


@pytest.mark.parametrize("grad", [True, False], ids=["autograd-path", "no-grad-path"])
@pytest.mark.parametrize("n", [1, 7, 63, 64, 65, 513])
@pytest.mark.parametrize("window,chunk", [(4, 4), (16, 8), (64, 64), (8, 12), (40, 8)])
def test_chunked_equals_quadratic_reference(n, window, chunk, grad):
    q, k, v, pq, pk = inputs(n)
    g = torch.rand(H, dtype=torch.float64)
    ref = quadratic_hybrid_attention(q, k, v, pq, pk, window, g)
    q = q.clone().requires_grad_(grad)  # what autograd records takes its own form
    with torch.set_grad_enabled(grad):
        out = hybrid_attention(q, k, v, pq, pk, window, g, chunk_size=chunk)
    torch.testing.assert_close(out.detach(), ref, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("sub,piece", [(8, 8), (8, 24), (5, 15), (32, 64)])
def test_window_inference_pieces_and_subchunks_agree(sub, piece):
    """The no-grad window part: any sub-chunk/piece split (pieces after the first, a padded tail) gives
    the same [num, den] as the autograd form, including a zero gamma head."""
    n, w = 101, 12
    q, k, v, _, _ = inputs(n)
    g = torch.rand(H, dtype=torch.float64)
    g[0] = 0.0
    BH = q.shape[0] * H
    rows = hyb._gamma_rows(g, q.shape[0], H, torch.float64, q.device)
    q3, k3, v3 = (t.reshape(BH, n, -1) for t in (q, k, v))
    rows_of = lambda t: (lambda lo, hi: t[:, lo:hi])
    want = window_part(rows_of(q3), rows_of(k3), rows_of(v3), w, 0.125, rows, torch.float64)(0, 0, n)
    with torch.no_grad():
        got = window_inference(q3, k3, v3, w, 0.125, rows, sub=sub, piece=piece)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    assert torch.all(got[0::H] == 0)  # gamma 0 (head 0 of each batch row): its window weighs nothing


@pytest.mark.parametrize("grad", [True, False], ids=["autograd-path", "no-grad-path"])
def test_several_blocks_equal_one_and_the_reference(grad):
    q, k, v, pq, pk = inputs(300)
    ref = quadratic_hybrid_attention(q, k, v, pq, pk, 16, 0.3)
    pq = pq.clone().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        one = hybrid_attention(q, k, v, pq, pk, 16, 0.3, chunk_size=16, block_size=320)
        many = hybrid_attention(q, k, v, pq, pk, 16, 0.3, chunk_size=16, block_size=32)
    torch.testing.assert_close(many.detach(), ref, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(one.detach(), ref, atol=1e-12, rtol=1e-10)
    with pytest.raises(ValueError, match="multiple"):
        hybrid_attention(q, k, v, pq, pk, 16, 0.3, chunk_size=16, block_size=40)


def test_window_covering_everything_is_exact_softmax():
    q, k, v, pq, pk = inputs(50)
    out = hybrid_attention(q, k, v, pq, pk, window=64, gamma=0.2)
    torch.testing.assert_close(out, softmax_attention(q, k, v, causal=True), atol=1e-12, rtol=1e-10)


def test_reference_weights_match_the_formula():
    n, w = 9, 3
    q, k, v, pq, pk = inputs(n)
    g = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    _, wts = quadratic_hybrid_attention(q, k, v, pq, pk, w, g, return_weights=True)
    b, h, i = 1, 2, 7
    s = (q[b, h, i] @ k[b, h].T) * D ** -0.5
    win = list(range(i - w + 1, i + 1))
    a = torch.zeros(n, dtype=torch.float64)
    a[win] = g[h] * torch.exp(s[win] - s[win].max())
    a[: i - w + 1] = pq[b, h, i] @ pk[b, h, : i - w + 1].T
    torch.testing.assert_close(wts[b, h, i], a / a.sum())
    assert torch.all(wts[..., :, :].triu(1) == 0)


@pytest.mark.parametrize("n,w", [(1, 4), (20, 1), (37, 8)])
def test_recurrent_steps_equal_one_pass_and_prefill_state_continues(n, w):
    q, k, v, pq, pk = inputs(n)
    g = torch.rand(H, dtype=torch.float64)
    full = hybrid_attention(q, k, v, pq, pk, w, g, chunk_size=4)
    rec, st = steps(q, k, v, pq, pk, w, g)
    torch.testing.assert_close(rec, full, atol=1e-12, rtol=1e-10)
    # prefill p tokens, then continue token by token from the returned state and window
    p = n // 2 + 1
    _, (state, k_tail, v_tail) = hybrid_attention(q[:, :, :p], k[:, :, :p], v[:, :, :p], pq[:, :, :p],
                                                  pk[:, :, :p], w, g, chunk_size=4, return_state=True)
    S, z = state
    assert k_tail.shape[2] == min(w, p)
    ys = []
    for t in range(p, n):
        k_tail, v_tail = torch.cat([k_tail, k[:, :, t:t + 1]], 2), torch.cat([v_tail, v[:, :, t:t + 1]], 2)
        if k_tail.shape[2] > w:
            S = S + pk[:, :, t - w].unsqueeze(-1) * v[:, :, t - w].unsqueeze(-2)
            z = z + pk[:, :, t - w]
            k_tail, v_tail = k_tail[:, :, 1:], v_tail[:, :, 1:]
        ys.append(hybrid_recurrent_step(q[:, :, t], pq[:, :, t], k_tail, v_tail, (S, z), g))
    if ys:
        torch.testing.assert_close(torch.stack(ys, 2), full[:, :, p:], atol=1e-12, rtol=1e-10)


def test_recurrent_step_grouped_query_heads():
    q, _, _, pq, _ = inputs(1, heads=4)
    kw, vw = torch.randn(B, 2, 5, D, dtype=torch.float64), torch.randn(B, 2, 5, D, dtype=torch.float64)
    S, z = torch.rand(B, 2, FD, D, dtype=torch.float64), torch.rand(B, 2, FD, dtype=torch.float64)
    g = torch.rand(4, dtype=torch.float64)
    y = hybrid_recurrent_step(q[:, :, 0], pq[:, :, 0], kw, vw, (S, z), g)
    rep = lambda t: t.repeat_interleave(2, dim=1)
    y_rep = hybrid_recurrent_step(q[:, :, 0], pq[:, :, 0], rep(kw), rep(vw), (rep(S), rep(z)), g)
    torch.testing.assert_close(y, y_rep)


def test_ring_step_equals_recurrent_step_in_any_slot_order_with_empty_slots():
    """The decode cache's ring layout: slots shuffled, two empty (invalid) slots holding garbage, values
    with a ones column and a packed state give the same output as the ordered window."""
    q, _, _, pq, _ = inputs(1, heads=4)
    kw, vw = torch.randn(B, 2, 5, D, dtype=torch.float64), torch.randn(B, 2, 5, D, dtype=torch.float64)
    S, z = torch.rand(B, 2, FD, D, dtype=torch.float64), torch.rand(B, 2, FD, dtype=torch.float64)
    g = torch.rand(4, dtype=torch.float64)
    want = hybrid_recurrent_step(q, pq, kw, vw, (S, z), g)
    perm = torch.tensor([3, 0, 4, 1, 2])
    ring_k = torch.cat([kw[:, :, perm], 100 * torch.randn(B, 2, 2, D, dtype=torch.float64)], 2)
    ring_v = torch.cat([F.pad(vw[:, :, perm], (0, 1), value=1.0), torch.randn(B, 2, 2, D + 1, dtype=torch.float64)], 2)
    valid = torch.tensor([True] * 5 + [False] * 2).expand(B, 7)
    Sz = torch.cat([S, z.unsqueeze(-1)], -1)
    got = ring_hybrid_step(q, pq, ring_k, ring_v, valid, Sz, g)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="do not fit"):
        ring_hybrid_step(q, pq, ring_k, ring_v, valid[:, :6], Sz, g)


@pytest.mark.parametrize("n,block", [(11, None), (26, 12)], ids=["one-block", "three-blocks"])
def test_gradcheck_including_gamma(n, block):
    q, k, v, pq, pk = inputs(n)
    g = torch.rand(H, dtype=torch.float64)
    args = [t[:1, :2].clone().requires_grad_() for t in (q, k, v, pq, pk)] + [g[:2].clone().requires_grad_()]
    fn = lambda q, k, v, pq, pk, g: hybrid_attention(q, k, v, pq, pk, window=3, gamma=g, chunk_size=4,
                                                     block_size=block)
    assert torch.autograd.gradcheck(fn, args)
    ref = lambda q, k, v, pq, pk, g: quadratic_hybrid_attention(q, k, v, pq, pk, window=3, gamma=g)
    assert torch.autograd.gradcheck(ref, args)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_half_precision_within_tolerance(dtype, tol):
    q, k, v, pq, pk = inputs(130)
    ref = quadratic_hybrid_attention(q, k, v, pq, pk, 16, 0.4)
    out = hybrid_attention(*(t.to(dtype) for t in (q, k, v, pq, pk)), 16, 0.4)
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


def test_bad_inputs_raise():
    q, k, v, pq, pk = inputs(8)
    with pytest.raises(ValueError, match="window"):
        hybrid_attention(q, k, v, pq, pk, window=0)
    with pytest.raises(ValueError, match="shapes"):
        hybrid_attention(q, k[:, :2], v, pq, pk)
    with pytest.raises(ValueError, match="per head"):
        hybrid_attention(q, k, v, pq, pk, gamma=torch.rand(5))


# -- loss ----------------------------------------------------------------------------------------------
def test_hybrid_loss_equals_cross_entropy_of_reference_weights_and_blocks_agree():
    q, k, v, pq, pk = inputs(40)
    g = torch.rand(H, dtype=torch.float64)
    p = softmax_attention_weights(q, k, causal=True)
    _, w = quadratic_hybrid_attention(q, k, v, pq, pk, 8, g, return_weights=True)
    want = -(p * w.clamp_min(1e-300).log()).sum(-1).mean()
    got = attention_distillation_loss(q, k, pq, pk, hybrid=HybridSettings(8, g))
    torch.testing.assert_close(got, want)
    blocked = attention_distillation_loss(q, k, pq, pk, hybrid=HybridSettings(8, g), query_block=7)
    torch.testing.assert_close(blocked, want)


def test_hybrid_loss_is_teacher_entropy_when_the_window_covers_everything():
    q, k, _, pq, pk = inputs(20)
    p = softmax_attention_weights(q, k, causal=True)
    entropy = -(p * p.clamp_min(1e-300).log()).sum(-1).mean()
    torch.testing.assert_close(attention_distillation_loss(q, k, pq, pk, hybrid=HybridSettings(32, 0.3)), entropy)
    v = torch.randn_like(q)
    assert attention_output_mse_loss(q, k, v, pq, pk, hybrid=HybridSettings(32, 0.3)).item() < 1e-20


# -- converted layer -----------------------------------------------------------------------------------
from conftest import FAMILIES, V, perturb_maps, tiny  # noqa: E402

from hedgehog.data.assets import PLAIN_LOAD  # noqa: E402
from hedgehog.layers.generation import HedgehogCache, HybridStateLayer  # noqa: E402
from hedgehog.models.convert import convert_model  # noqa: E402
from conftest import (assert_decoding_matches_full_forward,  # noqa: E402
                             assert_left_padded_generation_matches_unpadded)


def hybrid_model(family, window=4):
    torch.manual_seed(0)
    m = convert_model(tiny(family).eval(), HedgehogConfig(attention="hybrid", window=window))
    perturb_maps(m)
    with torch.no_grad():
        for layer in hedgehog_layers(m):
            layer.window_gate.normal_()
    return m


def test_config_rejects_unknown_kind_and_bad_window():
    with pytest.raises(ValueError, match="linear.*hybrid"):
        HedgehogConfig(attention="sliding")
    with pytest.raises(ValueError, match="window"):
        HedgehogConfig(attention="hybrid", window=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_forward_matches_reference_with_the_layers_own_qkv(family):
    layer, q, k, v_rep, reference = hybrid_layer_case(hybrid_model(family), V)
    with torch.no_grad():
        got = layer._hybrid_full(q, k, v_rep, torch.arange(19), torch.arange(19), None, layer.teacher.scale)
    torch.testing.assert_close(got.double(), reference(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("prefill", [1, 3, 9], ids=lambda p: f"prefill{p}")
def test_decode_token_by_token_equals_full_forward(family, prefill):
    m = hybrid_model(family)
    ids, cache = assert_decoding_matches_full_forward(m, prefill)
    with torch.no_grad():
        more = m(ids[:, :3], past_key_values=cache, use_cache=True).logits  # several tokens on a state
        want_more = m(torch.cat([ids, ids[:, :3]], 1)).logits[:, 16:]
    torch.testing.assert_close(more, want_more, atol=1e-5, rtol=1e-5)
    assert isinstance(cache.layers[0], HybridStateLayer) and cache.layers[0].k_win.shape[2] == 4


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_left_padded_batch_generation_matches_unpadded(family):
    # prompts shorter than the window (4) on one side and longer on the other; padding crosses the window
    assert_left_padded_generation_matches_unpadded(hybrid_model(family), long=9, short=3, new=8)


def test_greedy_generate_equals_argmax_and_cache_size_is_constant():
    assert_greedy_generate_is_argmax_with_a_constant_state(hybrid_model("llama"), V)


def test_stage1_trains_maps_and_gate_and_save_load_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM

    from hedgehog.models import loading
    from hedgehog.models import formats
    from hedgehog.train.stage1 import Stage1Config, attention_transfer

    torch.manual_seed(0)
    tiny("llama").save_pretrained(tmp_path / "base")
    m = convert_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base", **PLAIN_LOAD).eval(),
                      HedgehogConfig(attention="hybrid", window=4))
    gate0 = hedgehog_layers(m)[0].window_gate.detach().clone()
    rep = attention_transfer(m, torch.randint(0, V, (8, 32)),
                             Stage1Config(tokens=8 * 32 * 2, lr=3e-2, batch_size=2, warmup_steps=1), progress=False)
    losses = [h["loss"] for h in rep["history"]]
    assert losses[-1] < losses[0]
    assert not torch.equal(hedgehog_layers(m)[0].window_gate, gate0)
    ids = torch.randint(0, V, (2, 20))
    with torch.no_grad():
        want = m(input_ids=ids).logits
    formats.save_converted(m, tmp_path / "c", base_model=str(tmp_path / "base"))
    loaded, _ = loading.load(tmp_path / "c")
    assert hedgehog_layers(loaded)[0].hybrid and hedgehog_layers(loaded)[0].hh_config.window == 4
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, want)


@pytest.mark.parametrize("n", [5, 64, 200])
def test_feature_hybrid_equals_hybrid_of_precomputed_features(n):
    from hedgehog.modules.feature_maps import get_feature_map
    from hedgehog.ops import feature_hybrid_attention

    q, k, v, _, _ = inputs(n)
    fq, fk = get_feature_map("hedgehog", D, H).double(), get_feature_map("hedgehog", D, H).double()
    with torch.no_grad():
        for p in list(fq.parameters()) + list(fk.parameters()):
            p.add_(0.3 * torch.randn_like(p))
    g = torch.rand(H, dtype=torch.float64)
    want = quadratic_hybrid_attention(q, k, v, fq(q), fk(k), 16, g)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            got = feature_hybrid_attention(q, k, v, fq, fk, window=16, gamma=g, chunk_size=16, block_size=32)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    # the state handed to decoding: keys older than the window, summed
    with torch.no_grad():
        y, (S, z) = feature_hybrid_attention(q, k, v, fq, fk, window=16, gamma=g, chunk_size=16, block_size=32,
                                             return_state=True)
        old = fk(k)[:, :, :max(0, n - 16)]
        torch.testing.assert_close(y, want, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(S, old.transpose(-1, -2) @ v[:, :, :old.shape[2]], atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(z, old.sum(2), atol=1e-12, rtol=1e-10)
