"""Evaluation against float64 references: fidelity (ratio, agreement, KL) and perplexity."""
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hedgehog.eval.fidelity import fidelity, perplexity, teacher_mode
from hedgehog.layers.attention import set_attention_mode
from hedgehog.models.convert import convert_model


def peaky_converted(seed=0):
    """A tiny converted Llama whose teacher and student disagree clearly (large logits, sharp attention)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    m = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(8.0)
    return convert_model(m).eval()


def reference(model, windows):
    """The same figures spelled out in float64 from the two models' full logits."""
    with torch.no_grad():
        with teacher_mode(model):
            t = model(input_ids=windows).logits[:, :-1].double()
        s = model(input_ids=windows).logits[:, :-1].double()
    lt, ls = t.log_softmax(-1), s.log_softmax(-1)
    y = windows[:, 1:]
    nt = -lt.gather(-1, y[..., None]).mean().item()
    ns = -ls.gather(-1, y[..., None]).mean().item()
    kl = (lt.exp() * (lt - ls)).sum(-1).mean().item()
    agree = (t.argmax(-1) == s.argmax(-1)).double().mean().item()
    return math.exp(nt), math.exp(ns), agree, kl


@pytest.mark.parametrize("rows", [128, 5])  # each window in one tally, or 5 positions at a time (16 = 3 * 5 + 1)
def test_fidelity_equals_the_float64_reference(rows, monkeypatch):
    import hedgehog.eval.fidelity as fid

    monkeypatch.setattr(fid, "TALLY_ROWS", rows)
    model = peaky_converted()
    w = torch.randint(0, 50, (5, 17), generator=torch.Generator().manual_seed(1))
    f = fidelity(model, w, batch_size=2, progress=False)
    t_ppl, s_ppl, agree, kl = reference(model, w)
    assert f["teacher_ppl"] == pytest.approx(t_ppl, rel=1e-5)
    assert f["student_ppl"] == pytest.approx(s_ppl, rel=1e-5)
    assert f["ppl_ratio"] == pytest.approx(s_ppl / t_ppl, rel=1e-5)
    assert f["top1_agreement"] == pytest.approx(agree) and 0.05 < agree < 0.99  # a real disagreement
    assert f["kl_per_token"] == pytest.approx(kl, rel=1e-4) and kl > 0.01
    assert f["tokens"] == 5 * 16


def test_teacher_of_a_converted_model_is_the_original_model():
    model = peaky_converted()
    w = torch.randint(0, 50, (3, 12), generator=torch.Generator().manual_seed(2))
    f = fidelity(model, w, progress=False)
    set_attention_mode(model, "teacher")
    assert f["teacher_ppl"] == pytest.approx(perplexity(model, w, progress=False), rel=1e-6)
    set_attention_mode(model, "student")
    assert f["student_ppl"] == pytest.approx(perplexity(model, w, progress=False), rel=1e-6)


def test_teacher_mode_turns_a_lora_adapter_off():
    from hedgehog.train.stage2 import Stage2Config, add_lora

    model = peaky_converted()
    w = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), teacher_mode(model):
        plain_teacher = model(input_ids=w).logits
    pm = add_lora(model, Stage2Config(lora_r=2))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_()  # a non-zero adapter
        with teacher_mode(pm):
            teacher = pm(input_ids=w).logits
        student_with_adapter = pm(input_ids=w).logits
    torch.testing.assert_close(teacher, plain_teacher)
    with torch.no_grad(), pm.disable_adapter():
        assert not torch.allclose(student_with_adapter, pm(input_ids=w).logits)


def test_teacher_mode_and_captures_restore_the_mode_they_found():
    from hedgehog.layers.attention import attention_mode, hedgehog_layers
    from hedgehog.layers.capture import capture_qkv

    model = peaky_converted()
    modes = lambda: {m.mode for m in hedgehog_layers(model)}
    w = torch.randint(0, 50, (1, 10))
    set_attention_mode(model, "mimic")
    with teacher_mode(model):
        assert modes() == {"teacher"}
    assert modes() == {"mimic"}  # the mode it found, not "student"
    capture_qkv(model, w)
    assert modes() == {"mimic"}  # was left in softmax mode
    with pytest.raises(RuntimeError, match="boom"), attention_mode(model, "baseline"):
        assert modes() == {"baseline"}
        raise RuntimeError("boom")
    assert modes() == {"mimic"}
    set_attention_mode(model, "student")


def test_eval_batches_is_the_one_loop_and_restores_the_mode():
    import torch.nn as nn

    from hedgehog.eval.fidelity import eval_batches

    m = nn.Linear(2, 2).train()
    a, b = torch.arange(10).view(5, 2), torch.arange(5)
    seen = []
    for x, y in eval_batches(m, a, b, batch_size=2):
        assert not m.training
        seen.append((x.tolist(), y.tolist()))
    assert m.training and [len(y) for _, y in seen] == [2, 2, 1]
    assert torch.equal(torch.tensor(sum((x for x, _ in seen), [])), a)
    with pytest.raises(RuntimeError, match="boom"):
        for _ in eval_batches(m, a, batch_size=3):
            raise RuntimeError("boom")
    assert m.training  # back in training mode after an error mid-loop
