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


def run_interpreted(prelude: str, code: str) -> str:
    """Run ``prelude + code`` in a fresh Python with Triton's CPU interpreter on (Triton reads TRITON_INTERPRET when a
    kernel is defined) and the fused CPU kernel and any kernel switch left at their defaults; its stdout. A failure
    there fails the test with its traceback's tail."""
    import os
    import subprocess
    import sys
    import textwrap

    env = {**os.environ, "TRITON_INTERPRET": "1", "HEDGEHOG_CPU_KERNEL": "0"}
    env.pop("HEDGEHOG_SPARSE_KERNEL", None)
    proc = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


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
    from hedgehog.layers.attention import hedgehog_layers, set_attention_mode

    layer = hedgehog_layers(model)[0]
    layer.start_capture()
    set_attention_mode(model, "teacher")
    with torch.no_grad():
        model(ids)
    qkv = tuple(layer.stop_capture()[0][:3])
    set_attention_mode(model, "student")
    return layer, qkv


def assert_greedy_generate_is_argmax(m, ids, new: int = 8):
    """``generate`` (greedy, recurrent cache) equals repeated argmax over full forwards; returns its output."""
    res = m.generate(ids, max_new_tokens=new, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    seq = ids
    with torch.no_grad():
        for _ in range(new):
            seq = torch.cat([seq, m(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(res.sequences, seq)
    return res


def assert_greedy_generate_is_argmax_with_a_constant_state(m, vocab):
    """:func:`assert_greedy_generate_is_argmax`, and the cache holds as many bytes after 40 new tokens as after 8."""
    ids = torch.randint(0, vocab, (2, 6))
    res = assert_greedy_generate_is_argmax(m, ids)
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
                                              scale=layer.teacher.scale, **kw)

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


# -- tiny models of every family and checks shared by the layer, generation, family and kernel tests ---------
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,  # noqa: E402
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

from hedgehog.layers.attention import hedgehog_layers  # noqa: E402
from hedgehog.layers.generation import HedgehogCache, cache_kwargs  # noqa: E402
from hedgehog.ops import cpu_kernel  # noqa: E402

V = 97


def tiny(family):
    """A tiny random model of ``family``, with the family's distinguishing features switched on: sliding windows
    (4 keys, shorter than the test sequences), soft-capping, q/k norms, fused qkv, partial rotary."""
    import transformers as tr

    common = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
    gemma = dict(head_dim=8, query_pre_attn_scalar=8, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(**common))
    if family == "mistral":  # every layer slides
        return MistralForCausalLM(MistralConfig(**common, sliding_window=4))
    if family == "qwen2":  # per-layer windows: layer 0 full, layer 1 sliding
        return Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=True, sliding_window=4, max_window_layers=1))
    if family == "qwen3":  # q/k RMS norms
        return tr.Qwen3ForCausalLM(tr.Qwen3Config(**common, head_dim=8))
    if family == "gemma":
        return tr.GemmaForCausalLM(tr.GemmaConfig(**common, **{k: v for k, v in gemma.items() if k != "query_pre_attn_scalar"}))
    if family == "gemma2":  # alternating sliding / global layers, logit soft-capping, eager teacher
        return tr.Gemma2ForCausalLM(tr.Gemma2Config(**common, **gemma, sliding_window=4, attn_logit_softcapping=5.0,
                                                    final_logit_softcapping=30.0))
    if family == "gemma3_text":  # q/k norms, sliding + global layers
        return tr.Gemma3ForCausalLM(tr.Gemma3TextConfig(**common, **gemma, sliding_window=4,
                                                        layer_types=["sliding_attention", "full_attention"]))
    if family == "phi3":  # fused qkv_proj, partial rotary
        return tr.Phi3ForCausalLM(tr.Phi3Config(**common, partial_rotary_factor=0.5, pad_token_id=0, bos_token_id=1,
                                                eos_token_id=2))
    if family == "gpt_neox":  # fused interleaved query_key_value, partial rotary
        return tr.GPTNeoXForCausalLM(tr.GPTNeoXConfig(vocab_size=V, hidden_size=32, intermediate_size=64,
                                                      num_hidden_layers=2, num_attention_heads=4,
                                                      max_position_embeddings=128, rotary_pct=0.5, bos_token_id=1,
                                                      eos_token_id=2))
    if family == "olmo2":  # q/k norms over the whole projection
        return tr.Olmo2ForCausalLM(tr.Olmo2Config(**common, pad_token_id=0, bos_token_id=1, eos_token_id=2))
    if family == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=128))
    raise ValueError(family)


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "gpt_neox", "olmo2",
            "gpt2"]


def perturb_maps(model, scale=0.3):
    with torch.no_grad():
        for layer in hedgehog_layers(model):
            for fm in (layer.feature_map_q, layer.feature_map_k):
                for p in fm.parameters():
                    p.add_(scale * torch.randn_like(p))



def assert_decoding_matches_full_forward(m, prefill, n=16):
    """Prefill ``prefill`` tokens, then decode one token at a time up to ``n``: the logits equal one full
    forward. Returns the ids and the cache, for checks on top of that state."""
    ids = torch.randint(0, V, (3, n))
    with torch.no_grad():
        full = m(ids).logits
        cache = HedgehogCache(m)
        # under the name this transformers release takes (`cache` from 5.24 on); the other tests pass
        # `past_key_values=`, which 5.24 still accepts (deprecated)
        outs = [m(ids[:, :prefill], **cache_kwargs(m, cache), use_cache=True).logits]
        for t in range(prefill, n):
            outs.append(m(ids[:, t:t + 1], **cache_kwargs(m, cache), use_cache=True).logits)
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.get_seq_length() == n
    return ids, cache



def assert_left_padded_generation_matches_unpadded(m, long: int, short: int, new: int):
    """Greedy generate of a left-padded batch of two prompts equals generating each prompt alone."""
    a, b = torch.randint(0, V, (1, long)), torch.randint(0, V, (1, short))
    pad = long - short
    ids = torch.cat([a, torch.cat([torch.zeros(1, pad, dtype=torch.long), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    out = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0)
    out_a = m.generate(input_ids=a, max_new_tokens=new, do_sample=False, pad_token_id=0)
    out_b = m.generate(input_ids=b, max_new_tokens=new, do_sample=False, pad_token_id=0)
    assert torch.equal(out[0], out_a[0])
    assert torch.equal(out[1, pad:], out_b[0])



def tiny_bert(num_labels=3, vocab=60, dtype=torch.float32):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, num_labels=num_labels, max_position_embeddings=64,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="sdpa")
    return BertForSequenceClassification(cfg).to(dtype).eval()



needs_kernel = pytest.mark.skipif(cpu_kernel.load() is None, reason="fused CPU kernel not built here")



def spy_on_kernel(monkeypatch, name):
    """Counts the calls of the kernel function ``name`` (the kernel's other functions still work)."""
    calls, real = [], cpu_kernel.load()

    class Spy:
        def __getattr__(self, attr):
            return getattr(real, attr)

    def counted(*a):
        calls.append(1)
        return getattr(real, name)(*a)

    spy = Spy()
    spy.__dict__[name] = counted
    monkeypatch.setattr(cpu_kernel, "_module", spy)
    return calls


def standin_chunk_linear_attn(q, k, v, scale=None, initial_state=None, output_final_state=False, normalize=True,
                              cu_seqlens=None):
    """fla-core 0.6 ``chunk_linear_attn`` semantics in float64: [B, T, H, K] in, [B, H, K, V] state."""
    if q.shape[1] < q.shape[2]:  # fla's own guard against head-first input
        raise DeprecationWarning(f"seq_len ({q.shape[1]}) < num_heads ({q.shape[2]})")
    assert cu_seqlens is None
    scale = k.shape[-1] ** -0.5 if scale is None else scale
    qd, kd, vd = (t.double() for t in (q, k, v))
    kv = torch.einsum("bthk,bthv->bthkv", kd, vd).cumsum(1)
    if initial_state is not None:
        kv = kv + initial_state.double().unsqueeze(1)
    o = torch.einsum("bthk,bthkv->bthv", qd * scale, kv)
    if normalize:
        o = o / torch.einsum("bthk,bthk->bth", qd * scale, kd.cumsum(1)).unsqueeze(-1)
    return o.to(q.dtype), (kv[:, -1].float() if output_final_state else None)
