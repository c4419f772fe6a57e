"""Attention distillation (hedgehog.distill): stage 1 lowers the distillation loss for every family and stops on a
non-finite loss; stage 2's KD loss is taken against the unadapted softmax teacher."""
import pytest
import torch

from hedgehog.attention import HedgehogConfig, hedgehog_layers
from hedgehog.convert import convert_model
from hedgehog.distill import Stage1Config, Stage2Config, add_lora, attention_transfer, lora_finetune
from test_convert import FAMILIES, V, _perturb_maps, tiny


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_stage1_decreases_distillation_loss(family, loss):
    from hedgehog.distill import capture_qkv

    torch.manual_seed(0)
    model = convert_model(tiny(family).eval(), HedgehogConfig(distill_loss=loss))
    layers = hedgehog_layers(model)
    with torch.no_grad():  # a spiky teacher (random tiny models attend almost uniformly: nothing to learn)
        for layer in layers:
            for name, p in layer.named_parameters():
                if p.dim() == 2 and not name.startswith(("feature_map", "_grouped")):  # Linear and GPT-2's Conv1D
                    p.mul_(6.0)
    windows = torch.randint(0, V, (8, 32))

    def loss_on(batch):
        with torch.no_grad():
            caps = capture_qkv(model, batch)
            return sum(layer.layer_distill_loss(q, k, v).item() for layer, (q, k, v) in zip(layers, caps))

    before = loss_on(windows[:2])
    rep = attention_transfer(model, windows, Stage1Config(tokens=8 * 32 * 4, lr=3e-2, batch_size=2, warmup_steps=1),
                             progress=False)
    assert all(layer.mode == "linear" for layer in layers)
    after = loss_on(windows[:2])
    assert rep["captures"] == 16 and rep["steps"] == (16 if loss == "mse" else 64)
    assert after < 0.995 * before, (before, after)
    assert all(not p.requires_grad for p in model.parameters())


def test_stage1_nan_raises_clear_error():
    torch.manual_seed(0)
    model = convert_model(tiny("llama").eval())
    with torch.no_grad():
        hedgehog_layers(model)[0].feature_map_q.weight.fill_(float("nan"))
    with pytest.raises(RuntimeError, match="not finite.*Lower the learning rate"):
        attention_transfer(model, torch.randint(0, V, (2, 16)), Stage1Config(tokens=64, batch_size=1), progress=False)


def test_stage2_kd_uses_the_unadapted_softmax_teacher():
    torch.manual_seed(0)
    model = convert_model(tiny("llama").eval())
    _perturb_maps(model, scale=5.0)  # a student visibly different from its teacher
    pm = add_lora(model, Stage2Config(lora_r=4, train_feature_maps=True))
    ids = torch.randint(0, V, (2, 16))
    from hedgehog.distill import _kd_loss

    with torch.no_grad():
        base = _kd_loss(pm, pm, ids).item()
    assert base > 0
    rep = lora_finetune(pm, torch.randint(0, V, (8, 16)), Stage2Config(tokens=8 * 16 * 4, lr=2e-3, warmup_steps=1,
                                                                     loss="kd"), progress=False)
    with torch.no_grad():
        after = _kd_loss(pm, pm, ids).item()
    assert after < base
    # the teacher path left everything in linear mode with the adapter on
    assert all(m.mode == "linear" for m in hedgehog_layers(pm))
    assert any(p.requires_grad for n, p in pm.named_parameters() if "feature_map" in n)
