"""Saving and loading converted models (hedgehog.models.formats, hedgehog.models.loading): both weight sets of the one
directory format, LoRA merged in, the base checked by fingerprint, the earlier light layout still read."""
import json

import pytest
import torch

from hedgehog.data.assets import PLAIN_LOAD
from hedgehog.layers.attention import HedgehogConfig, hedgehog_layers
from hedgehog.models import loading
from hedgehog.models import formats
from hedgehog.models.convert import convert_model
from hedgehog.train.stage2 import Stage2Config, add_lora, lora_finetune
from conftest import V, perturb_maps, tiny


def _lora_model(tmp_path, family):
    """A converted tiny model with perturbed maps and a briefly trained LoRA; its base saved at tmp_path/base."""
    torch.manual_seed(0)
    base_dir = tmp_path / "base"
    tiny(family).save_pretrained(base_dir)
    from transformers import AutoModelForCausalLM

    model = convert_model(AutoModelForCausalLM.from_pretrained(base_dir, **PLAIN_LOAD).eval())
    perturb_maps(model)
    pm = add_lora(model, Stage2Config(lora_r=4, lora_alpha=8))
    lora_finetune(pm, torch.randint(0, V, (4, 16)), Stage2Config(tokens=64, lr=1e-2, warmup_steps=1), progress=False)
    return pm, base_dir


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("merged_first", [False, True], ids=["peft", "merge_lora"])
def test_light_format_round_trip_with_lora(tmp_path, family, merged_first):
    """The light save is the hf layout holding only what conversion changed: the maps and the LoRA-merged
    projections (named by the peft wrapper, or as merge_lora recorded them); it loads onto its base."""
    from safetensors import safe_open

    pm, base_dir = _lora_model(tmp_path, family)
    ids = torch.randint(0, V, (2, 20))
    with torch.no_grad():
        want = pm(input_ids=ids).logits
    model = formats.merge_lora(pm) if merged_first else pm
    out = formats.save_converted(model, tmp_path / "conv", base_model=str(base_dir), format="light")
    meta = formats.read_meta(out)
    assert meta["format"] == "hf" and meta["weights"] == "added" and not (out / formats.CONFIG_NAME).exists()
    assert meta["lora"]["r"] == 4 and meta["hedgehog"]["feature_map"] == "hedgehog" and meta["lora"]["weights"]
    with safe_open(str(out / "model.safetensors"), framework="pt") as fh:
        saved = set(fh.keys())
    assert saved == {k for k in saved if "feature_map" in k} | set(meta["lora"]["weights"])
    assert len(saved) < len(formats.export_state(pm))  # the base's other weights stay with the base
    loaded, _tok = loading.load(out)
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)  # merged weights: fp32 rounding
    assert [m.mode for m in hedgehog_layers(loaded)] == ["student", "student"]
    assert loading.needs_separate_teacher(out)


def _write_earlier_light_layout(pm, out, base_dir, adapter: bool):
    """A directory in the light layout hedgehog wrote before the one format (it still reads them)."""
    from safetensors.torch import save_file

    inner = pm.get_base_model()
    layers = hedgehog_layers(inner)
    out.mkdir()
    save_file({f"layers.{layer.layer_idx}.{prefix}.{name}": t.contiguous()
               for layer in layers for prefix, fm in layer.trainable_modules().items()
               for name, t in fm.state_dict().items()}, str(out / formats.FEATURES_NAME))
    if adapter:
        pm.save_pretrained(str(out))
    else:
        save_file(formats._merged_attention_state(pm), str(out / formats.MERGED_NAME))
    (out / formats.CONFIG_NAME).write_text(json.dumps({
        "format_version": 1, "base_model": str(base_dir), "base_fingerprint": formats.base_fingerprint(inner),
        "hedgehog": layers[0].hh_config.to_dict(), "converted_layers": [layer.layer_idx for layer in layers],
        "lora": {"r": 4, "alpha": 8, "target_modules": "x", "merged": not adapter}}))


@pytest.mark.parametrize("adapter", [True, False], ids=["adapter", "merged"])
def test_directories_of_the_earlier_light_layout_still_load(tmp_path, adapter):
    pm, base_dir = _lora_model(tmp_path, "llama")
    ids = torch.randint(0, V, (2, 20))
    with torch.no_grad():
        want = pm(input_ids=ids).logits
    _write_earlier_light_layout(pm, tmp_path / "old", base_dir, adapter)
    assert formats.saved_format(tmp_path / "old") == "light"
    loaded, _ = loading.load(tmp_path / "old", merge_lora=False) if adapter else loading.load(tmp_path / "old")
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
    tol = 1e-6 if adapter else 1e-4  # the adapter kept: exactly the saved computation
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def test_save_load_without_lora_is_exact_and_partial_layers(tmp_path):
    torch.manual_seed(0)
    base_dir = tmp_path / "base"
    tiny("qwen2").save_pretrained(base_dir)
    from transformers import AutoModelForCausalLM

    model = convert_model(AutoModelForCausalLM.from_pretrained(base_dir, **PLAIN_LOAD).eval(), HedgehogConfig(layers=[1]))
    assert [m.layer_idx for m in hedgehog_layers(model)] == [1]
    perturb_maps(model)
    ids = torch.randint(0, V, (1, 12))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    formats.save_converted(model, tmp_path / "c", base_model=str(base_dir), format="light")
    loaded, _ = loading.load(tmp_path / "c")
    assert [m.layer_idx for m in hedgehog_layers(loaded)] == [1]
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, want)


def test_loading_onto_a_different_base_is_refused(tmp_path):
    torch.manual_seed(0)
    a, b = tmp_path / "a", tmp_path / "b"
    tiny("llama").save_pretrained(a)
    torch.manual_seed(1)
    tiny("llama").save_pretrained(b)
    from transformers import AutoModelForCausalLM

    model = convert_model(AutoModelForCausalLM.from_pretrained(a, **PLAIN_LOAD))
    formats.save_converted(model, tmp_path / "c", base_model=str(a), format="light")
    with pytest.raises(loading.BaseModelMismatchError, match="different base model"):
        loading.load(tmp_path / "c", base_model=str(b))


def test_load_refuses_non_converted_dir(tmp_path):
    tiny("llama").save_pretrained(tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match="not a converted hedgehog model"):
        loading.load(tmp_path / "plain")


