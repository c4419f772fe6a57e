"""`hedgehog generate`: stream a continuation."""
from __future__ import annotations

import argparse

from hedgehog.errors import UserError
from hedgehog.cli.common import (add_device, add_dtype, add_sparse_cache_options, apply_sparse_cache, load_any,
                                 placement, setup_logging)


def _generate(args):
    import time

    import torch
    from transformers import TextStreamer

    from hedgehog.layers.generation import cache_nbytes, output_cache

    setup_logging()
    device, dtype = placement(args)
    model, tok, kind = load_any(args.model, args.base_model, device, dtype)
    if tok is None:
        raise UserError(f"{args.model} has no tokenizer; save one with the model")
    if kind == "hedgehog":
        apply_sparse_cache(model, args)
    prompt = args.prompt
    if args.chat:
        prompt = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt").input_ids.to(device)
    streamer = TextStreamer(tok, skip_prompt=False, skip_special_tokens=True)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                         temperature=args.temperature if args.temperature > 0 else None, top_k=args.top_k or None,
                         streamer=streamer, return_dict_in_generate=True, pad_token_id=tok.eos_token_id)
    dt = time.perf_counter() - t0
    new = out.sequences.shape[1] - ids.shape[1]
    cache = output_cache(out)
    if hasattr(cache, "state_nbytes"):
        mem = f"recurrent state {cache.state_nbytes() / 2**20:.2f} MiB (constant in length)"
    else:
        mem = f"KV cache {cache_nbytes(cache) / 2**20:.2f} MiB (grows with length)"
    print(f"\n[{kind}] {new} new tokens in {dt:.2f} s ({new / dt:.1f} tok/s incl. prefill of {ids.shape[1]}); {mem}")


def register(sub) -> None:
    g = sub.add_parser("generate", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       help="stream a continuation from a converted (or original) model",
                       description="Generate text with a model saved by `hedgehog convert` (decodes with a constant-size "
                                   "recurrent state) or with the original softmax model ('smollm2', a dir or hub id) "
                                   "for comparison. Tokens are streamed to the terminal.")
    g.add_argument("--model", required=True, help="converted model dir (e.g. runs/smollm2-hedgehog/model), 'smollm2', "
                   "a model dir or hub id")
    g.add_argument("--prompt", required=True, help="prompt text")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
    g.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = all)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g.add_argument("--base-model", default=None, help="override the base model recorded in a converted dir")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    add_device(g, "where the model runs")
    add_dtype(g)
    add_sparse_cache_options(g, None, None)
    g.set_defaults(func=_generate)

