"""Conversion (hedgehog.models.convert) on tiny randomly initialised configs of every supported family."""
import pytest
import torch

from conftest import FAMILIES, V, perturb_maps, tiny
from hedgehog.layers.attention import HedgehogAttention, HedgehogConfig, hedgehog_layers, set_attention_mode
from hedgehog.layers.interface import AttentionCall
from hedgehog.models import loading
from hedgehog.models.convert import UnsupportedArchitectureError, convert_model
from hedgehog.ops import quadratic_linear_attention


@pytest.mark.parametrize("family", FAMILIES)
def test_swap_teacher_exact_and_linear_matches_reference(family):
    torch.manual_seed(0)
    model = tiny(family).eval()
    ids = torch.randint(0, V, (2, 24))
    with torch.no_grad():
        ref = model(ids).logits
        convert_model(model)
        layers = hedgehog_layers(model)
        assert len(layers) == 2 and all(isinstance(m, HedgehogAttention) for m in layers)
        set_attention_mode(model, "teacher")
        assert torch.equal(model(ids).logits, ref)  # teacher mode is the original model, exactly
        set_attention_mode(model, "student")
        perturb_maps(model)
        lin = model(ids).logits
        assert lin.shape == ref.shape and torch.isfinite(lin).all()
        assert not torch.allclose(lin, ref, atol=1e-6, rtol=0)
        # the layer's linear path equals the float64 quadratic reference on captured q/k/v
        layer = layers[0]
        set_attention_mode(model, "teacher")
        layer.start_capture()
        model(ids)
        q, k, v, _ = layer.stop_capture()[0]
        set_attention_mode(model, "student")
        layer.start_capture()
        layer.mode = "student"
        phi_q, phi_k = layer.features(q.double(), k.double())
        v_rep = v.double().repeat_interleave(layer.n_rep, 1)
        want = quadratic_linear_attention(phi_q, phi_k, v_rep)
        got = layer.student(q, k, v, AttentionCall(teacher=layer.teacher))
        layer.stop_capture()
        assert (got.double() - want).abs().max() < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padding_matches_unpadded(family):
    torch.manual_seed(0)
    model = convert_model(tiny(family).eval())
    perturb_maps(model)
    a = torch.randint(0, V, (1, 10))
    b = torch.randint(0, V, (1, 6))
    ids = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        both = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        la = model(input_ids=a).logits
        lb = model(input_ids=b).logits
    torch.testing.assert_close(both[0], la[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(both[1, 4:], lb[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_works_in_linear_mode(family):
    torch.manual_seed(0)
    model = convert_model(tiny(family).eval())
    ids = torch.randint(0, V, (1, 8))
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 13)
    # greedy continuation equals argmax over full forwards
    seq = ids
    with torch.no_grad():
        for _ in range(5):
            nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq)


def test_unsupported_architecture_and_bad_paths():
    from transformers import DistilBertConfig, DistilBertModel

    other = DistilBertModel(DistilBertConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2, hidden_dim=32))
    with pytest.raises(UnsupportedArchitectureError) as e:
        convert_model(other)
    msg = str(e.value)
    assert "distilbert" in msg and "takes no cache argument" in msg
    assert all(t in msg for t in ("llama", "gpt2", "qwen3", "gemma2", "phi3", "gpt_neox", "bert"))
    assert "model_types" not in msg  # no advice to edit an adapter's list (that silently skips q/k norms)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        loading.load("/nonexistent/run/model")
    with pytest.raises(ValueError, match="already converted"):
        convert_model(convert_model(tiny("llama")))
    with pytest.raises(ValueError, match="out of range"):
        convert_model(tiny("llama"), HedgehogConfig(layers=[5]))
    from hedgehog.data.assets import resolve_model_path

    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_path("./no/such/model")


@pytest.mark.parametrize("fm", ["elu", "performer", "cosformer", "t2r", "taylor", "hedgehog_exp"])
def test_baseline_maps_convert_and_run(fm):
    torch.manual_seed(0)
    model = convert_model(tiny("llama").eval(), HedgehogConfig(feature_map=fm))
    with torch.no_grad():
        out = model(torch.randint(0, V, (1, 16))).logits
    assert torch.isfinite(out).all()


def test_taylor_kernel_form_in_the_layer_equals_feature_form(monkeypatch):
    """Short sequences take Taylor's closed-form kernel (O(N^2 d)); logits and gradients equal the feature path."""
    from hedgehog.layers import student as attn_mod

    torch.manual_seed(0)
    model = convert_model(tiny("llama").eval(), HedgehogConfig(feature_map="taylor"))  # GQA: 4 q heads, 2 kv heads
    layer = hedgehog_layers(model)[0]
    assert layer.n_rep == 2 and layer.feature_map_q.feature_dim == 45  # head_dim 8: 1 + 8 + 36
    ids = torch.randint(0, V, (2, 40))
    calls = []
    real = attn_mod.kernel_linear_attention
    monkeypatch.setattr(attn_mod, "kernel_linear_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))

    def run():
        model.zero_grad()
        out = model(ids).logits
        out.square().mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out.detach(), grads

    kern_out, kern_grads = run()
    assert len(calls) == 2  # N = 40 <= F = 45: both layers took the kernel form
    monkeypatch.setattr(attn_mod.StudentPaths, "_kernel_form", lambda self, n: False)
    feat_out, feat_grads = run()
    assert len(calls) == 2
    torch.testing.assert_close(kern_out, feat_out, rtol=1e-4, atol=1e-5)
    assert kern_grads.keys() == feat_grads.keys() and len(kern_grads) > 0
    for name in kern_grads:
        torch.testing.assert_close(kern_grads[name], feat_grads[name], rtol=1e-3, atol=1e-6, msg=name)
    monkeypatch.undo()
    calls.clear()
    monkeypatch.setattr(attn_mod, "kernel_linear_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    with torch.no_grad():
        model(torch.randint(0, V, (1, 46)))
    assert calls == []  # N > F: the linear (feature) form


