"""Recurrent-state decoding through transformers' Cache API and generate."""
import pytest
import torch

from hedgehog.layers.attention import HedgehogConfig, hedgehog_layers
from hedgehog.layers.generation import HedgehogCache, HedgehogStateLayer, cache_argument, cache_kwargs, output_cache
from hedgehog.models.convert import convert_model
from conftest import (FAMILIES, V, assert_decoding_matches_full_forward, assert_left_padded_generation_matches_unpadded,
                      perturb_maps, tiny)


def converted(family, **kw):
    torch.manual_seed(0)
    m = convert_model(tiny(family).eval(), HedgehogConfig(**kw))
    perturb_maps(m)
    return m


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("prefill", [1, 7, 16], ids=lambda p: f"prefill{p}")
def test_decode_token_by_token_equals_full_forward(family, prefill):
    assert_decoding_matches_full_forward(converted(family), prefill)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_left_padded_batch_decoding_matches_unpadded(family):
    assert_left_padded_generation_matches_unpadded(converted(family), long=9, short=5, new=6)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_greedy_generate_equals_argmax_of_full_forwards_and_uses_state_cache(family):
    m = converted(family)
    ids = torch.randint(0, V, (2, 6))
    res = m.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    assert isinstance(res.past_key_values, HedgehogCache)
    seq = ids
    with torch.no_grad():
        for _ in range(8):
            seq = torch.cat([seq, m(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(res.sequences, seq)


def test_sampling_runs_and_state_does_not_grow():
    m = converted("llama")
    ids = torch.randint(0, V, (2, 5))
    torch.manual_seed(0)
    res = m.generate(ids, max_new_tokens=4, do_sample=True, top_k=5, pad_token_id=0, return_dict_in_generate=True)
    short = res.past_key_values.state_nbytes()
    res2 = m.generate(ids, max_new_tokens=40, do_sample=True, top_k=5, pad_token_id=0, return_dict_in_generate=True)
    assert res2.sequences.shape == (2, 45)
    assert res2.past_key_values.state_nbytes() == short > 0
    layer = res2.past_key_values.layers[0]
    cfg = m.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    # per KV head (2), not per query head (4): S (B, Hkv, F, D) + z (B, Hkv, F), fp32
    assert layer.S.shape == (2, cfg.num_key_value_heads, 2 * head_dim, head_dim)
    assert short == 2 * (2 * 2 * 2 * head_dim * head_dim + 2 * 2 * 2 * head_dim) * 4


def test_partial_conversion_keeps_kv_cache_for_softmax_layers():
    m = converted("llama", layers=[0])
    cache = HedgehogCache(m)
    assert isinstance(cache.layers[0], HedgehogStateLayer) and not isinstance(cache.layers[1], HedgehogStateLayer)
    ids = torch.randint(0, V, (1, 10))
    with torch.no_grad():
        full = m(ids).logits
        a = m(ids[:, :6], past_key_values=cache, use_cache=True).logits
        rest = [m(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits for t in range(6, 10)]
    torch.testing.assert_close(torch.cat([a] + rest, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.kv_nbytes() > 0


def test_multi_token_continuation_on_a_state():
    m = converted("mistral")
    ids = torch.randint(0, V, (2, 14))
    with torch.no_grad():
        full = m(ids).logits
        cache = HedgehogCache(m)
        parts = [m(ids[:, :5], past_key_values=cache, use_cache=True).logits,
                 m(ids[:, 5:11], past_key_values=cache, use_cache=True).logits,
                 m(ids[:, 11:], past_key_values=cache, use_cache=True).logits]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_state_layer_refuses_kv_update_and_crop():
    layer = HedgehogStateLayer()
    with pytest.raises(RuntimeError, match="recurrent state"):
        layer.update(torch.zeros(1), torch.zeros(1))
    layer.set_state(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2), 3)
    with pytest.raises(RuntimeError, match="cannot be cropped"):
        layer.crop(-1)


@pytest.mark.parametrize("family", FAMILIES)
def test_cache_argument_under_either_name(family):
    """transformers 5.24 renamed the cache argument of models and layers from past_key_values to cache:
    the adapters hand the layer's cache on under one name whichever the model used."""
    import inspect

    from hedgehog.models.convert import get_adapter

    m = converted(family)
    c = HedgehogCache(m)
    adapter = get_adapter(m)
    for name in ("cache", "past_key_values"):
        call = adapter.parse_call((), {name: c, "attention_mask": None})
        assert call["cache"] is c and "past_key_values" not in call
        assert cache_argument({name: c}) is c
        assert output_cache(type("Out", (), {name: c})()) is c
    assert cache_argument({"cache": None, "past_key_values": c}) is c and cache_argument({}) is None
    takes = inspect.signature(type(m).forward).parameters
    assert cache_kwargs(m, c) == {"cache" if "cache" in takes else "past_key_values": c}


def test_a_device_prefill_on_a_state_runs_in_pieces(monkeypatch):
    """Where the layer's bound backend has a device kernel (fla on CUDA; here its float64 stand-in on CPU tensors), a
    prefill, and several tokens on top of a state, go through feature_linear_attention: in pieces without autograd
    (here of 4 to 7 tokens, features per piece), from the state expanded to the query heads, and the state kept per
    KV head. The logits equal one full forward on the PyTorch path."""
    import importlib

    from hedgehog.ops.backends import Backend, fla_causal
    from conftest import standin_chunk_linear_attn

    la = importlib.import_module("hedgehog.ops.linear_attention")
    student = importlib.import_module("hedgehog.layers.student")
    m = converted("mistral")  # grouped-query attention: 4 query heads over 2 KV heads
    ids = torch.randint(0, V, (2, 20))
    with torch.no_grad():
        full = m(ids).logits
    calls = []

    def fast(pq, pk, v, state, eps):
        calls.append(pq.shape[2])
        return fla_causal(standin_chunk_linear_attn, pq, pk, v, state, eps)

    monkeypatch.setattr(Backend, "causal", lambda self, x: fast)
    monkeypatch.setattr(la, "_device_causal", lambda backend, x: fast)
    monkeypatch.setattr(la, "device_piece", lambda rows: 4)
    monkeypatch.setattr(la.cpu_kernel, "fused_hedgehog_attention", lambda *a, **kw: None)  # as on a GPU
    monkeypatch.setattr(student, "fused_hedgehog_attention", lambda *a, **kw: None)
    with torch.no_grad():
        cache = HedgehogCache(m)
        parts = [m(ids[:, :9], past_key_values=cache, use_cache=True).logits,
                 m(ids[:, 9:10], past_key_values=cache, use_cache=True).logits,
                 m(ids[:, 10:], past_key_values=cache, use_cache=True).logits]
    layers = len(hedgehog_layers(m))
    assert calls == [4, 5] * layers + [5, 5] * layers, calls  # 9 tokens, then 10 on the state: two pieces each
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
