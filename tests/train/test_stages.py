"""The two training stages (hedgehog.train.stage1, hedgehog.train.stage2): stage 1 lowers the distillation loss for every family and stops on a
non-finite loss; stage 2's KD loss is taken against the unadapted softmax teacher."""
import pytest
import torch

from hedgehog.layers.attention import HedgehogConfig, hedgehog_layers
from hedgehog.models.convert import convert_model
from hedgehog.train.stage1 import Stage1Config, attention_transfer
from hedgehog.train.stage2 import Stage2Config, add_lora, lora_finetune
from conftest import FAMILIES, V, perturb_maps, tiny


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_stage1_decreases_distillation_loss(family, loss):
    from hedgehog.layers.capture import capture_qkv

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
            return sum(layer.layer_distill_loss(c.q, c.k, c.v, teacher=c.teacher).item() for layer, c in zip(layers, caps))

    before = loss_on(windows[:2])
    rep = attention_transfer(model, windows, Stage1Config(tokens=8 * 32 * 4, lr=3e-2, batch_size=2, warmup_steps=1),
                             progress=False)
    assert all(layer.mode == "student" for layer in layers)
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
    perturb_maps(model, scale=5.0)  # a student visibly different from its teacher
    pm = add_lora(model, Stage2Config(lora_r=4, train_feature_maps=True))
    ids = torch.randint(0, V, (2, 16))
    from hedgehog.train.stage2 import _kd_loss

    with torch.no_grad():
        base = _kd_loss(pm, pm, ids).item()
    assert base > 0
    rep = lora_finetune(pm, torch.randint(0, V, (8, 16)), Stage2Config(tokens=8 * 16 * 4, lr=2e-3, warmup_steps=1,
                                                                     loss="kd"), progress=False)
    with torch.no_grad():
        after = _kd_loss(pm, pm, ids).item()
    assert after < base
    # the teacher path left everything in linear mode with the adapter on
    assert all(m.mode == "student" for m in hedgehog_layers(pm))
    assert any(p.requires_grad for n, p in pm.named_parameters() if "feature_map" in n)


def test_batch_positions_are_seeded_offsets_within_the_range():
    from hedgehog.train.stage1 import batch_positions

    assert batch_positions(0, 3, 8) is None
    pos = [batch_positions(100, i, 8) for i in range(50)]
    assert all(p.shape == (1, 8) and torch.equal(p[0], torch.arange(8) + p[0, 0]) for p in pos)
    starts = {int(p[0, 0]) for p in pos}
    assert min(starts) >= 0 and max(starts) <= 100 and len(starts) > 25  # spread over the range, not one value
    assert torch.equal(batch_positions(100, 7, 8), pos[7])  # the same on every rank and after a resume


def test_both_stages_train_at_the_offset_positions():
    """Stage 1's captures and stage 2's student and teacher forwards run at the batch's offset positions (the
    feature maps read post-RoPE q/k, which depend on them), and the offsets change what the maps see."""
    from hedgehog.layers.capture import capture_qkv
    from hedgehog.train.stage1 import batch_positions

    torch.manual_seed(0)
    model = convert_model(tiny("llama").eval())
    ids = torch.randint(0, V, (2, 16))
    (q0, k0, _, _), = capture_qkv(model, ids, hedgehog_layers(model)[:1])
    (q1, k1, _, _), = capture_qkv(model, ids, hedgehog_layers(model)[:1], torch.arange(40, 56)[None])
    assert not torch.allclose(k0, k1)  # RoPE at other positions
    scores = lambda q, k: q[:, 0] @ k[:, 0].transpose(-1, -2)
    torch.testing.assert_close(scores(q0, k0), scores(q1, k1), rtol=1e-4, atol=1e-4)  # RoPE is relative

    seen = []
    hook = model.model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("position_ids")),
                                                 with_kwargs=True)
    attention_transfer(model, ids, Stage1Config(tokens=2 * 16, batch_size=2, position_offsets=300), progress=False)
    assert len(seen) == 1 and torch.equal(seen[0], batch_positions(300, 0, 16))
    seen.clear()
    pm = add_lora(model, Stage2Config(lora_r=4))
    lora_finetune(pm, ids, Stage2Config(tokens=2 * 16, batch_size=1, position_offsets=300), progress=False)
    # step 0 and 1, each a teacher and a student forward
    assert [int(p[0, 0]) for p in seen] == [int(batch_positions(300, s, 16)[0, 0]) for s in (0, 0, 1, 1)]
    hook.remove()


def test_the_job_offsets_reach_the_model_context():
    from hedgehog.jobs.config import ConvertJob, position_offsets, with_position_offsets

    cfg = tiny("llama").config
    cfg.max_position_embeddings = 2048
    assert position_offsets(ConvertJob(seq_len=512, position_offsets=None), cfg) == 2048 - 512  # auto
    cfg.max_position_embeddings = 131072
    assert position_offsets(ConvertJob(seq_len=512, position_offsets=None), cfg) == 8192 - 512  # capped
    assert position_offsets(ConvertJob(position_offsets=0), cfg) == 0 and ConvertJob().position_offsets is None
    job = with_position_offsets(ConvertJob(seq_len=256, position_offsets=None), cfg)
    assert job.position_offsets == job.stage1.position_offsets == job.stage2.position_offsets == 8192 - 256


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_stops_after_the_last_layer_and_skips_the_lm_head(family):
    """Stage 1 needs q/k/v only: the capture forward never runs the LM head (vocabulary-wide logits), and
    its captures equal the q/k/v a full teacher forward computes."""
    from hedgehog.layers.attention import Mode, attention_mode
    from hedgehog.layers.capture import capture_qkv

    torch.manual_seed(0)
    model = convert_model(tiny(family).eval())
    ids = torch.randint(0, V, (2, 12))
    heads = []
    hook = model.get_output_embeddings().register_forward_hook(lambda *a: heads.append(1))
    caps = capture_qkv(model, ids)
    assert heads == [] and len(caps) == len(hedgehog_layers(model))
    layers = hedgehog_layers(model)
    for layer in layers:
        layer.start_capture()
    with torch.no_grad(), attention_mode(model, Mode.TEACHER):
        model(input_ids=ids, use_cache=False)
    full = [layer.stop_capture()[0] for layer in layers]
    assert heads == [1]
    hook.remove()
    for a, b in zip(caps, full):
        for x, y in zip(a[:3], b[:3]):
            assert torch.equal(x, y)
