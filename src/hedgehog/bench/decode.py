"""Decode benchmark: per-token latency and memory vs context length, Hedgehog state vs softmax KV cache.

Run:  hedgehog bench decode [--model smollm2|RUN/model] [--contexts 256,...,32768]

For every context length L, each model is brought to L tokens of context, then ``--steps`` single
tokens are decoded one at a time (greedy, ``use_cache``) and timed; the median per-token latency is
reported with the bytes held by the cache (Hedgehog: recurrent state; softmax: keys/values) and the
process RSS high-water mark through context fill + decoding (VmHWM reset before the fill) above the RSS
before it. Latency is per decode step; with ``--batch B`` each step decodes one token for B sequences.

Context fill: for L <= ``--max-real-prefill`` (default 4096) the context is a real prefill of text
tokens. Above it the cache is filled synthetically with tensors of exactly the shapes a prefill
would leave (softmax: L keys/values per layer; Hedgehog: its state, which has no length), because a
softmax prefill of 32k tokens takes minutes here and decode cost depends only on those shapes.
The output marks which rows used which.

``--batch 1,8,32`` times every context at each batch (a row whose cache would not fit ``--memory-gb`` is
skipped for that model). With ``--memory-gb M``, for each context the largest batch each model fits in M GB
(weights + cache + one step's logits) is computed from the per-sequence cache bytes, and both models decode at
their largest batch (Hedgehog capped at ``--max-batch``): tokens/s and batch, Hedgehog against softmax, under
equal memory. Decoding updates each layer's state in place, one batched matmul per layer.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Dict, List

import torch

from hedgehog.bench.attention import _vm_kb, reset_peak_rss, sync_device
from hedgehog.errors import UserError
from hedgehog.layers.generation import cache_kwargs, cache_nbytes
from hedgehog.train.engine import DTYPES

DEFAULT_CONTEXTS = [256, 1024, 4096, 8192, 16384, 32768]
SHAPE_MODEL = "smollm2-shape"  # --model: SmolLM2-135M's shape with random weights (see load_pair)


def _fill_cache(model, kind: str, L: int, ids: torch.Tensor, real: bool, batch: int = 1):
    """Returns (cache, next_token) with L tokens of context in the cache, on the model's device: the keys and
    values in its dtype, a Hedgehog state in float32 as a prefill leaves it."""
    from transformers import DynamicCache

    from hedgehog.layers.generation import HedgehogCache, HedgehogStateLayer

    p = next(model.parameters())
    dev, dt = p.device, p.dtype
    if real:
        cache = HedgehogCache(model) if kind == "hedgehog" else DynamicCache(config=model.config)
        with torch.no_grad():
            out = model(input_ids=ids[:, :L].to(dev).expand(batch, L), **cache_kwargs(model, cache), use_cache=True,
                        logits_to_keep=1)
        return cache, out.logits[:, -1:].argmax(-1)
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    kv = lambda *shape: (torch.randn(*shape, generator=g) * 0.5).to(dev, dt)  # keys/values: the model's dtype
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kvh = cfg.num_key_value_heads
    if kind == "hedgehog":
        from hedgehog.layers.attention import hedgehog_layers

        cache = HedgehogCache(model)
        ones = lambda *shape: torch.ones(*shape, dtype=torch.bool, device=dev)
        for layer, attn in zip(cache.layers, hedgehog_layers(model)):
            c, f = attn.hh_config, attn.feature_map_k.feature_dim
            S = torch.rand(batch, kvh, f, hd, generator=g).to(dev)
            z = (torch.rand(batch, kvh, f, generator=g) + 1.0).to(dev)
            if attn.hybrid and c.sparse_cache:
                layer.state = synthetic_sparse_state(c, batch, kvh, hd, f, L, S, z, g, dev, dt)
                layer.seen = L
            elif attn.hybrid:  # the last w keys/values of the context, the sinks, the state of the older ones
                w, s = min(L, c.window), min(L, c.sinks)
                sinks = (kv(batch, kvh, s, hd), kv(batch, kvh, s, hd), ones(batch, s)) if s else None
                layer.set_window(S, z, kv(batch, kvh, w, hd), kv(batch, kvh, w, hd), ones(batch, w), L,
                                 window=c.window, sinks=sinks, sink_slots=c.sinks)
            else:
                layer.set_state(S, z, L)
        assert all(isinstance(l, HedgehogStateLayer) for l in cache.layers)
    else:
        cache = DynamicCache(config=model.config)
        for i in range(cfg.num_hidden_layers):
            cache.update(kv(batch, kvh, L, hd), kv(batch, kvh, L, hd), i)
    return cache, ids[:, -1:].to(dev).expand(batch, 1)


def synthetic_sparse_state(c, batch: int, kvh: int, hd: int, f: int, L: int, S, z, g, device="cpu",
                           dtype=torch.float32):
    """A sparse-cache state of exactly the shapes ``L`` tokens of prefill leave (full cache and sinks, the recent
    keys since the last boundary), for decode timing without the prefill; keys/values in ``dtype``, the state
    and features in float32."""
    from hedgehog.ops.sparse_cache import empty_state

    st = empty_state(batch, kvh, hd, hd, f, c.sparse_cache, c.sinks, dtype, torch.float32, device)
    st.S, st.z, st.seen, st.boundary = S, z, L, L - L % c.sparse_chunk
    r = L - max(0, st.boundary - c.window + 1)
    rnd = lambda *shape, dt=dtype: (torch.randn(*shape, generator=g) * 0.5).to(device, dt)
    phi = lambda *shape: rnd(*shape, dt=torch.float32).abs()
    ones = lambda *shape: torch.ones(*shape, dtype=torch.bool, device=device)
    st.recent_k, st.recent_v, st.recent_phi = rnd(batch, kvh, r, hd), rnd(batch, kvh, r, hd), phi(batch, kvh, r, f)
    st.recent_ok = ones(batch, r)
    n = c.sparse_cache
    st.cache_k, st.cache_v, st.cache_phi = rnd(batch, kvh, n, hd), rnd(batch, kvh, n, hd), phi(batch, kvh, n, f)
    st.cache_ok = ones(batch, kvh, n)
    st.cache_pos = torch.arange(n, device=device).expand(batch, kvh, n).clone()
    st.sink_k, st.sink_v = rnd(batch, kvh, c.sinks, hd), rnd(batch, kvh, c.sinks, hd)
    st.sink_ok = ones(batch, c.sinks)
    return st


def decode_latency(model, kind: str, L: int, ids: torch.Tensor, steps: int, real: bool, batch: int = 1) -> Dict:
    """Median and best time of one decode step after ``L`` tokens of context, and the memory it holds: on the
    CPU the process RSS high-water mark above the RSS before the fill, on CUDA the device's peak allocation above
    what was allocated before it."""
    dev = next(model.parameters()).device
    cuda = dev.type == "cuda"
    if cuda:
        sync_device(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    else:
        rss0 = _vm_kb("VmRSS")
        hwm_ok = reset_peak_rss()  # peak from here: context fill + decode
    cache, nxt = _fill_cache(model, kind, L, ids, real, batch)
    pos = L
    times = []
    with torch.no_grad():
        for i in range(steps + 2):
            sync_device(dev)
            t0 = time.perf_counter()
            out = model(input_ids=nxt, **cache_kwargs(model, cache), use_cache=True,
                        cache_position=torch.tensor([pos], device=dev),
                        position_ids=torch.tensor([[pos]], device=dev).expand(batch, 1))
            nxt = out.logits[:, -1:].argmax(-1)
            sync_device(dev)
            if i >= 2:  # two warm-up steps
                times.append(time.perf_counter() - t0)
            pos += 1
    if cuda:
        peak = (torch.cuda.max_memory_allocated(dev) - base) / 2 ** 20
    else:
        peak = (_vm_kb("VmHWM") - rss0) / 1024 if hwm_ok else None
    cache_bytes = cache_nbytes(cache)
    return {"ms_per_token": 1e3 * statistics.median(times), "ms_min": 1e3 * min(times),
            "cache_mb": cache_bytes / 2 ** 20, "peak_mb": peak, "context_fill": "prefill" if real else "synthetic"}


def load_pair(model_name: str, attention: str = "hybrid", sparse_cache=None, device="cpu", dtype=torch.float32):
    """(hedgehog model, softmax model, tokenizer, description): a converted run's model dir and its base, or
    a base model and a copy converted with identity-initialised maps (timing does not depend on training); both
    on ``device``, loaded in ``dtype`` as ``hedgehog eval --dtype`` and ``convert --dtype`` load them.
    ``"smollm2-shape"`` (:data:`SHAPE_MODEL`): no download, a model of SmolLM2-135M's shape with random weights
    and no tokenizer (None), converted with the default job's settings; a machine without the package registry
    (a lent GPU) runs the benchmarks on it."""
    from hedgehog.layers.attention import set_sparse_cache
    from hedgehog.models.convert import convert_model

    if model_name == SHAPE_MODEL:  # no download: SmolLM2-135M's shape, random weights, the default job's attention
        from hedgehog.bench.stages import build_model
        from hedgehog.jobs.config import ConvertJob, hedgehog_config

        softmax, hedgehog = build_model(None, dtype), build_model(None, dtype)  # the same seed: the same weights
        convert_model(hedgehog, hedgehog_config(ConvertJob(attention=attention)))
        tok, desc = None, f"SmolLM2-135M's shape with random weights, converted ({attention}, the default job's settings)"
    else:
        hedgehog, softmax, tok, desc = _load_named(model_name, attention, dtype)
    if sparse_cache is not None:
        try:
            set_sparse_cache(hedgehog, sparse_cache)
        except ValueError as e:
            raise UserError(f"--sparse-cache: {e}") from None
        desc += f", sparse cache {sparse_cache}"
    return hedgehog.to(device), softmax.to(device), tok, desc


def _load_named(model_name: str, attention: str, dtype):
    """:func:`load_pair` for a converted run's dir or a base model (on the CPU)."""
    from hedgehog.jobs.config import ConvertJob, hedgehog_config
    from hedgehog.models.convert import convert_model
    from hedgehog.models.formats import is_converted_dir, read_meta
    from hedgehog.models.loading import load, load_base

    torch.manual_seed(0)
    base = read_meta(model_name)["base_model"] if is_converted_dir(model_name) else model_name
    softmax, tok, _ = load_base(base, dtype=dtype)

    if is_converted_dir(model_name):
        hedgehog, _ = load(model_name, dtype=dtype)
        desc = f"converted model {model_name}"
    else:
        hedgehog, _, _ = load_base(model_name, dtype=dtype)
        convert_model(hedgehog, hedgehog_config(ConvertJob(attention=attention)))  # as `hedgehog convert` would
        desc = f"{model_name} converted ({attention}, the default job's settings) with identity-initialised maps"
    return hedgehog, softmax, tok, desc


GB = 2 ** 30


def per_sequence_bytes(model, kind: str, L: int, ids: torch.Tensor) -> int:
    """Cache bytes one sequence of context L holds (the cache is linear in the batch), plus its step's logits."""
    cache, _ = _fill_cache(model, kind, L, ids[:, :2], False, 1)
    return cache_nbytes(cache) + model.config.vocab_size * 4


def weight_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in model.parameters())


def largest_batch(model, kind: str, L: int, ids: torch.Tensor, memory_gb: float) -> Dict:
    per_seq = per_sequence_bytes(model, kind, L, ids)
    room = memory_gb * GB - weight_bytes(model)
    return {"per_sequence_mb": per_seq / 2 ** 20, "largest_batch": max(0, int(room // per_seq))}


def run(model_name: str, contexts: List[int], steps: int, max_real_prefill: int, batch=1, log=print,
        memory_gb: float = None, max_batch: int = 1024, text: str = "shakespeare", attention: str = "hybrid",
        sparse_cache=None, device: str = "cpu", dtype: str = "fp32") -> Dict:
    """The benchmark as a function (the CLI's ``run_from_args`` calls it); ``text`` feeds the real prefills."""
    from hedgehog.data.corpora import load_corpus, tokenize_windows
    from hedgehog.train.engine import parse_dtype, resolve_device

    batches = [batch] if isinstance(batch, int) else list(batch)
    dev = resolve_device(device)
    hedgehog, softmax, tok, source = load_pair(model_name, attention, sparse_cache, dev, parse_dtype(dtype))
    need = min(max(contexts), max_real_prefill)
    if tok is None:  # a model of a shape: random token ids (the timing does not depend on them)
        ids = torch.randint(0, softmax.config.vocab_size, (1, max(need, 2)), generator=torch.Generator().manual_seed(0))
    else:
        corpus = load_corpus(text, tok)
        ids = tokenize_windows(corpus.splits["train"], tok, need, max_tokens=need)[:1]
    models = (("hedgehog", hedgehog), ("softmax", softmax))
    rows = []
    for L in contexts:
        real = L <= max_real_prefill
        fits = {kind: largest_batch(m, kind, L, ids, memory_gb)["largest_batch"] if memory_gb else None
                for kind, m in models}
        for b in batches:
            row = {"context": L, "batch": b}
            for kind, model in models:
                if fits[kind] is not None and b > fits[kind]:
                    continue  # this cache would not fit --memory-gb
                r = decode_latency(model, kind, L, ids if real else ids[:, :2], steps, real, b)
                r["tokens_per_s"] = b * 1e3 / r["ms_per_token"]
                row.update({f"{kind}_{k}": v for k, v in r.items()})
            if "hedgehog_ms_per_token" in row and "softmax_ms_per_token" in row:
                row["speedup"] = row["softmax_ms_per_token"] / row["hedgehog_ms_per_token"]
            rows.append(row)
            log(_fmt(row))
    first = [r for r in rows if r["batch"] == batches[0] and "hedgehog_ms_per_token" in r]
    for r in rows:
        if first and "hedgehog_ms_per_token" in r and r["batch"] == batches[0]:
            r["hedgehog_latency_vs_first"] = r["hedgehog_ms_per_token"] / first[0]["hedgehog_ms_per_token"]
    crossover = next((r["context"] for r in rows if r.get("speedup", 0) > 1.0), None)
    result = {"model": model_name, "source": source, "device": str(dev), "dtype": dtype, "steps": steps,
              "batch": batches, "threads": torch.get_num_threads(),
              "max_real_prefill": max_real_prefill, "rows": rows, "crossover_context": crossover}
    if memory_gb:
        result["capacity"] = capacity(models, contexts, ids, steps, memory_gb, max_batch, log)
        result["memory_gb"] = memory_gb
    return result


def capacity(models, contexts: List[int], ids: torch.Tensor, steps: int, memory_gb: float, max_batch: int,
             log=print) -> List[Dict]:
    """Per context: each model at the largest batch its cache fits in ``memory_gb`` (synthetic fill), decoded;
    tokens/s and batch of Hedgehog against softmax."""
    out = []
    log(f"equal memory, {memory_gb:g} GB (weights + cache + logits): each model at its largest batch")
    for L in contexts:
        row = {"context": L}
        for kind, model in models:
            fit = largest_batch(model, kind, L, ids, memory_gb)
            b = min(fit["largest_batch"], max_batch)
            row.update({f"{kind}_{k}": v for k, v in fit.items()})
            row[f"{kind}_batch"] = b
            if b < 1:
                continue
            r = decode_latency(model, kind, L, ids[:, :2], steps, False, b)
            row[f"{kind}_tokens_per_s"] = b * 1e3 / r["ms_per_token"]
            row[f"{kind}_ms_per_step"] = r["ms_per_token"]
            row[f"{kind}_peak_mb"] = r["peak_mb"]
        if row.get("softmax_tokens_per_s") and row.get("hedgehog_tokens_per_s"):
            row["throughput_ratio"] = row["hedgehog_tokens_per_s"] / row["softmax_tokens_per_s"]
            row["batch_ratio"] = row["hedgehog_largest_batch"] / max(1, row["softmax_largest_batch"])
        out.append(row)
        log(f"{L:>8} | hedgehog batch {row['hedgehog_batch']} (fits {row['hedgehog_largest_batch']}) "
            f"{row.get('hedgehog_tokens_per_s', 0):.1f} tok/s | softmax batch {row['softmax_batch']} "
            f"{row.get('softmax_tokens_per_s', 0):.1f} tok/s | throughput {row.get('throughput_ratio', 0):.1f}x, "
            f"batch {row.get('batch_ratio', 0):.0f}x")
    return out


HEADER = (f"{'context':>8} {'batch':>5} | {'hh ms/step':>10} {'sm ms/step':>10} {'speedup':>7} | {'hh tok/s':>8} "
          f"{'sm tok/s':>8} | {'hh state MB':>11} {'sm KV MB':>9} | {'hh peak MB':>10} {'sm peak MB':>10} | fill")


def _fmt(r: Dict) -> str:
    def f(key, fmt):
        return "-" if r.get(key) is None else format(r[key], fmt)

    return (f"{r['context']:>8} {r['batch']:>5} | {f('hedgehog_ms_per_token', '.1f'):>10} "
            f"{f('softmax_ms_per_token', '.1f'):>10} {f('speedup', '.2f') + 'x':>7} | "
            f"{f('hedgehog_tokens_per_s', '.1f'):>8} {f('softmax_tokens_per_s', '.1f'):>8} | "
            f"{f('hedgehog_cache_mb', '.2f'):>11} {f('softmax_cache_mb', '.1f'):>9} | "
            f"{f('hedgehog_peak_mb', '.1f'):>10} {f('softmax_peak_mb', '.1f'):>10} | "
            f"{r.get('hedgehog_context_fill', '-')}")


def plot(result: Dict, path: Path) -> None:
    from hedgehog.eval.plotting import pyplot, save_figure

    plt = pyplot()

    cap = result.get("capacity")
    fig, axes = plt.subplots(1, 3 if cap else 2, figsize=(16 if cap else 11, 4))
    for b in result["batch"]:
        rows = [r for r in result["rows"] if r["batch"] == b]
        for kind, mark, label in (("hedgehog", "o-", "Hedgehog"), ("softmax", "s--", "softmax")):
            pts = [(r["context"], r[f"{kind}_tokens_per_s"], r[f"{kind}_cache_mb"]) for r in rows
                   if f"{kind}_tokens_per_s" in r]
            if pts:
                axes[0].loglog([p[0] for p in pts], [p[1] for p in pts], mark, label=f"{label}, batch {b}")
                axes[1].loglog([p[0] for p in pts], [max(p[2], 1e-3) for p in pts], mark, label=f"{label}, batch {b}")
    axes[0].set_xlabel("context length")
    axes[0].set_ylabel("decoded tokens / s")
    axes[0].set_title("decode throughput")
    axes[0].legend(fontsize=7)
    axes[1].set_xlabel("context length")
    axes[1].set_ylabel("cache MB")
    axes[1].set_title("cache memory (state vs KV)")
    axes[1].legend(fontsize=7)
    if cap:
        L = [str(r["context"]) for r in cap]
        x = range(len(cap))
        axes[2].bar([i - 0.2 for i in x], [r.get("hedgehog_tokens_per_s", 0) for r in cap], width=0.4,
                    label="Hedgehog at its largest batch")
        axes[2].bar([i + 0.2 for i in x], [r.get("softmax_tokens_per_s", 0) for r in cap], width=0.4,
                    label="softmax at its largest batch")
        axes[2].set_xticks(list(x), L)
        axes[2].set_yscale("log")
        axes[2].set_xlabel("context length")
        axes[2].set_ylabel("tokens / s")
        axes[2].set_title(f"equal memory: {result['memory_gb']:g} GB")
        axes[2].legend(fontsize=7)
    where = (f"{result['threads']} CPU threads" if result.get("device", "cpu") == "cpu"
             else result["device"])
    fig.suptitle(f"{result['source']}, {where}, {result.get('dtype', 'fp32')}")
    save_figure(fig, path, dpi=110)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="'smollm2', a base model dir/hub id (converted with untrained "
                   "maps for timing), a converted run's model dir, or 'smollm2-shape' (SmolLM2's shape, random "
                   "weights, nothing to download) (default: %(default)s)")
    p.add_argument("--contexts", default=",".join(map(str, DEFAULT_CONTEXTS)),
                   help="comma-separated context lengths (default: %(default)s)")
    p.add_argument("--steps", type=int, default=16, help="timed decode steps per point (default: %(default)s)")
    p.add_argument("--batch", default="1", help="comma-separated batch sizes: sequences decoded together "
                   "(default: %(default)s)")
    p.add_argument("--memory-gb", type=float, default=None,
                   help="a memory budget: skip rows whose cache does not fit, and decode each model at the largest "
                        "batch it fits (equal-memory throughput)")
    p.add_argument("--max-batch", type=int, default=1024,
                   help="cap on the equal-memory batch (Hedgehog fits thousands of sequences) (default: %(default)s)")
    p.add_argument("--attention", choices=["hybrid", "linear"], default="hybrid",
                   help="with a base --model: the attention it is converted to (default: %(default)s, the default job's)")
    p.add_argument("--sparse-cache", type=int, default=None,
                   help="hybrid: decode with a sparse cache of this many exact keys per KV head (LoLA; 0: none; "
                        "default: as the model has it)")
    p.add_argument("--max-real-prefill", type=int, default=4096,
                   help="real prefill up to this context; synthetic cache fill above (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="'cpu', 'cuda', 'cuda:N' or 'auto' (default: %(default)s); on "
                   "CUDA each step is synchronised and the peak is the device's allocation")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32",
                   help="both models' weights and caches (the Hedgehog state stays float32) (default: %(default)s)")
    p.add_argument("--out", default="bench_out/decode", help="output dir for JSON + PNG (default: %(default)s)")


def _ints(text: str, what: str, low: int):
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        vals = []
    if not vals or min(vals) < low:
        raise UserError(f"{what} must be comma-separated integers >= {low}, got {text!r}")
    return vals


def run_from_args(args) -> Dict:
    contexts = _ints(args.contexts, "--contexts", 2)
    batches = _ints(str(args.batch), "--batch", 1)
    if args.memory_gb is not None and args.memory_gb <= 0:
        raise UserError(f"--memory-gb must be positive, got {args.memory_gb}")
    from hedgehog.train.engine import device_arg

    device_arg(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(HEADER)
    result = run(args.model, contexts, args.steps, args.max_real_prefill, batches, memory_gb=args.memory_gb,
                 max_batch=args.max_batch, attention=args.attention, sparse_cache=args.sparse_cache,
                 device=args.device, dtype=args.dtype)
    (out / "decode.json").write_text(json.dumps(result, indent=2))
    plot(result, out / "decode.png")
    rows = [r for r in result["rows"] if "hedgehog_latency_vs_first" in r]
    if len(rows) > 1:
        print(f"Hedgehog latency at {rows[-1]['context']} vs {rows[0]['context']} (batch {rows[0]['batch']}): "
              f"{rows[-1]['hedgehog_latency_vs_first']:.2f}x; crossover (Hedgehog faster) at context "
              f"{result['crossover_context']}")
    for r in result["rows"]:
        if r["context"] == 16384 and "speedup" in r:
            print(f"at 16k context, batch {r['batch']}: Hedgehog {r['speedup']:.1f}x the tokens/s of softmax + KV cache")
    for r in result.get("capacity", []):
        if "throughput_ratio" in r:
            print(f"at {r['context']} context in {result['memory_gb']:g} GB: Hedgehog fits {r['batch_ratio']:.0f}x the "
                  f"batch ({r['hedgehog_largest_batch']} vs {r['softmax_largest_batch']}) and decodes "
                  f"{r['throughput_ratio']:.1f}x the tokens/s (batch {r['hedgehog_batch']} vs {r['softmax_batch']})")
    print(f"wrote {out / 'decode.json'} and {out / 'decode.png'}")
    return result
