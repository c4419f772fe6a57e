import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` (``make test-gpu`` selects them) skip where PyTorch sees no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (make test-gpu on a machine with one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def rand_features(*shape, dtype=torch.float64):
    """Positive features, like every registered map produces."""
    return torch.rand(*shape, dtype=dtype) + 0.05


TF32_UNIT_ROUNDOFF = 2.0 ** -11  # 10 explicit mantissa bits


def assert_tf32_kernel_matches(y, q, k, v):
    """``y``: a CUDA kernel's causal linear attention of float32 ``q, k`` (features) and ``v``, where the matmuls
    may run in TF32 (fla's Triton kernels do for float32 inputs: tl.dot's default precision).

    The bound: each output is a ratio of sums of ``a_ij v_j`` and ``a_ij`` (``a_ij = q_i.k_j >= 0``) taken
    through two or three TF32 matmuls (q k^T, then times v; the state q S), each rounding its inputs to a relative
    2^-11; the ratio's error is then within a few units of 2^-11 times the largest |v| (observed 1.9e-3 with
    max|v| ~ 4.5 on an H200; the bound is 8 units, ~1.6e-2 there). It still catches a wrong formula: the same
    attention shifted by one key (a causal off-by-one) must miss the reference by 10x the bound."""
    from hedgehog.ops import quadratic_linear_attention

    q64, k64, v64 = (t.double().cpu() for t in (q, k, v))
    ref = quadratic_linear_attention(q64, k64, v64)
    bound = 8 * TF32_UNIT_ROUNDOFF * v64.abs().max().item()
    err = (y.double().cpu() - ref).abs().max().item()
    assert err < bound, f"max error {err:.2e} above the TF32 bound {bound:.2e}"
    shifted = torch.cat([v64[:, :, :1], quadratic_linear_attention(q64[:, :, 1:], k64[:, :, :-1], v64[:, :, :-1])], 2)
    assert (shifted - ref).abs().max().item() > 10 * bound, "the bound is too loose to see an off-by-one"
    return ref


def first_layer_qkv(model, ids):
    """``(layer, (q, k, v))``: the first converted layer of ``model`` and the post-RoPE q/k/v it saw in a softmax
    forward of ``ids``; the model is left in linear mode."""
    from hedgehog.attention import hedgehog_layers, set_attention_mode

    layer = hedgehog_layers(model)[0]
    layer.start_capture()
    set_attention_mode(model, "softmax")
    with torch.no_grad():
        model(ids)
    qkv = layer.stop_capture()[0]
    set_attention_mode(model, "linear")
    return layer, qkv


def assert_greedy_generate_is_argmax_with_a_constant_state(m, vocab):
    """``generate`` (greedy, recurrent cache) equals repeated argmax over full forwards, and the cache holds as
    many bytes after 40 new tokens as after 8."""
    ids = torch.randint(0, vocab, (2, 6))
    res = m.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    seq = ids
    with torch.no_grad():
        for _ in range(8):
            seq = torch.cat([seq, m(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(res.sequences, seq)
    res2 = m.generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    assert res2.past_key_values.state_nbytes() == res.past_key_values.state_nbytes() > 0


def hybrid_layer_case(model, vocab, n=19):
    """The first converted hybrid layer of ``model`` on random ids: ``(layer, q, k, v_rep, reference)``, where
    ``reference(**kw)`` is the float64 quadratic hybrid of its captured q/k/v with the layer's own features, window,
    gamma and scale (``kw``: e.g. ``sinks``, ``decay``)."""
    from hedgehog.ops import quadratic_hybrid_attention

    layer, (q, k, v) = first_layer_qkv(model, torch.randint(0, vocab, (2, n)))
    rep = lambda t: t.repeat_interleave(layer.n_rep, dim=1)
    with torch.no_grad():
        phi_q, phi_k = layer.features(q, k)

    def reference(**kw):
        with torch.no_grad():
            return quadratic_hybrid_attention(q.double(), rep(k).double(), rep(v).double(), phi_q.double(),
                                              phi_k.double(), layer.hh_config.window, layer.gamma().double(),
                                              scale=layer.teacher_scale(), **kw)

    return layer, q, k, rep(v), reference


WORDS = ("the king queen lord lady sword crown love death night day fair foul sweet blood heart "
         "thou thee thy art doth hath shall will not and of to in my is be what that with").split()


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """A tiny Llama (GQA) with a word-level tokenizer, and a small text folder: fast end-to-end runs."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tiny")
    vocab = {"<unk>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      eos_token_id=1, bos_token_id=1, pad_token_id=1)
    model_dir = root / "model"
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = root / "texts"
    data.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(10):
        words = [WORDS[j] for j in torch.randint(0, len(WORDS), (400,), generator=g).tolist()]
        (data / f"doc{i:02d}.txt").write_text(" ".join(words))
    heldout = root / "heldout"  # an evaluation text the tiny conversions never train on
    heldout.mkdir()
    for i in range(2):
        words = [WORDS[j] for j in torch.randint(0, len(WORDS), (300,), generator=g).tolist()]
        (heldout / f"other{i}.txt").write_text(" ".join(words))
    return {"model": str(model_dir), "data": str(data), "heldout": str(heldout)}


def user_error(capsys, argv) -> str:
    """Run the CLI on ``argv``; assert it stopped with the user-error exit code 2 and no traceback, and
    return what it printed on stderr (the one-paragraph message)."""
    from hedgehog.cli import main

    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "hedgehog: error: " in err and "Traceback" not in err, err[-2000:]
    return err[err.index("hedgehog: error: "):]  # after any progress bars of the loading


@pytest.fixture(scope="session")
def tiny_run(tiny_assets, tmp_path_factory):
    """A finished tiny conversion (both stages): its directory, with ``model/`` inside."""
    from hedgehog.cli import main

    out = tmp_path_factory.mktemp("tiny_run") / "run"
    assert main(["convert", "--model", tiny_assets["model"], "--data", tiny_assets["data"],
                 "--eval-data", tiny_assets["heldout"],
                 "--out", str(out),
                 "--seq-len", "32", "--stage1-tokens", "128", "--stage2-tokens", "64", "--eval-tokens", "64",
                 "--no-progress"]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_light_run(tiny_assets, tmp_path_factory):
    """The same tiny conversion saved in the light format (only the maps and the LoRA-merged weights, on the base)."""
    from hedgehog.cli import main

    out = tmp_path_factory.mktemp("tiny_light_run") / "run"
    assert main(["convert", "--model", tiny_assets["model"], "--data", tiny_assets["data"],
                 "--eval-data", tiny_assets["heldout"], "--out", str(out), "--save-format", "light",
                 "--seq-len", "32", "--stage1-tokens", "128", "--stage2-tokens", "64", "--eval-tokens", "64",
                 "--no-progress"]) == 0
    return out


def other_base_model(model_dir, out_dir) -> str:
    """A copy of the model at ``model_dir`` with shifted embeddings (another base for the fingerprint)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        m.get_input_embeddings().weight.add_(0.01)
    m.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out_dir)
    return str(out_dir)
