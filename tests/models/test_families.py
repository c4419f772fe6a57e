"""Every mainstream decoder family through the one generic path: the teacher is the model's own attention."""
import pytest
import torch

from hedgehog.layers.attention import HedgehogConfig, hedgehog_layers, set_attention_mode
from hedgehog.layers.capture import capture_qkv
from hedgehog.models.convert import InterfaceAdapter, UnsupportedArchitectureError, convert_model, get_adapter
from hedgehog.ops.softmax import softmax_attention_weights
from conftest import FAMILIES, V, perturb_maps, tiny

GENERIC = FAMILIES  # GPT-2 included: its attention calls the interface too


def _eager(model):
    model.config._attn_implementation = "eager"  # the reference that returns its attention weights
    return model


@pytest.mark.parametrize("family", GENERIC)
def test_the_generic_path_serves_the_family(family):
    assert isinstance(get_adapter(tiny(family)), InterfaceAdapter)


@pytest.mark.parametrize("family", FAMILIES)
def test_teacher_targets_are_the_models_own_attention_weights(family):
    """The rows the distillation loss and the metrics score against equal the weights the model itself computes,
    sliding windows (4 keys, Mistral / Qwen2's per-layer / Gemma2-3's alternating) and soft-caps included."""
    torch.manual_seed(0)
    model = _eager(tiny(family).eval())
    ids = torch.randint(0, V, (2, 16))
    with torch.no_grad():
        own = model(input_ids=ids, output_attentions=True).attentions
    convert_model(model)
    with torch.no_grad():
        caps = capture_qkv(model, ids)
    for layer, (q, k, _, teacher), want in zip(hedgehog_layers(model), caps, own):
        k_rep = k.repeat_interleave(layer.n_rep, 1)
        got = softmax_attention_weights(q, k_rep, scale=teacher.scale, **teacher.masking())
        torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-4)
    kinds = [cap.teacher.masking() for cap in caps]
    expect = {"mistral": [{"sliding_window": 4}] * 2, "qwen2": [{}, {"sliding_window": 4}],
              "gemma2": [{"sliding_window": 4, "softcap": 5.0}, {"softcap": 5.0}],
              "gemma3_text": [{"sliding_window": 4}, {}]}
    assert kinds == expect.get(family, [{}, {}])


@pytest.mark.parametrize("family", FAMILIES)
def test_distillation_loss_is_minimal_at_the_teacher(family):
    """The stage-1 loss of a layer is its teacher's row entropy plus KL(teacher || student) >= 0: a student
    whose rows were the teacher's own would score the entropy, and the real student scores above it."""
    from hedgehog.modules.metrics import row_entropy

    torch.manual_seed(0)
    model = convert_model(tiny(family).eval())
    perturb_maps(model)
    ids = torch.randint(0, V, (1, 20))
    with torch.no_grad():
        caps = capture_qkv(model, ids)
        for layer, (q, k, v, teacher) in zip(hedgehog_layers(model), caps):
            p = softmax_attention_weights(q, k.repeat_interleave(layer.n_rep, 1), scale=teacher.scale,
                                          **teacher.masking())
            floor = row_entropy(p.double()).mean().item()
            assert layer.layer_distill_loss(q, k, v).item() > floor - 1e-6


@pytest.mark.parametrize("attention", ["linear", "hybrid"])
@pytest.mark.parametrize("family", FAMILIES)
def test_cached_greedy_decoding_equals_full_forwards(family, attention):
    torch.manual_seed(0)
    model = convert_model(tiny(family).eval(), HedgehogConfig(attention=attention, window=3))
    perturb_maps(model)
    prompt = torch.randint(0, V, (1, 6))
    out = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    ids = prompt
    with torch.no_grad():
        for _ in range(8):
            ids = torch.cat([ids, model(input_ids=ids, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, ids)


@pytest.mark.parametrize("family", FAMILIES)
def test_softmax_mode_with_padding_is_the_original_model(family):
    torch.manual_seed(0)
    model = tiny(family).eval()
    ids = torch.randint(3, V, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        convert_model(model)
        set_attention_mode(model, "teacher")
        for layer in hedgehog_layers(model):
            layer.start_capture()  # the generic route (not the softmax fast path)
        got = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1, 5:], want[1, 5:], atol=1e-5, rtol=1e-5)


def test_a_llama_layout_family_outside_the_list_converts_without_new_code():
    """Granite (Llama's layout with its own multipliers) is not among the checked families: it converts, its
    teacher is exact, and it decodes from the recurrent state."""
    import transformers as tr

    torch.manual_seed(0)
    cfg = tr.GraniteConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                           attention_multiplier=0.3, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = tr.GraniteForCausalLM(cfg).eval()
    ids = torch.randint(0, V, (1, 10))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    convert_model(model)
    set_attention_mode(model, "teacher")
    for layer in hedgehog_layers(model):
        layer.start_capture()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
    assert hedgehog_layers(model)[0].teacher.scale == pytest.approx(0.3)
    set_attention_mode(model, "student")
    out = model.generate(ids[:, :4], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 8)


def test_a_family_linear_attention_cannot_reproduce_is_refused_before_any_weights(tmp_path, capsys):
    """gpt-oss passes attention sinks to its attention function: refused from its config alone, with the reason."""
    import transformers as tr

    from conftest import user_error

    d = tmp_path / "gptoss"
    tr.GptOssConfig(vocab_size=V, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=8, num_local_experts=2).save_pretrained(d)
    with pytest.raises(UnsupportedArchitectureError, match="s_aux"):
        get_adapter("gpt_oss")
    err = user_error(capsys, ["convert", "--model", str(d), "--out", str(tmp_path / "o"), "--no-progress"])
    assert "gpt_oss" in err and "s_aux" in err and "attention sinks" in err


def test_a_soft_capped_base_loads_with_the_eager_teacher(tmp_path):
    """sdpa has no soft-cap (transformers refuses it there): Gemma2 bases load eager, as teacher and as student."""
    from transformers import AutoModelForCausalLM

    from hedgehog.models.loading import load_base

    tiny("gemma2").save_pretrained(tmp_path / "g2")
    from transformers import PreTrainedTokenizerFast  # a tokenizer for load_base
    from tokenizers import Tokenizer, models

    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
                            ).save_pretrained(tmp_path / "g2")
    model, _, _ = load_base(str(tmp_path / "g2"))
    assert model.config._attn_implementation == "eager"
    convert_model(model).save_pretrained(tmp_path / "c")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "c").config._attn_implementation == "eager"


def test_kv_heads_are_read_from_the_projections_not_a_disagreeing_config():
    """GPT-NeoX has no GQA, but its config may still carry num_key_value_heads; the fused projection decides."""
    from conftest import V, tiny

    torch.manual_seed(0)
    model = tiny("gpt_neox").eval()
    model.config.num_key_value_heads = 2  # disagrees with the 4 heads its query_key_value projects
    for layer in model.gpt_neox.layers:
        layer.attention.config.num_key_value_heads = 2
    ids = torch.randint(0, V, (1, 12))
    with torch.no_grad():
        ref = model(ids).logits
        convert_model(model)
        layers = hedgehog_layers(model)
        assert [(m.num_q_heads, m.num_kv_heads) for m in layers] == [(4, 4), (4, 4)]
        set_attention_mode(model, "teacher")
        assert torch.equal(model(ids).logits, ref)
        set_attention_mode(model, "student")
        assert torch.isfinite(model(ids).logits).all()
    llama = convert_model(tiny("llama").eval())
    assert {(m.num_q_heads, m.num_kv_heads) for m in hedgehog_layers(llama)} == {(4, 2)}  # real GQA kept
