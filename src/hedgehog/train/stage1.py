"""Stage 1, attention transfer (the paper's attention distillation).

The teacher is the frozen softmax attention of each layer, and only the feature maps train. Because the student
never changes the teacher's activations, every layer can be trained from one teacher forward: we capture each
layer's post-RoPE (q, k, v) under ``no_grad`` and then minimise the sum over layers of the per-layer loss. Each
layer's loss is back-propagated on its own, so only one layer's graph is alive at a time. Per token this is far
cheaper than a full-model forward/backward.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn

from hedgehog.layers.attention import Mode, hedgehog_layers, set_attention_mode
from hedgehog.layers.capture import capture_qkv
from hedgehog.train.engine import Engine, cycle_batches
from hedgehog.train.loop import engine_for, record_step, time_cap_hit
from hedgehog.train.resume import StageCheckpoint, restore_training_state, training_state

log = logging.getLogger("hedgehog")


def feature_map_parameters(model: nn.Module) -> List[nn.Parameter]:
    return feature_map_parameters_of(hedgehog_layers(model))


def feature_map_parameters_of(layers) -> List[nn.Parameter]:
    return [p for layer in layers for m in layer.trainable_modules().values() for p in m.parameters()]


@dataclass
class Stage1Config:
    # The default job's budget (SmolLM2-135M, 2 CPU cores, <= 30 min): half of the former 131k costs little at
    # 512-4k tokens but learns shorter state decays, which shows at 8k (docs/results.md, "Budgets")
    tokens: int = 65536
    lr: float = 1e-2
    batch_size: int = 2
    # Optimizer steps per captured batch, each on a disjoint random subset of the query rows (every row
    # still sees all its keys): an unbiased estimate of the same loss, and more updates per unit of
    # compute, which is what these small per-head maps need (the loss costs O(rows x N)).
    steps_per_capture: int = 4
    warmup_steps: int = 10
    time_budget_s: Optional[float] = None  # opt-in cap: stop early when exceeded (logged, and in the report)
    checkpoint_every: int = 8  # captured batches between mid-stage checkpoints (with a checkpoint file)
    # 0: one teacher forward captures every layer's q/k/v per batch; k: k layers per forward (block-wise
    # transfer as in LoLCATs: the captures shrink by layers/k for up to layers/k partial forwards per batch).
    # The maps train to the same values either way (each layer's maps see the same gradients and steps).
    layer_block: int = 0
    # Each batch's positions start at a random offset in [0, position_offsets] (seeded by the batch index), so the
    # maps see the post-RoPE q/k of the positions the model is used at, not only 0..seq_len-1 (0: no offset).
    position_offsets: int = 0


def batch_positions(max_offset: int, index: int, n: int, device=None) -> Optional[torch.Tensor]:
    """Position ids ``(1, n)`` for batch ``index``: ``offset .. offset + n - 1`` with ``offset`` drawn uniformly
    from [0, max_offset] by a generator seeded with ``index`` (the same on every rank and after a resume); None
    when ``max_offset`` is 0 (the model's own 0 .. n - 1).

    Why: the feature maps read post-RoPE q and k, so phi(q_i).phi(k_j) depends on the absolute positions i, j and
    not only on i - j as softmax does. Trained on positions below seq_len only, a converted model scored on the
    same 512 tokens placed at position 3,584 was 8.9x the teacher's perplexity instead of 1.16x (docs/results.md);
    the teacher itself is unchanged by the shift, so the targets stay what they were."""
    if max_offset <= 0:
        return None
    g = torch.Generator().manual_seed(0x5EED + index)
    offset = int(torch.randint(0, max_offset + 1, (1,), generator=g))
    return torch.arange(offset, offset + n, device=device)[None]


def memory_plan(model: nn.Module, rows_per_rank: int, seq_len: int, layer_block: int = 0) -> Dict[str, float]:
    """GB held by stage 1's captures per batch (q, k, v of the captured layers, in the model's dtype), for all
    layers at once and for ``layer_block`` layers, next to the teacher's weights."""
    layers = hedgehog_layers(model)
    p = next(model.parameters())
    per_layer = [rows_per_rank * seq_len * (l.num_q_heads + 2 * l.num_kv_heads) * l.hh_head_dim * p.element_size()
                 for l in layers]
    block = layer_block or len(layers)
    gb = 2 ** 30
    return {"weights_gb": sum(t.numel() * t.element_size() for t in model.parameters()) / gb,
            "captures_all_layers_gb": sum(per_layer) / gb,
            "captures_per_forward_gb": max(sum(per_layer[i:i + block]) for i in range(0, len(layers), block)) / gb,
            "layers_per_forward": block, "forwards_per_batch": -(-len(layers) // block)}


def attention_transfer(model: nn.Module, windows: torch.Tensor, cfg: Stage1Config,
                       callback: Optional[Callable[[Dict], None]] = None, progress: bool = True,
                       checkpoint: Optional[StageCheckpoint] = None, engine: Optional[Engine] = None) -> Dict:
    """Stage 1. ``windows``: (num_windows, seq_len) token ids. Returns the training history.

    With ``checkpoint``, the stage saves its state every ``cfg.checkpoint_every`` batches and at its end, and
    a saved state is picked up where it stopped (same data position, schedule, optimizer and RNG).
    ``engine``: where and on how many processes (default: one process on the model's device); each rank
    captures its share of every batch, and the feature maps' gradients are averaged over the ranks.
    """
    engine = engine_for(model, engine, progress)
    engine.check_batch(cfg.batch_size, "the stage 1 batch (--stage1-batch)")
    layers = hedgehog_layers(model)
    if not layers:
        raise ValueError("model has no Hedgehog attention layers; convert it first")
    for p in model.parameters():
        p.requires_grad_(False)
    params = feature_map_parameters(model)
    for p in params:
        p.requires_grad_(True)
    if not params:  # parameter-free maps (elu, relu, performer, cosformer, taylor): nothing to train
        return {"steps": 0, "tokens": 0, "seconds": 0.0, "history": [], "note": "feature map has no parameters"}
    block = cfg.layer_block if 0 < cfg.layer_block < len(layers) else len(layers)
    blocks = [layers[i:i + block] for i in range(0, len(layers), block)]
    block_params = [feature_map_parameters_of(b) for b in blocks]
    plan = memory_plan(model, cfg.batch_size // engine.world, windows.shape[1], block)
    log.info("stage 1 memory plan: weights %.2f GB; captured q/k/v %.2f GB per forward (%d layers, %d forwards per "
             "batch; all layers at once: %.2f GB)", plan["weights_gb"], plan["captures_per_forward_gb"],
             plan["layers_per_forward"], plan["forwards_per_batch"], plan["captures_all_layers_gb"])
    opt = torch.optim.Adam(params, lr=cfg.lr)
    seq_len = windows.shape[1]
    spc = 1 if layers[0].hh_config.distill_loss == "mse" else max(1, cfg.steps_per_capture)
    captures = max(1, cfg.tokens // (cfg.batch_size * seq_len)) if cfg.tokens > 0 else 0
    planned = captures * cfg.batch_size * seq_len
    total_steps = captures * spc
    gen = torch.Generator().manual_seed(0)
    history, tokens, step, n_caps, seconds = [], 0, 0, 0, 0.0
    state = checkpoint.load() if checkpoint else None
    if state:
        restore_training_state(state, params, opt, checkpoint.path)
        gen.set_state(state["generator"])
        history, tokens, step, n_caps, seconds = (state[k] for k in ("history", "tokens", "step", "batch", "seconds"))
        log.info("stage 1: resuming from %s at batch %d of %d", checkpoint.path, n_caps, captures)
    t0 = time.perf_counter() - seconds
    capped = False

    def save():
        state = {**training_state(params, opt, step=step, batch=n_caps, tokens=tokens, history=history,
                                  seconds=time.perf_counter() - t0), "generator": gen.get_state()}
        engine.on_main(lambda: checkpoint.save(state))

    bar = engine.bar(total=captures, initial=n_caps, desc="stage 1 (attention transfer)", unit="batch")
    for _, batch in cycle_batches(windows, cfg.batch_size, start=n_caps * cfg.batch_size):
        if n_caps >= captures:
            break
        if cfg.time_budget_s and engine.any(time_cap_hit("stage 1", cfg, t0, tokens, planned)):
            capped = True
            break
        (mine,) = engine.local(batch)
        subsets = torch.randperm(seq_len, generator=gen).chunk(spc) if spc > 1 else [None]
        per_layer = [0.0] * len(layers)  # mean over the subsets: an estimate of the full loss
        first = 0
        pos = batch_positions(cfg.position_offsets, n_caps, seq_len, mine.device)
        for blk, blk_params in zip(blocks, block_params):
            caps = capture_qkv(model, mine, None if len(blocks) == 1 else blk, pos)
            for j, rows in enumerate(subsets):
                engine.set_lr(opt, cfg.lr, step + j, total_steps, cfg.warmup_steps)
                for i, (layer, cap) in enumerate(zip(blk, caps), start=first):
                    with torch.enable_grad(), engine.autocast():
                        loss = layer.layer_distill_loss(cap.q, cap.k, cap.v, query_index=rows, teacher=cap.teacher)
                    # each layer's graph is freed by its own backward: one layer's graph alive at a time
                    where = f"stage 1, layer {layer.layer_idx}, step {step + j}"
                    per_layer[i] += engine.backward(loss, where) / len(subsets)
                # Adam is per tensor: stepping one block's maps at a time is the same update as all at once
                engine.step(opt, blk_params, lr=cfg.lr, sync=True)
            first += len(blk)
            del caps
        step += len(subsets)
        per_layer = engine.means(per_layer)
        n_caps += 1
        tokens += batch.numel()
        rec = {"step": step, "batch": n_caps, "tokens": tokens, "seconds": time.perf_counter() - t0,
               "loss": sum(per_layer) / len(per_layer), "layer_loss": per_layer}
        record_step(rec, history, bar, callback, checkpoint and checkpoint.due(n_caps) and save)
    bar.close()
    if checkpoint:
        save()
    set_attention_mode(model, Mode.STUDENT)
    for p in params:
        p.requires_grad_(False)
    return {"steps": step, "captures": n_caps, "tokens": tokens, "tokens_planned": planned, "memory_plan": plan,
            "stopped_by_time_cap": capped, "resumed": state is not None,
            "seconds": time.perf_counter() - t0, "history": history}
