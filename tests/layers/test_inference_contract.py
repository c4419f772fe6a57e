"""Every inference entry point runs grad-free, takes the fused CPU kernel, and holds no memory per window.

The main job once ran out of memory because a ``no_grad`` decorator moved from ``window_nll`` to a helper:
every perplexity pass built autograd graphs and kept them alive, and the fused kernel (which serves only
grad-free calls) was silently skipped. These tests watch every module forward that an entry point runs.
"""
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import needs_kernel, spy_on_kernel

from hedgehog.layers.attention import HedgehogConfig, set_attention_mode
from hedgehog.models.convert import convert_model


class ForwardWatch:
    """Records, for every module forward in the block, whether grad mode was on and whether any output
    tensor carries a ``grad_fn`` (an autograd graph that would keep activations alive)."""

    def __enter__(self):
        self.calls = 0
        self.with_grad = []

        def hook(module, args, output):
            self.calls += 1
            if isinstance(output, torch.Tensor):
                outs = [output]
            elif isinstance(output, dict):  # ModelOutput
                outs = list(output.values())
            else:
                outs = list(output) if isinstance(output, (tuple, list)) else []
            graph = any(isinstance(t, torch.Tensor) and t.grad_fn is not None for t in outs)
            if torch.is_grad_enabled() or graph:
                self.with_grad.append(type(module).__name__)

        self.handle = torch.nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()
        return False

    def assert_grad_free(self):
        assert self.calls > 0, "the entry point ran no module forward: the watch saw nothing"
        assert not self.with_grad, f"forwards with autograd on: {sorted(set(self.with_grad))[:8]}"


@pytest.fixture
def converted(tiny_assets):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_assets["model"], attn_implementation="sdpa")
    convert_model(model, HedgehogConfig())
    for p in model.parameters():  # as after training: trainable maps and weights require grad
        p.requires_grad_(True)
    return model.eval()


def windows(n=6, length=24, vocab=30):
    return torch.randint(2, vocab, (n, length), generator=torch.Generator().manual_seed(0))


def test_watch_catches_a_forward_with_grad(converted):
    """The watch itself can fail: a plain forward with grad on is reported."""
    with ForwardWatch() as w:
        out = converted(input_ids=windows(1)).logits
    assert out.grad_fn is not None and w.with_grad
    with pytest.raises(AssertionError, match="autograd on"):
        w.assert_grad_free()


def test_window_nll_and_perplexity_are_grad_free(converted):
    from hedgehog.eval.fidelity import perplexity, window_nll

    with ForwardWatch() as w:
        nll = window_nll(converted, windows(), batch_size=2, progress=False)
        ppl = perplexity(converted, windows(), batch_size=2, progress=False)
    w.assert_grad_free()
    assert nll.grad_fn is None and not nll.requires_grad and ppl > 1.0


@needs_kernel
def test_model_level_perplexity_takes_the_fused_kernel(converted, monkeypatch):
    """Trainable parameters must not push evaluation off the fused kernel: one call per layer per batch."""
    from hedgehog.eval.fidelity import perplexity

    calls = spy_on_kernel(monkeypatch, "causal_forward")
    set_attention_mode(converted, "student")
    perplexity(converted, windows(4), batch_size=2, progress=False)
    assert len(calls) == 2 * converted.config.num_hidden_layers


def test_layer_attention_kl_is_grad_free(converted):
    from hedgehog.eval.fidelity import layer_attention_kl

    with ForwardWatch() as w:
        res = layer_attention_kl(converted, windows(2))
    w.assert_grad_free()
    assert len(res) == converted.config.num_hidden_layers and all(r["kl"] >= 0 for r in res)


def test_generate_is_grad_free(converted):
    from hedgehog.layers.generation import install_generation_cache

    install_generation_cache(converted)
    with ForwardWatch() as w:
        out = converted.generate(windows(1, 5), max_new_tokens=4, do_sample=False, pad_token_id=1)
    w.assert_grad_free()
    assert out.shape == (1, 9)


def test_mqar_accuracy_is_grad_free():
    from hedgehog.train.scratch.model import ModelSpec, build_model
    from hedgehog.train.scratch.mqar import MQARConfig, mqar_accuracy, mqar_batch

    task = MQARConfig(vocab_size=16, num_kv_pairs=2, seq_len=12)
    model = build_model("hedgehog", ModelSpec(vocab_size=16, d_model=16, layers=1, heads=2))
    ids, targets = mqar_batch(8, task, torch.Generator().manual_seed(0))
    with ForwardWatch() as w:
        acc = mqar_accuracy(model, ids, targets)
    w.assert_grad_free()
    assert 0.0 <= acc <= 1.0


def test_encoder_accuracy_and_embeddings_are_grad_free():
    from conftest import tiny_bert

    from hedgehog.jobs.encoder import accuracy, sentence_embeddings

    model = convert_model(tiny_bert(), HedgehogConfig())
    ids, labels = torch.randint(0, 60, (6, 10)), torch.randint(0, 3, (6,))
    with ForwardWatch() as w:
        acc = accuracy(model, ids, labels, batch_size=4)
        emb = sentence_embeddings(model, ids, batch_size=4)
    w.assert_grad_free()
    assert 0.0 <= acc <= 1.0 and emb.grad_fn is None


def test_analyze_is_grad_free(tiny_assets, tmp_path):
    from hedgehog.eval import analyze

    with ForwardWatch() as w:
        analyze.run(tiny_assets["model"], str(tmp_path), ["hedgehog", "elu"], data=tiny_assets["data"], windows=1,
                    seq_len=16, span=8)
    w.assert_grad_free()


def test_benchmarks_are_grad_free(converted, tiny_assets):
    from hedgehog.bench import attention, decode, prefill

    with ForwardWatch() as w:
        prefill.prefill_seconds(converted, windows(1, 32), repeats=1)
        decode.decode_latency(converted, "hedgehog", 8, windows(1, 8), steps=2, real=True)
        attention.run([32], heads=2, head_dim=8, repeats=1, backward=False, log=lambda *a: None,
                      measure_memory=False)
    w.assert_grad_free()


MEMORY_PROBE = textwrap.dedent("""
    import json, resource, sys
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from hedgehog.eval.fidelity import perplexity
    from hedgehog.models.convert import convert_model

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = convert_model(LlamaForCausalLM(cfg)).eval()
    ids = torch.randint(0, 4096, (int(sys.argv[1]), 256))
    def peak_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    perplexity(model, ids[:2], batch_size=2, progress=False)  # warm-up: allocator pools, kernels
    before = peak_mb()
    perplexity(model, ids, batch_size=2, progress=False)
    print(json.dumps({"before": before, "after": peak_mb()}))
""")


def test_perplexity_peak_memory_does_not_grow_with_windows():
    """32 windows must peak where 2 windows do (graphs kept per window would add ~25 MB each here)."""
    run = subprocess.run([sys.executable, "-c", MEMORY_PROBE, "32"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    mb = json.loads(run.stdout.strip().splitlines()[-1])
    assert mb["after"] - mb["before"] < 64, mb
