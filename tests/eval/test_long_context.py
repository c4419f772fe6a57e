"""Long-context evaluation: the window + sinks baseline, fidelity at several lengths, passkey retrieval."""
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hedgehog.eval.long_context import (context_fidelity, context_lengths, baseline_forward, passkey_hit, passkey_prompt,
                                   passkey_scores, passkey_trials, window_mask)


def tiny_llama(layers=2, attn="sdpa", dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    cfg._attn_implementation = attn
    m = LlamaForCausalLM(cfg).to(dtype).eval()
    with torch.no_grad():  # sharper attention, so a mask changes the logits clearly
        for name, p in m.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                p.mul_(4.0)
    return m


def forward(model):
    return lambda ids, attention_mask=None, keep=0: model(input_ids=ids, attention_mask=attention_mask,
                                                          use_cache=False).logits


def baseline_of(model, window, sinks=4):
    return baseline_forward(forward(model), model.config, window, sinks)


def manual_masked_teacher(model, ids, window, sinks):
    """Float64 reference of the baseline: the model's layers run by hand with an explicit masked softmax."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    inner = model.model
    h = inner.embed_tokens(ids)
    n = ids.shape[1]
    pos = torch.arange(n)[None]
    cos, sin = inner.rotary_emb(h, pos)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    allowed = (j <= i) & ((i - j < window) | (j < sinks))
    for layer in inner.layers:
        a = layer.self_attn
        x = layer.input_layernorm(h)
        B = x.shape[0]
        q = a.q_proj(x).view(B, n, -1, a.head_dim).transpose(1, 2)
        k = a.k_proj(x).view(B, n, -1, a.head_dim).transpose(1, 2)
        v = a.v_proj(x).view(B, n, -1, a.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        s = (q @ k.transpose(-1, -2)) * a.head_dim ** -0.5
        p = s.masked_fill(~allowed, float("-inf")).softmax(-1)
        y = (p @ v).transpose(1, 2).reshape(B, n, -1)
        h = h + a.o_proj(y)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.lm_head(inner.norm(h))


def test_window_mask_is_causal_window_plus_sinks():
    m = window_mask(9, window=3, sinks=2)[0, 0]
    add = window_mask(9, window=3, sinks=2, dtype=torch.float32)[0, 0]
    for i in range(9):
        for j in range(9):
            assert bool(m[i, j]) == (j <= i and (i - j < 3 or j < 2))
            assert add[i, j] == (0.0 if m[i, j] else torch.finfo(torch.float32).min)


def test_the_baseline_refuses_flash_attention_with_the_fix():
    model = tiny_llama()
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        baseline_of(model, 4)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_baseline_equals_the_teacher_with_a_window_mask_float64(attn):
    model = tiny_llama(attn=attn)
    ids = torch.randint(0, 50, (2, 23), generator=torch.Generator().manual_seed(0))
    got = baseline_of(model, 4, 2)(ids)
    ref = manual_masked_teacher(model, ids, 4, 2)
    # eager takes its softmax in float32 even for float64 inputs; a wrong mask moves the logits by > 1e-3
    assert (got - ref).abs().max() < (1e-10 if attn == "sdpa" else 1e-6)
    full = forward(model)(ids)
    assert (got - full).abs().max() > 1e-3  # the mask really restricts the teacher


def test_baseline_forgets_tokens_between_the_sinks_and_the_window():
    """With L layers and window w, a token outside the sinks reaches at most L * (w - 1) positions ahead."""
    model = tiny_llama(layers=2)
    ids = torch.randint(0, 50, (1, 30), generator=torch.Generator().manual_seed(3))
    ids2 = ids.clone()
    ids2[0, 6] = (ids[0, 6] + 1) % 50
    base = baseline_of(model, 4, 2)
    a, b = base(ids), base(ids2)
    reach = 6 + 2 * 3
    assert (a[0, reach + 1:] - b[0, reach + 1:]).abs().max() < 1e-12
    assert (a[0, 6:reach + 1] - b[0, 6:reach + 1]).abs().max() > 1e-6
    ids3 = ids.clone()
    ids3[0, 1] = (ids[0, 1] + 1) % 50  # a sink token is seen from everywhere
    c = base(ids3)
    assert (a[0, -1] - c[0, -1]).abs().max() > 1e-6


@pytest.mark.parametrize("rows", [512, 4])  # one tally for the window, or 4 positions at a time (19 = 4 * 4 + 3)
def test_context_fidelity_matches_float64_reference_and_a_full_window_baseline_is_the_teacher(rows, monkeypatch):
    import hedgehog.eval.fidelity as fid

    monkeypatch.setattr(fid, "TALLY_ROWS", rows)
    teacher = tiny_llama()
    student = tiny_llama(seed=1)
    w = torch.randint(0, 50, (3, 20), generator=torch.Generator().manual_seed(2))
    r = context_fidelity(forward(student), forward(teacher), baseline_of(teacher, 5, 1), w)
    with torch.no_grad():
        lt = forward(teacher)(w)[:, :-1].log_softmax(-1)
        ls = forward(student)(w)[:, :-1].log_softmax(-1)
        lb = forward(teacher)(w, attention_mask=window_mask(20, 5, 1))[:, :-1].log_softmax(-1)
    y = w[:, 1:, None]
    t_nll = -lt.gather(-1, y).mean().item()
    for name, lp in (("student", ls), ("baseline", lb)):
        nll = -lp.gather(-1, y).mean().item()
        assert r[name]["ppl"] == pytest.approx(math.exp(nll), rel=1e-6)
        assert r[name]["ppl_ratio"] == pytest.approx(math.exp(nll - t_nll), rel=1e-6)
        assert r[name]["top1_agreement"] == pytest.approx((lt.argmax(-1) == lp.argmax(-1)).double().mean().item())
        assert r[name]["kl_per_token"] == pytest.approx((lt.exp() * (lt - lp)).sum(-1).mean().item(), rel=1e-5)
    assert r["teacher_ppl"] == pytest.approx(math.exp(t_nll), rel=1e-6)
    assert r["baseline"]["kl_per_token"] > 1e-4 and r["tokens"] == 3 * 19
    full = context_fidelity(forward(student), forward(teacher), baseline_of(teacher, 20, 0), w)
    assert full["baseline"]["ppl_ratio"] == pytest.approx(1.0, abs=1e-9)
    assert full["baseline"]["top1_agreement"] == 1.0


def test_context_lengths_stop_at_the_model_maximum():
    assert context_lengths(8192) == [512, 2048, 4096, 8192]
    assert context_lengths(32768) == [512, 2048, 4096, 8192]
    assert context_lengths(3000) == [512, 2048, 3000]
    assert context_lengths(2048) == [512, 2048]
    assert context_lengths(None, (1024, 512)) == [512, 1024]


class DigitTokenizer:
    """Characters as tokens (enough for the prompt builder): ids are code points."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_passkey_prompt_places_the_key_at_its_depth_beyond_the_window():
    tok = DigitTokenizer()
    for depth in (0.0, 0.5, 1.0):
        prompt, answer = passkey_prompt(tok, 2000, depth, "12345", min_distance=300)
        text = "".join(map(chr, prompt.tolist()))
        assert prompt.numel() + answer.numel() <= 2000 and prompt.numel() > 1800
        at = text.index("The pass key is 12345")
        assert len(text) - at >= 300
        assert "".join(map(chr, answer.tolist())) == " 12345"
    shallow = passkey_prompt(tok, 2000, 0.1, "12345")[0]
    deep = passkey_prompt(tok, 2000, 0.9, "12345")[0]
    idx = lambda p: "".join(map(chr, p.tolist())).index("12345")
    assert idx(shallow) < idx(deep)
    with pytest.raises(ValueError, match="too short"):
        passkey_prompt(tok, 300, 0.5, "12345", min_distance=280)


def oracle(ids, keep=0):
    """Predicts every next token correctly (it reads the input one step ahead): a model that must pass."""
    return torch.nn.functional.one_hot(torch.roll(ids, -1, 1), 256).float()


def test_passkey_scorer_passes_a_model_that_reads_the_key_and_fails_one_that_does_not():
    tok = DigitTokenizer()
    cases = passkey_trials(tok, 1500, 4, seed=1, min_distance=100)
    assert len({c["key"] for c in cases}) == 4
    assert all(passkey_hit(oracle, c["prompt"], c["answer"]) for c in cases)
    constant = lambda ids, keep=0: torch.zeros(1, ids.shape[1], 256)
    assert not any(passkey_hit(constant, c["prompt"], c["answer"]) for c in cases)
    off_by_one = lambda ids, keep=0: torch.nn.functional.one_hot(
        torch.roll(ids, -1, 1).clamp_max(254) + (torch.arange(ids.shape[1]) == ids.shape[1] - 2).long(), 256).float()
    assert not any(passkey_hit(off_by_one, c["prompt"], c["answer"]) for c in cases)  # last digit wrong
    res = passkey_scores({"teacher": oracle, "student": constant}, tok, lengths=(1500,), trials=4, min_distance=100)
    assert res[1500]["teacher"] == 4 and res[1500]["student"] == 0
    assert res[1500]["teacher_hits"] == [True] * 4 and res[1500]["depths"] == [0.125, 0.375, 0.625, 0.875]


def test_window_softmax_op_equals_masked_softmax_float64():
    from hedgehog.ops import softmax_attention, window_softmax_attention

    q, k, v = (torch.randn(2, 3, 45, 8, dtype=torch.float64) for _ in range(3))
    i, j = torch.arange(45)[:, None], torch.arange(45)[None, :]
    allowed = (j <= i) & ((i - j < 6) | (j < 3))
    s = (q @ k.transpose(-1, -2)) * 8 ** -0.5
    want = s.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            got = window_softmax_attention(q.clone().requires_grad_(grad), k, v, 6, 3)
        torch.testing.assert_close(got.detach(), want, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(window_softmax_attention(q, k, v, 45), softmax_attention(q, k, v, causal=True),
                               atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("lora", [False, True])
def test_a_converted_models_window_mode_is_the_masked_teacher_float64(lora):
    """The fast baseline (the converted model's window mode, adapter off) equals the teacher with the mask."""
    from hedgehog.eval.long_context import model_forwards, window_mode_baseline
    from hedgehog.layers.attention import HedgehogConfig
    from hedgehog.models.convert import convert_model

    teacher = tiny_llama()
    converted = convert_model(tiny_llama(), HedgehogConfig(attention="hybrid", window=4, sinks=2, state_decay=0.9))
    if lora:
        from peft import LoraConfig, get_peft_model

        converted = get_peft_model(converted, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    ids = torch.randint(0, 50, (1, 37), generator=torch.Generator().manual_seed(4))
    fast = window_mode_baseline(converted, 5, 3)
    want = baseline_of(teacher, 5, 3)(ids)
    torch.testing.assert_close(fast(ids), want, atol=1e-10, rtol=1e-9)
    student, _ = model_forwards(converted)
    assert (student(ids) - want).abs().max() > 1e-3  # the student (hybrid, maybe LoRA) is not the baseline
    assert all(m.mode == "student" for m in converted.modules() if hasattr(m, "baseline"))


@pytest.mark.parametrize("lora", [False, True])
def test_forwards_keep_the_last_logits_the_passkey_needs(lora):
    """``keep=k`` gives the last k positions' logits, equal to the full forward's (the LM head runs on those only),
    for the student, the teacher (the model in teacher mode, or a separate base) and both baselines."""
    from hedgehog.eval.long_context import model_forwards, window_mode_baseline
    from hedgehog.layers.attention import HedgehogConfig
    from hedgehog.models.convert import convert_model

    teacher = tiny_llama()
    converted = convert_model(tiny_llama(), HedgehogConfig(attention="hybrid", window=4, sinks=2, state_decay=0.9))
    if lora:
        from peft import LoraConfig, get_peft_model

        converted = get_peft_model(converted, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    ids = torch.randint(0, 50, (1, 29), generator=torch.Generator().manual_seed(5))
    student, teach = model_forwards(converted)
    _, separate = model_forwards(converted, teacher)
    for fn in (student, teach, separate, window_mode_baseline(converted, 5, 2), baseline_forward(separate, teacher.config, 5, 2)):
        full, last = fn(ids), fn(ids, keep=6)
        assert last.shape[1] == 6
        torch.testing.assert_close(last, full[:, -6:], atol=1e-12, rtol=1e-10)


def test_reports_show_the_passkey_of_teacher_and_student_and_why_not_the_baseline(tmp_path):
    from hedgehog.eval.report import format_long_context, plot_long_context
    from hedgehog.models.modelcard import _long_context_rows

    side = lambda ratio: {"ppl": 20.0 * ratio, "ppl_ratio": ratio, "top1_agreement": 0.75, "kl_per_token": 0.2}
    fid = {"length": 512, "tokens": 511, "teacher_ppl": 20.0, "student": side(1.13), "baseline": side(1.27)}
    r = {"window": 64, "sinks": 4, "texts": {"git-docs": {"512": fid}},
         "mean": {"512": {"student": side(1.13), "baseline": side(1.27), "texts": 1}},
         "passkey": {"1024": {"trials": 8, "teacher": 8, "student": 3}, "2048": {"trials": 8, "teacher": 7, "student": 0}}}
    text = format_long_context(r)
    assert "1.13x | 1.27x" in text
    assert "     8/8     7/8" in text and "     3/8     0/8" in text and "not run" in text
    card = "\n".join(_long_context_rows(r))
    assert "| teacher | 8/8 | 7/8 |" in card and "| this model | 3/8 | 0/8 |" in card and "not run" in card
    plot_long_context(r, tmp_path / "lc.png")
    assert (tmp_path / "lc.png").stat().st_size > 1000
