"""Training from scratch and MQAR: models per kind, the mimic loss, data generator, checkpoint/resume, CLI."""
import json
import math
import re

import pytest
import torch
from conftest import user_error

from hedgehog.layers.attention import hedgehog_layers, set_attention_mode
from hedgehog.train.scratch.model import (KINDS, ByteTokenizer, ModelSpec, ShortConv, _mimic_loss, build_model,
                                    mimic_rows_for_step, parse_kinds, set_mimic_rows)
from hedgehog.train.scratch.lm import TrainJob, train_compare, train_lm
from hedgehog.train.scratch.mqar import MQARConfig, mqar_batch

TINY = ModelSpec(vocab_size=ByteTokenizer.vocab_size, d_model=32, layers=2, heads=2, max_len=64, window=8)


def _assert_greedy_generate_matches_full_forwards(model, prompt, steps=6):
    """Greedy ``generate`` through the cache = ``steps`` full forwards without one (the whole sequence each)."""
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=steps, do_sample=False, min_new_tokens=steps)
        seq = prompt
        for _ in range(steps):
            nxt = model(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq)


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "To be, or not to be — that is the question."
    ids = tok(text)["input_ids"]
    assert max(ids) < 256 and tok.eos_token_id == 256
    assert tok.decode(ids + [tok.eos_token_id]) == text


def test_parse_kinds():
    assert parse_kinds("all")[0] == "softmax" and "hedgehog" in parse_kinds("all")
    assert parse_kinds("elu, hybrid") == ["elu", "hybrid"]
    with pytest.raises(ValueError, match="unknown attention kind"):
        parse_kinds("softmax,nope")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_build_model_every_kind(kind, arch):
    m = build_model(kind, ModelSpec(**{**TINY.__dict__, "arch": arch}))
    layers = hedgehog_layers(m)
    assert (len(layers) == 0) == (kind == "softmax")
    ids = torch.randint(0, TINY.vocab_size, (2, 24))
    out = m(input_ids=ids, labels=ids)
    assert torch.isfinite(out.loss)
    if layers:
        assert layers[0].hh_config.feature_map == ("hedgehog" if kind == "hybrid" else kind)
        assert layers[0].hybrid == (kind == "hybrid")


@pytest.mark.parametrize("kind,width", [("hedgehog", 2 * 24), ("hybrid", 2 * 24), ("t2r", 24), ("taylor", None),
                                        ("elu", 16)])
def test_build_model_feature_dim(kind, width):
    """--feature-dim widens the maps that have a projection width; the others keep their own size."""
    m = build_model(kind, ModelSpec(**{**TINY.__dict__, "feature_dim": 24}))
    fm = hedgehog_layers(m)[0].feature_map_q
    assert fm.feature_dim == (width or 1 + 16 + 16 * 17 // 2)  # head_dim 16
    ids = torch.randint(0, TINY.vocab_size, (2, 24))
    assert torch.isfinite(m(input_ids=ids, labels=ids).loss)
    with pytest.raises(ValueError, match="feature_dim must be >= 0"):
        build_model(kind, ModelSpec(**{**TINY.__dict__, "feature_dim": -1}))


@pytest.mark.parametrize("kind", ["hedgehog", "hybrid"])
def test_mimic_mode_same_output_and_loss_trains_only_feature_maps(kind):
    m = build_model(kind, TINY)
    ids = torch.randint(0, TINY.vocab_size, (2, 24))
    set_attention_mode(m, "student")
    ref = m(input_ids=ids).logits
    set_attention_mode(m, "mimic")
    out = m(input_ids=ids).logits
    torch.testing.assert_close(out, ref)  # the student's output, not the teacher's
    loss = _mimic_loss(m)
    assert loss is not None and loss.item() > 0
    assert all(layer.distill_loss is None for layer in hedgehog_layers(m))  # consumed
    loss.backward()
    layer = hedgehog_layers(m)[0]
    assert layer.q_proj.weight.grad is None and layer.k_proj.weight.grad is None  # q/k detached
    assert layer.feature_map_q.weight.grad is not None and layer.feature_map_k.weight.grad.abs().sum() > 0
    if kind == "hybrid":
        assert layer.window_gate.grad is not None
    with torch.no_grad():  # no loss stored when not training
        m(input_ids=ids)
    assert _mimic_loss(m) is None


def test_mimic_rows_for_step_is_a_seeded_sorted_subset():
    a = mimic_rows_for_step(32, 8, seed=0, step=5)
    assert a.shape == (8,) and torch.equal(a, a.sort().values) and len(set(a.tolist())) == 8 and int(a.max()) < 32
    assert torch.equal(a, mimic_rows_for_step(32, 8, seed=0, step=5))  # (seed, step) decide it: resume-safe
    assert not torch.equal(a, mimic_rows_for_step(32, 8, seed=0, step=6))
    assert not torch.equal(a, mimic_rows_for_step(32, 8, seed=1, step=5))
    assert mimic_rows_for_step(32, 0, 0, 0) is None and mimic_rows_for_step(32, 32, 0, 0) is None
    with pytest.raises(ValueError, match="mimic_rows must be >= 0"):
        mimic_rows_for_step(32, -1, 0, 0)


def test_mimic_rows_take_the_loss_over_those_rows_in_float64():
    """With a row subset, each layer's stored mimic loss is the distillation cross-entropy over exactly
    those query rows (each against all the keys it sees), computed here from the layer's own q/k/features."""
    from hedgehog.modules.heads import repeat_heads
    from hedgehog.modules.losses import attention_distillation_loss

    m = build_model("hedgehog", TINY, seed=2).double()
    ids = torch.randint(0, TINY.vocab_size, (2, 24))
    layers = hedgehog_layers(m)
    for layer in layers:
        layer.captured = []
    set_attention_mode(m, "mimic")
    rows = torch.tensor([0, 5, 6, 17, 23])
    set_mimic_rows(m, rows)
    m(input_ids=ids)
    for layer in layers:
        (q, k, _, teacher), = layer.captured
        phi_q, phi_k = layer.features(q, k)
        kr = repeat_heads(k, layer.n_rep)
        want = attention_distillation_loss(q, kr, phi_q, phi_k, causal=True, teacher=teacher, query_index=rows)
        full = attention_distillation_loss(q, kr, phi_q, phi_k, causal=True, teacher=teacher)
        assert layer.distill_loss.dtype == torch.float64
        torch.testing.assert_close(layer.distill_loss, want, rtol=1e-12, atol=1e-12)
        assert abs(layer.distill_loss.item() - full.item()) > 1e-6  # a subset, not every row
        layer.captured = None
    set_mimic_rows(m, torch.tensor([24]))  # past the end of the window
    with pytest.raises(ValueError, match="below the sequence length 24"):
        m(input_ids=ids)


def test_mqar_batch_structure():
    cfg = MQARConfig(vocab_size=64, num_kv_pairs=6, seq_len=40)
    ids, t = mqar_batch(50, cfg, torch.Generator().manual_seed(0))
    assert ids.shape == t.shape == (50, 40)
    for row_ids, row_t in zip(ids, t):
        keys, values = row_ids[0:12:2], row_ids[1:12:2]
        assert len(set(keys.tolist())) == 6 and (keys >= 1).all() and (keys < 32).all()
        assert (values >= 32).all() and (values < 64).all()
        pairs = dict(zip(keys.tolist(), values.tolist()))
        asked = (row_t != -100).nonzero().flatten()
        assert len(asked) == 6 and (asked >= 12).all()
        assert sorted(row_ids[asked].tolist()) == sorted(keys.tolist())  # every key asked once
        for p in asked.tolist():
            assert row_t[p].item() == pairs[row_ids[p].item()]
        rest = torch.ones(40, dtype=torch.bool)
        rest[:12] = False
        rest[asked] = False
        assert (row_ids[rest] == 0).all()


def test_mqar_batch_rejects_bad_settings():
    with pytest.raises(ValueError, match="too small"):
        mqar_batch(1, MQARConfig(vocab_size=8, num_kv_pairs=8, seq_len=64), torch.Generator())
    with pytest.raises(ValueError, match="too short"):
        mqar_batch(1, MQARConfig(vocab_size=64, num_kv_pairs=8, seq_len=16), torch.Generator())


def _job(tmp_path, data, **kw):
    base = dict(out=str(tmp_path / "run"), attention="hedgehog", data=data, seq_len=32, batch_size=2, tokens=4 * 64,
                model=ModelSpec(d_model=32, layers=1, heads=2), eval_points=2, val_tokens=64, test_tokens=64,
                checkpoint_every=2, progress=False, warmup_steps=1)
    base.update(kw)
    return TrainJob(**base)


def test_train_lm_learns_reports_and_checkpoints(tiny_assets, tmp_path):
    job = _job(tmp_path, tiny_assets["data"], tokens=12 * 64, lr=3e-3)
    rep = train_lm(job)
    assert rep["steps"] == 12 and rep["tokens"] == 12 * 64 and rep["device"] == "cpu"
    h = rep["history"]
    assert h[-1]["lm_loss"] < h[0]["lm_loss"]  # it learns
    assert all("mimic_loss" in r for r in h)  # Hedgehog trains with the mimicry term
    assert rep["test_ppl"] > 1 and len(rep["curve"]) >= 2
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)  # the one training-checkpoint format
    assert saved["step"] == 12 and len(saved["extra"]["history"]) == 12
    assert json.loads((tmp_path / "run" / "report.json").read_text())["attention"] == "hedgehog"


@pytest.mark.parametrize("mimic_rows", [0, 8])
def test_train_lm_resume_after_crash_equals_uninterrupted(tiny_assets, tmp_path, monkeypatch, mimic_rows):
    full = train_lm(_job(tmp_path / "a", tiny_assets["data"], mimic_rows=mimic_rows))
    calls = {"n": 0}
    real_step = torch.optim.AdamW.step

    def crashing_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated crash")
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        train_lm(_job(tmp_path / "b", tiny_assets["data"], mimic_rows=mimic_rows))
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    state = torch.load(tmp_path / "b" / "run" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 2  # the checkpoint before the crash
    resumed = train_lm(_job(tmp_path / "b", tiny_assets["data"], resume=True, mimic_rows=mimic_rows))
    assert resumed["steps"] == full["steps"] == 4
    a = torch.load(tmp_path / "a" / "run" / "checkpoint.pt", weights_only=True)["params"]
    b = torch.load(tmp_path / "b" / "run" / "checkpoint.pt", weights_only=True)["params"]
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)
    assert resumed["test_ppl"] == pytest.approx(full["test_ppl"], rel=1e-5)


def test_train_lm_resume_with_other_settings_is_refused_and_a_longer_budget_is_not(tiny_assets, tmp_path):
    from hedgehog.errors import CheckpointError

    train_lm(_job(tmp_path, tiny_assets["data"]))
    with pytest.raises(CheckpointError, match=r"lr: checkpoint 0\.002, now 0\.003"):
        train_lm(_job(tmp_path, tiny_assets["data"], resume=True, lr=3e-3))
    assert train_lm(_job(tmp_path, tiny_assets["data"], resume=True, tokens=6 * 64))["steps"] == 6


def test_train_lm_stops_on_nan(tiny_assets, tmp_path, monkeypatch):
    from hedgehog.errors import TrainingDivergedError
    from hedgehog.train.scratch import model as scratch_model

    monkeypatch.setattr(scratch_model, "_mimic_loss", lambda m: torch.tensor(float("nan")))
    with pytest.raises(TrainingDivergedError, match="not finite.*Lower the learning rate"):
        train_lm(_job(tmp_path, tiny_assets["data"]))


def test_train_compare_and_cli(tiny_assets, tmp_path, capsys):
    from hedgehog.cli import main

    out = tmp_path / "cmp"
    main(["train", "--attention", "softmax,hedgehog,elu", "--out", str(out), "--data", tiny_assets["data"],
          "--tokens", "192", "--seq-len", "32", "--batch-size", "2", "--d-model", "32", "--layers", "1",
          "--heads", "2", "--val-tokens", "64", "--test-tokens", "64", "--eval-points", "1", "--feature-dim", "24",
          "--no-progress"])
    res = json.loads((out / "train_compare.json").read_text())
    assert [r["attention"] for r in res["rows"]] == ["softmax", "hedgehog", "elu"]
    assert [r["feature_dim"] for r in res["rows"]] == [None, 48, 16]  # --feature-dim widens hedgehog only
    assert res["rows"][0]["test_ppl_vs_softmax"] == 1.0
    assert all(r["tokens"] == 192 for r in res["rows"])
    assert (out / "train_compare.png").stat().st_size > 0
    assert (out / "elu" / "report.json").exists()
    # resume skips finished kinds
    rows = train_compare(["softmax"], _job(tmp_path, tiny_assets["data"], tokens=192, resume=True,
                                           eval_points=1), str(out))["rows"]
    assert rows[0]["test_ppl"] == res["rows"][0]["test_ppl"]
    # paired evaluation reloads the final checkpoints: the same test perplexities, ratios with intervals
    main(["paired-eval", "--out", str(out), "--attention", "softmax,hedgehog,elu", "--against", "softmax,hedgehog",
          "--samples", "200", "--block", "2", "--no-progress"])
    pe = json.loads((out / "paired_test.json").read_text())
    for r in res["rows"]:
        assert pe["ppl"][r["attention"]]["ppl"] == pytest.approx(r["test_ppl"], rel=1e-5)
    assert [(p["kind"], p["reference"]) for p in pe["pairs"]] == [
        ("hedgehog", "softmax"), ("elu", "softmax"), ("softmax", "hedgehog"), ("elu", "hedgehog")]
    p0 = pe["pairs"][0]
    assert p0["ratio"] == pytest.approx(pe["ppl"]["hedgehog"]["ppl"] / pe["ppl"]["softmax"]["ppl"], rel=1e-9)
    assert p0["lo"] <= p0["ratio"] <= p0["hi"]
    err = user_error(capsys, ["paired-eval", "--out", str(out), "--attention", "softmax,taylor", "--no-progress"])
    assert re.search("not a finished", err)
    err = user_error(capsys, [
        "paired-eval", "--out", str(out), "--attention", "elu", "--against", "softmax", "--no-progress"])
    assert re.search("not among", err)


def test_mqar_cli(tmp_path, capsys):
    from hedgehog.cli import main

    main(["mqar", "--attention", "softmax,hedgehog", "--out", str(tmp_path), "--vocab-size", "16", "--kv-pairs", "2",
          "--seq-len", "12", "--d-model", "16", "--steps", "3", "--eval-every", "3", "--batch-size", "4",
          "--no-progress"])
    res = json.loads((tmp_path / "mqar.json").read_text())
    assert [r["attention"] for r in res["rows"]] == ["softmax", "hedgehog"]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in res["rows"])
    assert (tmp_path / "mqar.png").exists()
    assert re.search("too small", user_error(capsys, ["mqar", "--vocab-size", "4", "--kv-pairs", "4"]))


@pytest.mark.parametrize("kind,arch", [("softmax", "llama"), ("hedgehog", "llama"), ("hybrid", "llama"),
                                       ("t2r", "gpt2")], ids=lambda x: str(x))
def test_short_conv_starts_as_identity_and_decodes_like_the_full_forward(kind, arch):
    """Identity init: the same logits as the model without it. Then, with trained (random) taps, greedy
    generation through the cache (the conv's tail kept per layer) equals step-by-step full forwards."""
    spec = ModelSpec(**{**TINY.__dict__, "arch": arch})
    plain = build_model(kind, spec, seed=3)
    conv = build_model(kind, ModelSpec(**{**spec.__dict__, "short_conv": 3}), seed=3)
    assert sum(isinstance(m, ShortConv) for m in conv.modules()) == TINY.layers
    ids = torch.randint(0, TINY.vocab_size - 1, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(conv(input_ids=ids).logits, plain(input_ids=ids).logits)
        for m in conv.modules():
            if isinstance(m, ShortConv):
                m.weight.normal_(0, 0.5)
        changed = conv(input_ids=ids).logits
        assert not torch.allclose(changed, plain(input_ids=ids).logits, atol=1e-3)
    _assert_greedy_generate_matches_full_forwards(conv.eval(), ids[:1, :12])


def test_short_conv_rejects_bad_kernel():
    with pytest.raises(ValueError, match="kernel must be >= 1"):
        ShortConv(8, 0, 0)


def test_window_nll_matches_manual_cross_entropy_and_perplexity():
    from hedgehog.eval.fidelity import perplexity, window_nll

    model = build_model("hedgehog", ModelSpec(vocab_size=257, d_model=32, layers=1, heads=2))
    windows = torch.randint(0, 257, (5, 12))
    got = window_nll(model, windows, batch_size=2, progress=False)
    with torch.no_grad():
        logits = model(input_ids=windows).logits
    want = torch.stack([torch.nn.functional.cross_entropy(logits[i, :-1], windows[i, 1:]) for i in range(5)])
    torch.testing.assert_close(got, want.double(), rtol=1e-5, atol=1e-6)
    assert perplexity(model, windows, batch_size=3, progress=False) == pytest.approx(math.exp(want.mean().item()), rel=1e-5)


def test_load_trained_rebuilds_the_trained_model(tiny_assets, tmp_path):
    """A GPT-2 run whose windows are longer than its model setting's max_len (train_lm widens the positions)."""
    from hedgehog.eval.fidelity import perplexity
    from hedgehog.train.scratch.lm import load_trained

    job = _job(tmp_path, tiny_assets["data"], attention="elu", model=ModelSpec(d_model=32, layers=1, heads=2,
                                                                                   max_len=16, arch="gpt2"))
    rep = train_lm(job)
    model, loaded = load_trained(tmp_path / "run")
    assert loaded["test_ppl"] == rep["test_ppl"]
    from hedgehog.data.corpora import load_corpus, tokenize_windows

    test = tokenize_windows(load_corpus(tiny_assets["data"]).splits["test"], ByteTokenizer(), 32, max_tokens=64)
    assert perplexity(model, test, batch_size=16, progress=False) == pytest.approx(rep["test_ppl"], rel=1e-5)


@pytest.mark.parametrize("kind", ["softmax", "hedgehog", "taylor"])
def test_no_rope_is_position_free_and_decodes_like_the_full_forward(kind):
    """rope=False: logits no longer depend on where the window starts. With RoPE Hedgehog's do (its kernel is
    not a function of q.k, so a shift of every position changes it). Decoding through the cache equals full
    forwards."""
    ids = torch.randint(0, TINY.vocab_size - 1, (1, 20))
    pos = torch.arange(20)[None]
    nope = build_model(kind, ModelSpec(**{**TINY.__dict__, "rope": False, "short_conv": 3}), seed=1).eval()
    rope = build_model(kind, ModelSpec(**{**TINY.__dict__, "short_conv": 3}), seed=1).eval()
    with torch.no_grad():
        for m in (nope, rope):  # q/k large enough for the rotation to matter
            for name, p in m.named_parameters():
                if name.endswith(("q_proj.weight", "k_proj.weight")):
                    p.mul_(4.0)
        torch.testing.assert_close(nope(input_ids=ids, position_ids=pos + 50).logits,
                                   nope(input_ids=ids, position_ids=pos).logits, rtol=0, atol=1e-5)
        if kind == "hedgehog":  # absolute positions: a shift changes the output
            shift = (rope(input_ids=ids, position_ids=pos + 50).logits - rope(input_ids=ids, position_ids=pos).logits)
            assert shift.abs().max() > 1e-3
        assert not torch.allclose(nope(input_ids=ids).logits, rope(input_ids=ids).logits, atol=1e-3)
    _assert_greedy_generate_matches_full_forwards(nope, ids[:, :12])
    with pytest.raises(ValueError, match="applies to arch 'llama'"):
        build_model(kind, ModelSpec(**{**TINY.__dict__, "rope": False, "arch": "gpt2"}))


def test_taylor_dim_projects_and_decodes_like_the_full_forward():
    """taylor_dim 3 (F = 10): prompts shorter than F must not take the unprojected closed-form kernel, so
    generation (prefill + recurrent steps) equals full forwards through the features."""
    spec = ModelSpec(**{**TINY.__dict__, "taylor_dim": 3})
    m = build_model("taylor", spec, seed=2).eval()
    fm = hedgehog_layers(m)[0].feature_map_q
    assert fm.feature_dim == 10 and fm.weight.shape == (TINY.heads, TINY.d_model // TINY.heads, 3)
    assert hedgehog_layers(build_model("hedgehog", spec))[0].feature_map_q.feature_dim == 32  # others keep theirs
    _assert_greedy_generate_matches_full_forwards(m, torch.randint(0, TINY.vocab_size - 1, (1, 8)))
    layer = hedgehog_layers(m)[0]
    assert not layer._kernel_form(4)
    with pytest.raises(ValueError, match="taylor_dim must be >= 0"):
        build_model("taylor", ModelSpec(**{**TINY.__dict__, "taylor_dim": -1}))


def test_train_cli_rejects_no_rope_on_gpt2_and_negative_widths_and_rows(capsys):
    from hedgehog.cli import main

    assert re.search("--no-rope applies to --arch llama", user_error(capsys, ["train", "--arch", "gpt2", "--no-rope"]))
    assert re.search("must be >= 0", user_error(capsys, ["train", "--attention", "taylor", "--taylor-dim", "-2"]))
    err = user_error(capsys, ["train", "--attention", "hedgehog", "--mimic-rows", "-1"])
    assert re.search("mimic_rows must be >= 0", err)


def test_resolve_device_names_the_problem_and_the_fix(monkeypatch):
    from hedgehog.train import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown device 'gpu'.*'auto', 'cpu', 'cuda'"):
        resolve_device("gpu")
    with pytest.raises(ValueError, match="runs on 'cpu' or 'cuda'"):
        resolve_device("meta")
    # a machine without CUDA (this one, or a GPU one pretending): the message says what to pass instead
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="sees no CUDA device.*--device cpu"):
        resolve_device("cuda:0")


def test_cli_device_is_checked_before_any_work(tmp_path, monkeypatch, capsys):
    from hedgehog.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for cmd in (["train", "--out", str(tmp_path / "t")], ["mqar", "--out", str(tmp_path / "m")],
                ["paired-eval", "--out", str(tmp_path / "p")]):
        assert re.search("sees no CUDA device", user_error(capsys, [*cmd, "--device", "cuda"]))
    assert not any(tmp_path.iterdir())  # nothing was started


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["hedgehog", "taylor", "softmax", "hybrid"])
def test_train_lm_on_cuda_matches_the_cpu_run_and_resumes_on_the_cpu(tiny_assets, tmp_path, kind):
    """Same init and data on both devices: the first step's loss agrees to rounding, the run ends near the CPU
    run, its checkpoint reloads on the CPU with the same test perplexity, and paired-eval runs on CUDA."""
    from hedgehog.train.scratch.lm import load_trained, paired_eval

    kw = dict(attention=kind, model=ModelSpec(d_model=32, layers=1, heads=2, max_len=64, window=8, short_conv=4))
    run = str(tmp_path / "gpu" / kind)
    cpu = train_lm(_job(tmp_path / "cpu", tiny_assets["data"], device="cpu", **kw))
    gpu = train_lm(_job(tmp_path, tiny_assets["data"], device="cuda", out=run, **kw))
    assert gpu["device"].startswith("cuda") and cpu["device"] == "cpu"
    assert gpu["history"][0]["lm_loss"] == pytest.approx(cpu["history"][0]["lm_loss"], rel=1e-3)
    assert gpu["test_ppl"] == pytest.approx(cpu["test_ppl"], rel=0.05)
    model, rep = load_trained(run, device="cpu")
    assert next(model.parameters()).device.type == "cpu"
    res = paired_eval(str(tmp_path / "gpu"), [kind], [kind], progress=False, device="cuda")
    assert res["ppl"][kind]["ppl"] == pytest.approx(gpu["test_ppl"], rel=1e-4)
    # resume the CUDA run's checkpoint on the CPU with a larger budget
    more = train_lm(_job(tmp_path, tiny_assets["data"], device="cpu", out=run, resume=True, tokens=6 * 64, **kw))
    assert more["steps"] == 6 and more["device"] == "cpu"
