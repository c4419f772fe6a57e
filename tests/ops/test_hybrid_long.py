"""The long-context hybrid: attention sinks in the exact part and a decayed linear state, against float64
references (the quadratic weights written out by hand, token-by-token decoding) on every path."""
import math

import pytest
import torch

from conftest import assert_greedy_generate_is_argmax_with_a_constant_state, hybrid_layer_case, rand_features
from hedgehog.ops import hybrid_attention, quadratic_hybrid_attention
from hedgehog.ops import hybrid as hyb
from hedgehog.ops.window import window_inference, window_part

B, H, D, FD = 2, 3, 8, 16


def inputs(n, dtype=torch.float64):
    q, k, v = (torch.randn(B, H, n, D, dtype=dtype) for _ in range(3))
    return q, k, v, rand_features(B, H, n, FD, dtype=dtype), rand_features(B, H, n, FD, dtype=dtype)


def by_hand(q, k, v, pq, pk, w, g, sinks, lam):
    """The formula, one row at a time: exact keys (window, and sinks that left it) under one row max,
    older non-sink keys through the features weighed lambda^(n - w - i)."""
    n_, d = q.shape[2], q.shape[-1]
    y = torch.zeros_like(v)
    for n in range(n_):
        exact = [i for i in range(n + 1) if i > n - w or i < sinks]
        older = [i for i in range(n + 1) if i <= n - w and i >= sinks]
        s = (q[:, :, n, None] @ k[:, :, exact].transpose(-1, -2)).squeeze(2) * d ** -0.5  # (B, H, E)
        e = g.view(1, H, 1) * torch.exp(s - s.amax(-1, keepdim=True))
        num = (e[..., None] * v[:, :, exact]).sum(2)
        den = e.sum(-1)
        for i in older:
            a = (pq[:, :, n] * pk[:, :, i]).sum(-1) * lam.view(1, H) ** (n - w - i)
            num = num + a[..., None] * v[:, :, i]
            den = den + a
        y[:, :, n] = num / den[..., None]
    return y


def test_reference_weights_match_the_formula_written_out():
    q, k, v, pq, pk = inputs(23)
    g, lam = torch.rand(H, dtype=torch.float64), torch.tensor([0.9, 0.5, 1.0], dtype=torch.float64)
    ref = quadratic_hybrid_attention(q, k, v, pq, pk, 5, g, sinks=3, decay=lam.log())
    torch.testing.assert_close(ref, by_hand(q, k, v, pq, pk, 5, g, 3, lam), atol=1e-12, rtol=1e-10)
    plain = quadratic_hybrid_attention(q, k, v, pq, pk, 5, g)
    assert (plain - ref).abs().max() > 1e-3  # sinks and decay change the output


@pytest.mark.parametrize("grad", [True, False], ids=["autograd-path", "no-grad-path"])
@pytest.mark.parametrize("n", [1, 7, 64, 65, 200])
@pytest.mark.parametrize("window,chunk,sinks", [(4, 4, 2), (16, 8, 4), (8, 12, 1), (40, 8, 5), (8, 8, 0)])
def test_chunked_with_sinks_and_decay_equals_quadratic_reference(n, window, chunk, sinks, grad):
    q, k, v, pq, pk = inputs(n)
    g = torch.rand(H, dtype=torch.float64)
    decay = torch.log(torch.tensor([0.95, 0.7, 0.999], dtype=torch.float64))
    ref = quadratic_hybrid_attention(q, k, v, pq, pk, window, g, sinks=sinks, decay=decay)
    k = k.clone().requires_grad_(grad)  # what autograd records takes its own form
    with torch.set_grad_enabled(grad):
        out = hybrid_attention(q, k, v, pq, pk, window, g, chunk_size=chunk, sinks=sinks, decay=decay)
        many = hybrid_attention(q, k, v, pq, pk, window, g, chunk_size=chunk, sinks=sinks, decay=decay,
                                block_size=math.lcm(chunk, window))  # the state carried across blocks
    torch.testing.assert_close(out.detach(), ref, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(many.detach(), ref, atol=1e-12, rtol=1e-10)


def test_decayed_state_after_a_pass_is_the_decayed_sum_of_older_keys():
    n, w, sinks = 37, 8, 3
    q, k, v, pq, pk = inputs(n)
    lam = torch.tensor([0.9, 0.8, 0.99], dtype=torch.float64)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            _, ((S, z), kt, vt) = hybrid_attention(q, k, v, pq.clone().requires_grad_(grad), pk, w, 0.5,
                                                   chunk_size=5, sinks=sinks, decay=lam.log(), return_state=True)
        S, z = S.detach(), z.detach()
        wts = torch.stack([lam ** (n - 1 - w - i) if i >= sinks else torch.zeros(H, dtype=torch.float64)
                           for i in range(n - w)], -1)  # (H, older keys)
        want_S = torch.einsum("hi,bhif,bhid->bhfd", wts, pk[:, :, :n - w], v[:, :, :n - w])
        torch.testing.assert_close(S, want_S, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(z, torch.einsum("hi,bhif->bhf", wts, pk[:, :, :n - w]), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("sub,piece", [(8, 8), (5, 15), (32, 64)])
def test_window_inference_with_sinks_equals_the_autograd_form(sub, piece):
    n, w = 101, 12
    q, k, v, _, _ = inputs(n)
    g = torch.rand(H, dtype=torch.float64)
    BH = B * H
    rows = hyb._gamma_rows(g, B, H, torch.float64, q.device)
    q3, k3, v3 = (t.reshape(BH, n, -1) for t in (q, k, v))
    rows_of = lambda t: (lambda lo, hi: t[:, lo:hi])
    want = window_part(rows_of(q3), rows_of(k3), rows_of(v3), w, 0.3, rows, torch.float64, sinks=4)(0, 0, n)
    with torch.no_grad():
        got = window_inference(q3, k3, v3, w, 0.3, rows, sub=sub, piece=piece, sinks=4)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


def test_gradcheck_with_sinks_and_decay():
    q, k, v, pq, pk = inputs(19)
    g = torch.rand(H, dtype=torch.float64)
    decay = torch.log(torch.tensor([0.9, 0.6], dtype=torch.float64))
    args = [t[:1, :2].clone().requires_grad_() for t in (q, k, v, pq, pk)] + [g[:2].clone().requires_grad_(),
                                                                             decay.clone().requires_grad_()]
    fn = lambda q, k, v, pq, pk, g, dc: hybrid_attention(q, k, v, pq, pk, window=3, gamma=g, chunk_size=4,
                                                         block_size=12, sinks=2, decay=dc)
    assert torch.autograd.gradcheck(fn, args)


# -- the distillation loss (stage 1) -------------------------------------------------------------------------
@pytest.mark.parametrize("rows,block", [(None, 512), (None, 9), ("subset", 512), ("subset", 5)])
@pytest.mark.parametrize("sinks,lam", [(0, None), (3, None), (3, [0.9, 0.5, 1.0]), (0, [0.99, 0.7, 0.8])])
def test_hybrid_loss_with_sinks_and_decay_is_the_cross_entropy_of_the_reference_weights(rows, block, sinks, lam):
    """Value and gradients (maps, gamma, decay) against autograd through the float64 reference weights."""
    from hedgehog.modules.losses import attention_distillation_loss
    from hedgehog.ops.settings import HybridSettings
    from hedgehog.ops.softmax import softmax_attention_weights

    torch.manual_seed(1)
    n, w = 37, 6
    q, k, v, pq, pk = inputs(n)
    idx = torch.randperm(n)[:13] if rows == "subset" else None

    def leaves():
        g = torch.rand(H, dtype=torch.float64).requires_grad_()
        dc = None if lam is None else torch.tensor(lam, dtype=torch.float64).log().requires_grad_()
        return pq.clone().requires_grad_(), pk.clone().requires_grad_(), g, dc

    torch.manual_seed(2)
    a_pq, a_pk, a_g, a_dc = leaves()
    p = softmax_attention_weights(q, k, causal=True)
    _, wts = quadratic_hybrid_attention(q, k, v, a_pq, a_pk, w, a_g, sinks=sinks, decay=a_dc, return_weights=True)
    ce = -(p * wts.clamp_min(1e-300).log()).sum(-1)  # (B, H, N)
    want = (ce if idx is None else ce[:, :, idx]).mean()
    want.backward()
    torch.manual_seed(2)
    b_pq, b_pk, b_g, b_dc = leaves()
    got = attention_distillation_loss(q, k, b_pq, b_pk, hybrid=HybridSettings(w, b_g, sinks, b_dc),
                                      query_index=idx, query_block=block)
    got.backward()
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    for a, b in ((a_pq, b_pq), (a_pk, b_pk), (a_g, b_g), (a_dc, b_dc)):
        if a is not None:
            torch.testing.assert_close(b.grad, a.grad, atol=1e-12, rtol=1e-9)
    assert a_pk.grad.abs().max() > 1e-4 and (a_dc is None or a_dc.grad.abs().max() > 1e-4)


# -- the converted layer: prefill, decoding, generate, save/load -----------------------------------------------
from conftest import FAMILIES, V, perturb_maps, tiny  # noqa: E402
from conftest import (assert_decoding_matches_full_forward,  # noqa: E402
                             assert_left_padded_generation_matches_unpadded)

from hedgehog.layers.attention import HedgehogConfig, hedgehog_layers, set_attention_mode  # noqa: E402
from hedgehog.layers.generation import HybridStateLayer  # noqa: E402
from hedgehog.models.convert import convert_model  # noqa: E402


def long_model(family, window=4, sinks=2, decay=0.8):
    torch.manual_seed(0)
    m = convert_model(tiny(family).eval(), HedgehogConfig(attention="hybrid", window=window, sinks=sinks,
                                                          state_decay=decay))
    perturb_maps(m)
    with torch.no_grad():
        for layer in hedgehog_layers(m):
            layer.window_gate.normal_()
            layer.state_decay.add_(torch.randn_like(layer.state_decay))  # a different lambda per KV head
    return m


def test_config_checks_sinks_and_decay():
    with pytest.raises(ValueError, match="state_decay"):
        HedgehogConfig(attention="hybrid", state_decay=1.0)
    with pytest.raises(ValueError, match="sinks"):
        HedgehogConfig(attention="hybrid", sinks=-1)
    with pytest.raises(ValueError, match="hybrid"):
        HedgehogConfig(attention="linear", sinks=4)


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_layer_forward_matches_the_reference_with_sinks_and_decay(family):
    layer, q, k, v_rep, reference = hybrid_layer_case(long_model(family), V)
    want = reference(sinks=2, decay=layer.log_decay().detach().double())
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            got = layer._hybrid_full(q, k, v_rep, torch.arange(19), torch.arange(19), None, layer.teacher.scale)
        torch.testing.assert_close(got.detach().double(), want, atol=1e-5, rtol=1e-5)
    assert (reference() - want).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("prefill", [1, 3, 9], ids=lambda p: f"prefill{p}")
def test_decode_equals_full_forward_past_the_window_with_sinks_and_decay(family, prefill):
    m = long_model(family)
    ids, cache = assert_decoding_matches_full_forward(m, prefill, n=24)
    with torch.no_grad():
        more = m(ids[:, :3], past_key_values=cache, use_cache=True).logits  # several tokens on a state
        want_more = m(torch.cat([ids, ids[:, :3]], 1)).logits[:, 24:]
    torch.testing.assert_close(more, want_more, atol=1e-5, rtol=1e-5)
    assert isinstance(cache.layers[0], HybridStateLayer) and cache.layers[0].k_win.shape[2] == 4 + 2


def test_left_padded_generation_with_sinks_and_decay_matches_unpadded():
    assert_left_padded_generation_matches_unpadded(long_model("llama", sinks=0), long=9, short=3, new=8)


def test_generate_keeps_a_constant_state_with_sinks_and_decay():
    assert_greedy_generate_is_argmax_with_a_constant_state(long_model("llama"), V)


def test_save_load_keeps_sinks_and_the_learned_decay(tmp_path):
    from transformers import AutoModelForCausalLM

    m = long_model("llama")
    m.save_pretrained(tmp_path / "m")
    r = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    a, b = hedgehog_layers(m)[1], hedgehog_layers(r)[1]
    assert b.hh_config.sinks == 2 and torch.equal(a.state_decay, b.state_decay)
    ids = torch.randint(0, V, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(r(ids).logits, m(ids).logits, atol=1e-5, rtol=1e-5)


def test_grad_mode_alone_takes_the_inference_forms_and_anything_trainable_the_autograd_ones(monkeypatch):
    """A frozen model called outside ``torch.no_grad()`` (grad mode on, nothing requiring grad) gets the inference
    forms of the chunked sums and the window part (less memory, no graph); an input, gamma, the decay or a feature
    map's weights requiring grad get the autograd forms. Both give the float64 reference."""
    from hedgehog.modules.feature_maps import get_feature_map
    from hedgehog.ops import chunked, feature_hybrid_attention, feature_linear_attention, linear_attention
    from hedgehog.ops import window as win
    from hedgehog.ops import quadratic_linear_attention, window_softmax_attention

    calls = []
    for mod, name in ((chunked, "causal_blocks_inference"), (hyb, "window_inference"), (win, "window_inference")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _r=real, _n=name, **kw: calls.append(_n) or _r(*a, **kw))
    n, w = 41, 6
    q, k, v, pq, pk = inputs(n)
    g = torch.rand(H, dtype=torch.float64)
    decay = torch.log(torch.tensor([0.9, 0.8, 0.99], dtype=torch.float64))
    fq, fk = get_feature_map("hedgehog", D, H).double(), get_feature_map("hedgehog", D, H).double()
    ref_h = quadratic_hybrid_attention(q, k, v, pq, pk, w, g, sinks=2, decay=decay)
    ref_fh = quadratic_hybrid_attention(q, k, v, fq(q).detach(), fk(k).detach(), w, g, sinks=2, decay=decay)
    ref_l = quadratic_linear_attention(pq, pk, v)
    ref_fl = quadratic_linear_attention(fq(q).detach(), fk(k).detach(), v)
    zero = torch.zeros_like(pq)
    ref_w = quadratic_hybrid_attention(q, k, v, zero, zero, w, 1.0, sinks=2)  # no linear part: the window's softmax
    hybrid_forms = ["window_inference", "causal_blocks_inference"]
    # name: (the call, its reference, the inference forms it takes, what of it may be trained)
    cases = {
        "hybrid": (lambda x, g, d: hybrid_attention(x, k, v, pq, pk, w, g, chunk_size=4, sinks=2, decay=d),
                   ref_h, hybrid_forms, ("input", "gamma", "decay")),
        "feature hybrid": (lambda x, g, d: feature_hybrid_attention(x, k, v, fq, fk, w, g, chunk_size=4, sinks=2,
                                                                    decay=d), ref_fh, hybrid_forms,
                           ("input", "gamma", "decay", "map")),
        "linear": (lambda x, g, d: linear_attention(x, pk, v, chunk_size=4), ref_l, ["causal_blocks_inference"],
                   ("input",)),
        "feature linear": (lambda x, g, d: feature_linear_attention(x, k, v, fq, fk, chunk_size=4), ref_fl,
                           ["causal_blocks_inference"], ("input", "map")),
        "window": (lambda x, g, d: window_softmax_attention(x, k, v, w, 2), ref_w, ["window_inference"], ("input",)),
    }
    for name, (run, ref, inference, trainable) in cases.items():
        for how in ("frozen", *trainable):
            for p in list(fq.parameters()) + list(fk.parameters()):
                p.requires_grad_(how == "map")
            x = (pq if name == "linear" else q).clone().requires_grad_(how == "input")
            calls.clear()
            y = run(x, g.clone().requires_grad_(how == "gamma"), decay.clone().requires_grad_(how == "decay"))
            assert calls == (inference if how == "frozen" else []), (name, how, calls)
            assert y.requires_grad == (how != "frozen"), (name, how)
            torch.testing.assert_close(y.detach(), ref, atol=1e-12, rtol=1e-10, msg=f"{name}, {how}")
