"""The converted layer's mode and per-call context: an explicit value, nothing left on the layer by a call."""
import pytest
import torch

from conftest import V, tiny
from hedgehog.layers.attention import Mode, attention_mode, hedgehog_layers, set_attention_mode
from hedgehog.models.convert import convert_model


def test_mode_takes_names_and_refuses_unknown_ones():
    model = convert_model(tiny("llama").eval())
    layer = hedgehog_layers(model)[0]
    assert layer.mode is Mode.STUDENT
    layer.mode = "softmax"  # the earlier name of the teacher mode
    assert layer.mode is Mode.TEACHER
    set_attention_mode(model, "window")
    assert {m.mode for m in hedgehog_layers(model)} == {Mode.BASELINE}
    with pytest.raises(ValueError, match="unknown attention mode 'linar'.*'student'"):
        set_attention_mode(model, "linar")
    with pytest.raises(ValueError, match="unknown attention mode"):
        layer.mode = "fast"
    assert layer.mode is Mode.BASELINE


@pytest.mark.parametrize("family", ["llama", "gemma2", "bert"])
def test_a_forward_leaves_no_per_call_state_on_the_layer(family):
    """Teacher settings and the call travel as arguments: a forward in any mode changes no attribute of the layer
    (outputs aside: ``distill_loss`` in distill mode)."""
    from conftest import tiny_bert

    model = (tiny_bert() if family == "bert" else tiny(family)).eval()
    convert_model(model)
    layers = hedgehog_layers(model)
    before = [dict(vars(m)) for m in layers]
    ids = torch.randint(0, V if family != "bert" else 50, (1, 12))
    for mode in (Mode.TEACHER, Mode.STUDENT):
        with torch.no_grad(), attention_mode(model, mode):
            model(input_ids=ids)
            [m.start_capture() for m in layers]
            model(input_ids=ids)
            caps = [m.stop_capture() for m in layers]
    assert all(len(c) == 1 and c[0].teacher == m.teacher for c, m in zip(caps, layers))
    for m, b in zip(layers, before):
        assert {k: v for k, v in vars(m).items() if k not in ("_modules", "_parameters")} == \
               {k: v for k, v in b.items() if k not in ("_modules", "_parameters")}
