"""Converted models as Hugging Face models: Auto-class loading, the self-contained format, refusal without hedgehog."""
import copy
import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

import hedgehog
from hedgehog.layers.attention import HedgehogConfig, hedgehog_layers
from hedgehog.layers.generation import HedgehogCache
from hedgehog.models import loading
from hedgehog.models import formats
from hedgehog.models.convert import convert_model
from hedgehog.train.stage2 import Stage2Config, add_lora, lora_finetune
from conftest import FAMILIES, V, perturb_maps, tiny


def _converted(family, attention="linear", seed=0):
    torch.manual_seed(seed)
    model = convert_model(tiny(family).eval(), HedgehogConfig(attention=attention, window=4))
    perturb_maps(model)
    for layer in hedgehog_layers(model):
        if layer.window_gate is not None:
            with torch.no_grad():
                layer.window_gate.add_(torch.randn_like(layer.window_gate))
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("attention", ["linear", "hybrid"])
@pytest.mark.parametrize("family", FAMILIES)
def test_save_pretrained_then_auto_class_gives_the_same_model(tmp_path, family, attention):
    model = _converted(family, attention)
    ids = torch.randint(0, V, (2, 19))
    want = _logits(model, ids)
    model.save_pretrained(tmp_path / "c")
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    assert cfg["model_type"] == "hedgehog" and cfg["architectures"] == ["HedgehogForCausalLM"]
    assert cfg["base_config"]["model_type"] == tiny(family).config.model_type
    assert cfg["hedgehog"]["attention"] == attention and cfg["base_fingerprint"]["embedding_sha1"]
    assert not (tmp_path / "c" / formats.CONFIG_NAME).exists()  # nothing of the light format

    auto = AutoModelForCausalLM.from_pretrained(tmp_path / "c")
    assert len(hedgehog_layers(auto)) == len(hedgehog_layers(model))
    assert isinstance(auto, type(tiny(family))) and isinstance(auto, hedgehog.models.modelclass.HedgehogModelMixin)
    torch.testing.assert_close(_logits(auto, ids), want, atol=1e-5, rtol=1e-5)
    via_load, _ = hedgehog.load(tmp_path / "c")
    torch.testing.assert_close(_logits(via_load, ids), _logits(auto, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_auto_loaded_model_generates_with_the_recurrent_cache(tmp_path, family):
    model = _converted(family, "hybrid")
    model.save_pretrained(tmp_path / "c")
    auto = AutoModelForCausalLM.from_pretrained(tmp_path / "c")
    seen = []
    orig = auto.forward

    def spy(*a, **kw):
        seen.append(type(kw.get("past_key_values") or kw.get("cache")))
        return orig(*a, **kw)

    auto.forward = spy
    prompt = torch.randint(0, V, (1, 7))
    out = auto.generate(prompt, max_new_tokens=9, do_sample=False, pad_token_id=0)
    auto.forward = orig
    assert seen and all(t is HedgehogCache for t in seen)
    ids = prompt
    for _ in range(9):  # greedy reference: argmax of full forwards without any cache
        ids = torch.cat([ids, _logits(auto, ids)[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, ids)


def test_lora_is_merged_into_the_self_contained_weights(tmp_path):
    model = _converted("llama")
    pm = add_lora(model, Stage2Config(lora_r=4, lora_alpha=8))
    lora_finetune(pm, torch.randint(0, V, (4, 16)), Stage2Config(tokens=64, lr=1e-2, warmup_steps=1), progress=False)
    ids = torch.randint(0, V, (2, 20))
    merged = copy.deepcopy(pm).merge_and_unload()
    formats.save_converted(pm, tmp_path / "c", base_model="somewhere/base")
    names = set(__import__("safetensors.torch", fromlist=["load_file"]).load_file(
        str(tmp_path / "c" / "model.safetensors")))
    assert not any("lora_" in n or "base_layer" in n or "_grouped_k" in n for n in names)
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    assert cfg["lora"]["r"] == 4 and cfg["lora"]["merged"] and cfg["base_model"] == "somewhere/base"
    auto = AutoModelForCausalLM.from_pretrained(tmp_path / "c")
    torch.testing.assert_close(_logits(auto, ids), _logits(merged, ids), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_logits(auto, ids), _logits(pm, ids), atol=1e-4, rtol=1e-4)  # merge rounding only
    assert loading.needs_separate_teacher(tmp_path / "c")


def test_round_trip_keeps_the_record_and_the_model_card(tmp_path):
    model = _converted("qwen2", "hybrid")
    formats.save_converted(model, tmp_path / "a", base_model="/abs/base", extra={"data": "general", "seq_len": 512})
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    a.save_pretrained(tmp_path / "b")  # what push_to_hub writes
    ca, cb = (json.loads((tmp_path / d / "config.json").read_text()) for d in "ab")
    for key in ("base_model", "base_fingerprint", "hedgehog", "converted_layers", "conversion"):
        assert ca[key] == cb[key], key
    assert {k: v for k, v in ca["base_config"].items() if k != "dtype"} == \
        {k: v for k, v in cb["base_config"].items() if k != "dtype"}
    assert cb["conversion"] == {"data": "general", "seq_len": 512}
    ids = torch.randint(0, V, (1, 15))
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "b"), ids), _logits(a, ids),
                               atol=0, rtol=0)
    card = (tmp_path / "b" / "README.md").read_text()
    assert "/abs/base" in card and "import hedgehog" in card and "AutoModelForCausalLM" in card
    assert (tmp_path / "b" / "generation_config.json").exists()
    meta = formats.read_meta(tmp_path / "b")
    assert meta["format"] == "hf" and meta["base_model"] == "/abs/base" and meta["seq_len"] == 512


def test_plain_transformers_refuses_a_converted_directory(tmp_path):
    """Without hedgehog imported the directory must not load as anything (above all not as the softmax base)."""
    _converted("llama").save_pretrained(tmp_path / "c")
    code = ("from transformers import AutoModelForCausalLM\n"
            f"AutoModelForCausalLM.from_pretrained({str(tmp_path / 'c')!r})\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode != 0
    assert "hedgehog" in r.stderr and "does not recognize" in r.stderr


def test_light_directories_load_onto_their_base_and_convert_to_the_full_format(tmp_path):
    base = tiny("llama")
    base.save_pretrained(tmp_path / "base")
    model = convert_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base", use_kernels=False).eval())
    perturb_maps(model)
    formats.save_converted(model, tmp_path / "light", base_model=str(tmp_path / "base"), format="light")
    assert formats.read_meta(tmp_path / "light")["weights"] == "added"  # the hf layout, without the base's weights
    loaded, _ = hedgehog.load(tmp_path / "light")
    ids = torch.randint(0, V, (1, 12))
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    loaded.save_pretrained(tmp_path / "hf")  # a light directory converts to the hf format by loading and saving
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "hf"), ids),
                               _logits(model, ids), atol=0, rtol=0)


def test_encoders_register_with_their_own_auto_classes(tmp_path):
    from conftest import tiny_bert

    torch.manual_seed(0)
    clf = convert_model(tiny_bert().eval())
    perturb_maps(clf)
    ids = torch.randint(1, 60, (2, 11))
    with torch.no_grad():
        want = clf(input_ids=ids).logits
    clf.save_pretrained(tmp_path / "clf")
    assert json.loads((tmp_path / "clf" / "config.json").read_text())["architectures"] == [
        "HedgehogForSequenceClassification"]
    got = AutoModelForSequenceClassification.from_pretrained(tmp_path / "clf")
    with torch.no_grad():
        torch.testing.assert_close(got(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
    bare = AutoModel.from_pretrained(tmp_path / "clf")  # the encoder without its head, as for any BERT
    assert len(hedgehog_layers(bare)) == len(hedgehog_layers(clf))


def test_the_main_job_saves_the_hf_format(tiny_run):
    d = tiny_run / "model"
    assert formats.saved_format(d) == "hf"
    auto = AutoModelForCausalLM.from_pretrained(d)
    assert hedgehog_layers(auto)
    card = (d / "README.md").read_text()
    assert "Fidelity to the teacher" in card and "(held out)" in card
    report = json.loads((tiny_run / "report.json").read_text())
    assert report["reload_max_abs_logit_diff"] == 0.0


def test_push_to_hub_uploads_the_hedgehog_directory(tmp_path, monkeypatch):
    """No hub here: the hub calls are replaced by recorders; what would be uploaded is the hf format with
    hedgehog's model card (transformers' own push_to_hub writes a generic card over it)."""
    import types

    import transformers.utils.hub as hub

    model = _converted("llama", "hybrid")
    monkeypatch.setattr(hub, "hf_api", lambda: types.SimpleNamespace(
        create_repo=lambda repo_id, **kw: types.SimpleNamespace(repo_id="me/" + repo_id)))
    uploaded = {}

    def upload(folder, repo_id, **kw):
        uploaded["repo"] = repo_id
        uploaded["files"] = {p.name: p.read_bytes() for p in __import__("pathlib").Path(folder).iterdir()}
        return "url"

    monkeypatch.setattr(model, "_upload_modified_files", upload)
    assert model.push_to_hub("smol-hedgehog") == "url"
    assert uploaded["repo"] == "me/smol-hedgehog"
    files = uploaded["files"]
    assert json.loads(files["config.json"])["model_type"] == "hedgehog"
    assert b"import hedgehog" in files["README.md"] and "model.safetensors" in files
    (tmp_path / "hub").mkdir()
    for name, data in files.items():
        (tmp_path / "hub" / name).write_bytes(data)
    ids = torch.randint(0, V, (1, 9))
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "hub"), ids),
                               _logits(model, ids), atol=1e-5, rtol=1e-5)


def test_eval_scores_a_merged_model_against_its_recorded_base(tiny_assets, tmp_path, capsys):
    """With LoRA merged into the weights, softmax mode is no longer the teacher: `hedgehog eval` must score
    against the recorded base, whose perplexity is what `hedgehog eval` of the base itself prints."""
    import re

    from transformers import AutoTokenizer

    from hedgehog.cli import main

    torch.manual_seed(0)
    model = convert_model(AutoModelForCausalLM.from_pretrained(tiny_assets["model"], use_kernels=False).eval())
    pm = add_lora(model, Stage2Config(lora_r=4, lora_alpha=8))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # LoRA that changes the projections a lot
    formats.save_converted(pm, tmp_path / "c", base_model=tiny_assets["model"],
                           tokenizer=AutoTokenizer.from_pretrained(tiny_assets["model"]))
    assert loading.needs_separate_teacher(tmp_path / "c")
    common = ["--data", tiny_assets["data"], "--seq-len", "32", "--tokens", "64", "--no-progress"]
    main(["eval", "--model", str(tmp_path / "c"), "--eval-data", tiny_assets["heldout"], *common,
          "--json", str(tmp_path / "e.json")])
    teacher = json.loads((tmp_path / "e.json").read_text())["texts (test)"]["teacher_ppl"]
    capsys.readouterr()
    main(["eval", "--model", tiny_assets["model"], *common])
    base_ppl = float(re.search(r"perplexity ([0-9.]+)", capsys.readouterr().out).group(1))
    assert teacher == pytest.approx(base_ppl, rel=1e-3)
    with hedgehog.eval.fidelity.teacher_mode(AutoModelForCausalLM.from_pretrained(tmp_path / "c")) as wrong:
        ids = torch.randint(0, wrong.config.vocab_size, (1, 16))
        assert not torch.allclose(_logits(wrong, ids), _logits(loading.load_teacher(tmp_path / "c"), ids), atol=1e-3)
