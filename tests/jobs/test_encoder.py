"""BERT (bidirectional) conversion and the finetuned-encoder pipeline, on tiny random models."""
import json

import pytest
import torch

from conftest import tiny_bert
from hedgehog.layers.attention import HedgehogConfig, hedgehog_layers, set_attention_mode
from hedgehog.models.convert import convert_model
from hedgehog.ops import quadratic_linear_attention


def test_softmax_mode_is_the_original_bert_with_padding():
    m = tiny_bert()
    ids = torch.randint(0, 60, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    ref = m(input_ids=ids, attention_mask=mask).logits
    convert_model(m, HedgehogConfig())
    assert all(not layer.causal for layer in hedgehog_layers(m))
    set_attention_mode(m, "teacher")
    torch.testing.assert_close(m(input_ids=ids, attention_mask=mask).logits, ref, rtol=0, atol=0)
    from hedgehog.layers.capture import capture_qkv

    caps = capture_qkv(m, ids)  # the capturing softmax path (the model's attention function) agrees too
    assert len(caps) == 2 and caps[0][0].shape == (2, 4, 12, 8)


def test_bidirectional_layer_equals_float64_reference():
    m = tiny_bert(dtype=torch.float64)
    convert_model(m, HedgehogConfig())
    layer = hedgehog_layers(m)[0]
    with torch.no_grad():  # a non-identity map, so the check is not trivially symmetric
        layer.feature_map_q.weight.add_(0.3 * torch.randn_like(layer.feature_map_q.weight))
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    y, _ = layer(x)
    q, k, v = layer.adapter.qkv(layer, x, {})
    phi_q, phi_k = layer.features(q, k)
    ref = quadratic_linear_attention(phi_q, phi_k, v, causal=False)  # every query sees every key
    torch.testing.assert_close(y, ref.transpose(1, 2).reshape(2, 10, 32), rtol=1e-10, atol=1e-12)
    # a late token changes an early output (not causal)
    x2 = x.clone()
    x2[:, -1] += 1.0
    assert not torch.allclose(layer(x2)[0][:, 0], y[:, 0])


def test_padding_keys_are_ignored_in_linear_mode():
    m = tiny_bert()
    convert_model(m, HedgehogConfig())
    set_attention_mode(m, "student")
    ids = torch.randint(5, 60, (1, 9))
    short = m(input_ids=ids).logits
    padded_ids = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 9), torch.zeros(1, 4)], 1).long()
    padded = m(input_ids=padded_ids, attention_mask=mask).logits
    torch.testing.assert_close(padded, short, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernel_form", [True, False], ids=["kernel", "features"])
def test_taylor_encoder_kernel_form_and_padding(kernel_form, monkeypatch):
    """Taylor's closed-form kernel (short N) and its feature form agree, padding keys ignored in both."""
    from hedgehog.layers import student as attn_mod

    m = tiny_bert(dtype=torch.float64)
    convert_model(m, HedgehogConfig(feature_map="taylor"))
    set_attention_mode(m, "student")
    layer = hedgehog_layers(m)[0]
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    q, k, v = layer.adapter.qkv(layer, x, {})
    phi_q, phi_k = layer.features(q, k)
    ref = quadratic_linear_attention(phi_q, phi_k, v, causal=False)
    if not kernel_form:
        monkeypatch.setattr(attn_mod.StudentPaths, "_kernel_form", lambda self, n: False)
    calls = []
    real = attn_mod.kernel_linear_attention
    monkeypatch.setattr(attn_mod, "kernel_linear_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    y, _ = layer(x)
    assert len(calls) == (1 if kernel_form else 0)
    torch.testing.assert_close(y, ref.transpose(1, 2).reshape(2, 10, 32), rtol=1e-10, atol=1e-12)
    ids = torch.randint(5, 60, (1, 9))
    short = m(input_ids=ids).logits
    padded = m(input_ids=torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1),
               attention_mask=torch.cat([torch.ones(1, 9), torch.zeros(1, 4)], 1).long()).logits
    torch.testing.assert_close(padded, short, rtol=1e-9, atol=1e-10)


def test_hybrid_is_refused_for_encoders():
    with pytest.raises(ValueError, match="causal only"):
        convert_model(tiny_bert(), HedgehogConfig(attention="hybrid"))


def test_bidirectional_stage1_lowers_the_noncausal_kl():
    from hedgehog.eval.fidelity import layer_attention_kl
    from hedgehog.train.stage1 import Stage1Config, attention_transfer

    m = tiny_bert()
    convert_model(m, HedgehogConfig())
    with torch.no_grad():  # make the teacher's attention peaked, so there is something to learn
        for layer in hedgehog_layers(m):
            layer.query.weight.mul_(4)
    ids = torch.randint(0, 60, (8, 16))
    before = sum(d["kl"] for d in layer_attention_kl(m, ids[:2]))
    attention_transfer(m, ids, Stage1Config(tokens=8 * 16 * 6, batch_size=8, lr=3e-2), progress=False)
    after = sum(d["kl"] for d in layer_attention_kl(m, ids[:2]))
    assert after < 0.8 * before


@pytest.fixture(scope="module")
def encoder_assets(tmp_path_factory):
    """A tiny BERT with a word-level tokenizer ([CLS]/[SEP]) and a fake play folder covering every genre."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from hedgehog.jobs.encoder import GENRES

    root = tmp_path_factory.mktemp("enc")
    words = {g: [f"{g}{i}" for i in range(8)] for g in GENRES}
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}
    for ws in words.values():
        for w in ws:
            vocab[w] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                  sep_token="[SEP]")
    m = tiny_bert(vocab=len(vocab))
    m.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    texts = root / "texts"
    texts.mkdir()
    g = torch.Generator().manual_seed(0)
    for genre, plays in GENRES.items():
        for play in plays:  # each genre has its own words: a learnable task
            idx = torch.randint(0, 8, (200,), generator=g).tolist()
            (texts / f"{play}_gut.txt").write_text(" ".join(words[genre][i] for i in idx))
    return {"model": str(root / "model"), "texts": str(texts), "tok": tok}


def test_genre_dataset_splits_are_disjoint_passages(encoder_assets):
    from hedgehog.jobs.encoder import GENRES, genre_dataset

    d = genre_dataset(encoder_assets["texts"], encoder_assets["tok"], seq_len=18)
    n_plays = sum(len(p) for p in GENRES.values())
    total = sum(len(v) for v in d.splits.values())
    assert total == n_plays * (200 // 16)  # every play cut into passages of 16 words + [CLS]/[SEP]
    for s, x in d.splits.items():
        assert x.shape[1] == 18 and (x[:, 0] == 2).all() and (x[:, -1] == 3).all()
        assert set(d.labels[s].tolist()) == {0, 1, 2}  # every genre in every split
    rows = {s: {tuple(r) for r in x.tolist()} for s, x in d.splits.items()}
    assert not rows["train"] & rows["test"] and not rows["validation"] & rows["test"]


def test_encoder_pipeline_end_to_end(encoder_assets, tmp_path):
    from hedgehog.cli import main
    from hedgehog.jobs.encoder import load_encoder

    out = tmp_path / "enc"
    main(["convert-encoder", "--model", encoder_assets["model"], "--out", str(out), "--feature-maps", "hedgehog,elu",
          "--seq-len", "18", "--batch-size", "8", "--teacher-steps", "80", "--teacher-lr", "1e-2",
          "--stage1-tokens", "576", "--stage1-batch", "4", "--stage2-steps", "10", "--stage2-lr", "1e-3",
          "--no-progress"] + ["--texts", encoder_assets["texts"]])
    rep = json.loads((out / "report.json").read_text())
    assert rep["teacher_accuracy"] > 0.9  # the task is learnable by the softmax classifier
    assert [r["feature_map"] for r in rep["rows"]] == ["hedgehog", "elu"]
    for r in rep["rows"]:
        assert r["accuracy_recovery"] == pytest.approx(r["accuracy"] / rep["teacher_accuracy"])
        assert -1 <= r["embedding_cosine"] <= 1 and r["reload_max_abs_logit_diff"] < 1e-5
    hh = rep["rows"][0]
    assert hh["mean_kl_after"] < hh["mean_kl_before"]
    model = load_encoder(out / "hedgehog" / "model")
    assert len(hedgehog_layers(model)) == 2
    from hedgehog.models.formats import saved_format

    assert saved_format(out / "hedgehog" / "model") == "hf"  # the one converted-model format
    # resume reuses the finetuned teacher (same teacher accuracy, no second finetune)
    main(["convert-encoder", "--model", encoder_assets["model"], "--out", str(out), "--feature-maps", "elu",
          "--seq-len", "18", "--teacher-steps", "30", "--stage1-tokens", "0", "--stage2-steps", "1", "--resume",
          "--no-progress", "--texts", encoder_assets["texts"]])
    rep2 = json.loads((out / "report.json").read_text())
    assert rep2["teacher_accuracy"] == rep["teacher_accuracy"]
