"""Bad input stops before any heavy work with one paragraph that names the problem and the fix (exit 2)."""
import json
import shutil

import pytest
import torch
from conftest import other_base_model, user_error


@pytest.fixture
def no_heavy_work(monkeypatch):
    """Fails the test if the job gets as far as its first perplexity pass (the teacher evaluation)."""
    import hedgehog.eval.fidelity

    def boom(*a, **kw):
        raise AssertionError("heavy work started before the input was checked")

    monkeypatch.setattr(hedgehog.eval.fidelity, "perplexity", boom)


def convert_error(capsys, tiny_assets, tmp_path, *args, model=None, data=None):
    return user_error(capsys, ["convert", "--model", model or tiny_assets["model"], "--data", data or tiny_assets["data"],
                               "--eval-data", tiny_assets["heldout"],
                               "--out", str(tmp_path / "out"), "--seq-len", "32", "--no-progress", *args])


@pytest.mark.parametrize("args, says", [
    (["--window", "0"], "--window must be a positive number"),
    (["--seq-len", "0"], "--seq-len must be a positive number"),
    (["--stage1-batch", "0"], "--stage1-batch must be a positive number"),
    (["--stage2-lr", "-1"], "--stage2-lr must be a positive number"),
    (["--eval-tokens", "0"], "--eval-tokens must be a positive number"),
    (["--stage1-minutes", "-2"], "--stage1-minutes must be > 0"),
    (["--seq-len", "512"], "longer than the 256 positions"),
])
def test_bad_numbers(args, says, capsys, tiny_assets, tmp_path, no_heavy_work):
    assert says in convert_error(capsys, tiny_assets, tmp_path, *args)


def test_bad_model_paths(capsys, tiny_assets, tmp_path, no_heavy_work):
    assert "does not exist" in convert_error(capsys, tiny_assets, tmp_path, model=str(tmp_path / "nope"))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no config.json" in convert_error(capsys, tiny_assets, tmp_path, model=str(empty))
    afile = tmp_path / "weights.bin"
    afile.write_bytes(b"\0" * 10)
    assert "is a file, not a saved" in convert_error(capsys, tiny_assets, tmp_path, model=str(afile))


def test_unsupported_architecture_is_refused_from_its_config(capsys, tiny_assets, tmp_path, no_heavy_work):
    from transformers import FalconConfig

    d = tmp_path / "falcon"  # Falcon's attention does not go through the attention interface
    FalconConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4).save_pretrained(d)
    err = convert_error(capsys, tiny_assets, tmp_path, model=str(d))
    assert "'falcon' is not supported" in err and "attention interface" in err and "llama" in err
    assert "adding their model_type" not in err  # no advice that would silently corrupt the conversion


def test_an_encoder_is_sent_to_convert_encoder(capsys, tiny_assets, tmp_path, no_heavy_work):
    from transformers import BertConfig

    d = tmp_path / "bert"
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64).save_pretrained(d)
    assert "convert-encoder" in convert_error(capsys, tiny_assets, tmp_path, model=str(d))


def test_gguf_without_the_gguf_package(capsys, tiny_assets, tmp_path, monkeypatch, no_heavy_work):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    f = tmp_path / "model.Q4_0.gguf"
    f.write_bytes(b"GGUF" + b"\0" * 64)
    err = convert_error(capsys, tiny_assets, tmp_path, model=str(f))
    assert "needs the `gguf` package" in err and "pip install gguf" in err


@pytest.mark.parametrize("name, content, says", [
    ("empty.txt", b"  \n", "is empty"),
    ("binary.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "looks binary"),
    ("short.txt", b"the king and the queen", "too short"),
    ("records.jsonl", b'{"body": "the king"}\n{"body": "the queen"}\n', "has the fields ['body']"),
    ("table.parquet", b"PAR1\x00\x00PAR1", "cannot read"),
    ("table.tsv", b"a\tb\n1\t2\n", "is a .tsv file: not plain text"),
])
def test_bad_corpora(name, content, says, capsys, tiny_assets, tmp_path, no_heavy_work):
    f = tmp_path / name
    f.write_bytes(content)
    err = convert_error(capsys, tiny_assets, tmp_path, data=str(f))
    assert says in err, err
    assert "does not exist" in convert_error(capsys, tiny_assets, tmp_path, data=str(tmp_path / "none.txt"))


def test_unwritable_output(capsys, tiny_assets, tmp_path, no_heavy_work):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")  # a directory cannot be made under a file, even as root
    err = user_error(capsys, ["convert", "--model", tiny_assets["model"], "--data", tiny_assets["data"],
                              "--eval-data", tiny_assets["heldout"],
                              
                              "--out", str(blocker / "run"), "--no-progress"])
    assert "cannot write to the output directory" in err and "--out" in err


def test_loading_a_run_onto_another_base_model(capsys, tiny_run, tmp_path, tiny_assets):
    other = other_base_model(tiny_assets["model"], tmp_path / "other")
    err = user_error(capsys, ["eval", "--model", str(tiny_run / "model"), "--base-model", other, "--data",
                              tiny_assets["data"], "--eval-data", tiny_assets["heldout"], "--seq-len", "32",
                              "--tokens", "64", "--no-progress"])
    assert "different base model" in err and "embedding_sha1" in err


@pytest.mark.parametrize("fmt, victim", [("light", "model.safetensors"), ("light", "config.json"),
                                         ("hf", "model.safetensors"), ("hf", "config.json")])
def test_truncated_model_files(fmt, victim, capsys, tiny_run, tiny_light_run, tmp_path, tiny_assets):
    broken = tmp_path / "model"
    shutil.copytree((tiny_run if fmt == "hf" else tiny_light_run) / "model", broken)
    f = broken / victim
    f.write_bytes(f.read_bytes()[: max(1, f.stat().st_size // 3)])
    err = user_error(capsys, ["eval", "--model", str(broken), "--data", tiny_assets["data"],
                              "--eval-data", tiny_assets["heldout"],
                              "--seq-len", "32",
                              "--tokens", "64", "--no-progress"])
    assert "cannot be read" in err and victim in err


def test_nan_loss_names_layer_and_step_and_keeps_the_last_good_checkpoint(capsys, tiny_assets, tmp_path,
                                                                          monkeypatch):
    from hedgehog.layers.attention import HedgehogAttention

    real, calls = HedgehogAttention.layer_distill_loss, [0]

    def nan_on_the_ninth(self, *a, **kw):  # 2 layers x 4 row subsets per batch: the 9th is batch 2's first
        calls[0] += 1
        loss = real(self, *a, **kw)
        return loss * float("nan") if calls[0] == 9 else loss

    monkeypatch.setattr(HedgehogAttention, "layer_distill_loss", nan_on_the_ninth)
    err = convert_error(capsys, tiny_assets, tmp_path, "--stage1-tokens", "256", "--stage1-checkpoint-every", "1")
    assert "stage 1, layer 0, step 4" in err and "not finite" in err and "Lower the learning rate" in err
    state = torch.load(tmp_path / "out" / "checkpoints" / "stage1.pt", weights_only=True)
    assert state["batch"] == 1 and all(torch.isfinite(t).all() for t in state["params"])
    assert json.dumps(state["history"])  # the good batch's record is there


def test_window_and_chunk_below_one_are_refused_by_the_config_and_the_ops():
    from hedgehog.layers.attention import HedgehogConfig
    from hedgehog.ops import linear_attention

    with pytest.raises(ValueError, match="window must be >= 1"):
        HedgehogConfig(attention="hybrid", window=0)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        HedgehogConfig(chunk_size=0)
    x = torch.rand(1, 1, 4, 2)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        linear_attention(x, x, x, chunk_size=0)


def test_revision_and_remote_code_reach_transformers(tiny_assets, monkeypatch):
    """`--revision`/`--trust-remote-code` go to every from_pretrained of the base (config, weights, tokenizer)."""
    import transformers

    from hedgehog.jobs.checks import check_model
    from hedgehog.models.loading import load_base

    seen, depth = [], [0]
    for cls in (transformers.AutoConfig, transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        orig = cls.from_pretrained.__func__

        def spy(klass, *a, _orig=orig, **kw):
            if depth[0] == 0:  # the library's own calls, not transformers' nested ones
                seen.append((klass.__name__, kw.get("revision"), kw.get("trust_remote_code")))
            kw.pop("revision", None)  # a local directory has no revisions to pick from
            depth[0] += 1
            try:
                return _orig(klass, *a, **kw)
            finally:
                depth[0] -= 1

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    check_model(tiny_assets["model"], 32, revision="v1.2", trust_remote_code=True)
    load_base(tiny_assets["model"], revision="v1.2", trust_remote_code=True)
    names = {n for n, _, _ in seen}
    assert {"AutoConfig", "AutoModelForCausalLM", "AutoTokenizer"} <= names
    assert all(r == "v1.2" and t is True for n, r, t in seen if n.startswith("Auto")), seen
    seen.clear()
    load_base(tiny_assets["model"])
    assert all(r is None and t is None for _, r, t in seen)  # nothing set: nothing passed
