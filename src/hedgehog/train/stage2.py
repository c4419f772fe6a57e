"""Stage 2: LoRA (peft) on the attention projections of the converted model, trained on next-token loss or by KD
to the teacher (the same model in teacher mode with the adapter off); feature maps optionally trainable."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn

from hedgehog.layers.attention import Mode, attention_mode, set_attention_mode
from hedgehog.layers.capture import positions_kw
from hedgehog.train.engine import Engine, cycle_batches
from hedgehog.train.loop import engine_for, record_step, time_cap_hit
from hedgehog.train.resume import StageCheckpoint, restore_training_state, training_state
from hedgehog.train.stage1 import batch_positions, feature_map_parameters

log = logging.getLogger("hedgehog")


@dataclass
class Stage2Config:
    # With the sparse cache present (the default job), KD reaches its final validation ratio within ~a quarter of
    # the 98k tokens it used to take; without the cache (--sparse-cache 0) 98k still pays (docs/results.md)
    tokens: int = 24576
    lr: float = 3e-3
    batch_size: int = 1
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    train_feature_maps: bool = True
    lora_targets: str = "attention"  # "attention" (q/k/v/o) or "all" (attention + MLP projections)
    # "kd": KL(teacher || student) on next-token distributions, the teacher being the same model with
    # the adapter off and softmax attention (one extra forward per step, far more signal per token
    # than one label; it trains fidelity, not the training text); "ce": next-token cross-entropy on the text.
    loss: str = "kd"
    warmup_steps: int = 5
    grad_clip: float = 1.0
    grad_accum: int = 1  # micro-batches per optimizer step (the batch is split; same result, less memory)
    gradient_checkpointing: bool = False  # recompute each decoder layer in the backward (less memory, slower)
    time_budget_s: Optional[float] = None  # opt-in cap: stop early when exceeded (logged, and in the report)
    checkpoint_every: int = 25  # steps between mid-stage checkpoints (with a checkpoint file)
    position_offsets: int = 0  # as in Stage1Config: random position offsets up to this, per step
    # Tokens per stage-2 window; None: the job's --seq-len. Longer windows let the state's decay and the maps
    # learn what the linear part holds past the exact window (the long-context evaluation).
    seq_len: Optional[int] = None


def add_lora(model: nn.Module, cfg: Stage2Config):
    """Wrap the converted model with peft LoRA on its attention projections (returns a PeftModel)."""
    from peft import LoraConfig, get_peft_model

    from hedgehog.models.convert import get_adapter

    adapter = get_adapter(model)
    if cfg.lora_targets not in ("attention", "all"):
        raise ValueError(f"lora_targets must be 'attention' or 'all', got {cfg.lora_targets!r}")
    targets = adapter.lora_target_modules(model, cfg.lora_targets)
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
                      target_modules=targets)
    pm = get_peft_model(model, lcfg)
    if cfg.loss not in ("kd", "ce"):
        raise ValueError(f"unknown stage 2 loss {cfg.loss!r}; choose 'kd' or 'ce'")
    if cfg.train_feature_maps:
        for p in feature_map_parameters(pm):
            p.requires_grad_(True)
    return pm


def _kd_loss(model: nn.Module, peft_model, batch: torch.Tensor, position_ids=None) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) between next-token distributions. ``model``: what the
    student forward runs through (``peft_model`` itself, or its DDP/FSDP wrapper); the teacher is
    ``peft_model`` with the adapter off and softmax attention."""
    import torch.nn.functional as F

    with torch.no_grad(), peft_model.disable_adapter(), attention_mode(peft_model, Mode.TEACHER):
        t_logp = F.log_softmax(peft_model(input_ids=batch, use_cache=False,
                                          **positions_kw(position_ids)).logits.float(), -1)
    s_logp = F.log_softmax(model(input_ids=batch, use_cache=False, **positions_kw(position_ids)).logits.float(), -1)
    return F.kl_div(s_logp.flatten(0, 1), t_logp.flatten(0, 1), log_target=True, reduction="sum") / (
        batch.shape[0] * batch.shape[1])


def lora_finetune(peft_model: nn.Module, windows: torch.Tensor, cfg: Stage2Config,
                  callback: Optional[Callable[[Dict], None]] = None, progress: bool = True,
                  checkpoint: Optional[StageCheckpoint] = None, engine: Optional[Engine] = None) -> Dict:
    """Stage 2: next-token loss through the linear-attention model; trains LoRA (+ maps if asked).

    ``checkpoint`` as in :func:`attention_transfer` (saves every ``cfg.checkpoint_every`` steps); ``engine``
    as there (under several processes the model is wrapped as the accelerate config says: DDP, FSDP or
    DeepSpeed). ``peft_model`` itself is trained in place and stays unwrapped.
    """
    engine = engine_for(peft_model, engine, progress)
    engine.check_batch(cfg.batch_size, "the stage 2 batch (--stage2-batch)", cfg.grad_accum)
    set_attention_mode(peft_model, Mode.STUDENT)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: wrap the model with add_lora first")
    if cfg.gradient_checkpointing:
        peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    seq_len = windows.shape[1]
    total_steps = max(1, cfg.tokens // (cfg.batch_size * seq_len))
    planned = total_steps * cfg.batch_size * seq_len
    history, tokens, step, seconds = [], 0, 0, 0.0
    state = checkpoint.load() if checkpoint else None
    if state:
        restore_training_state(state, params, opt, checkpoint.path)
        history, tokens, step, seconds = (state[k] for k in ("history", "tokens", "step", "seconds"))
        log.info("stage 2: resuming from %s at step %d of %d", checkpoint.path, step, total_steps)
    model, opt = engine.prepare(peft_model, opt)
    t0 = time.perf_counter() - seconds
    capped = False

    def save():
        state = training_state(params, opt, step=step, tokens=tokens, history=history,
                               seconds=time.perf_counter() - t0)
        engine.on_main(lambda: checkpoint.save(state))

    peft_model.train()
    bar = engine.bar(total=total_steps, initial=step, desc="stage 2 (LoRA)", unit="step")
    try:
        for _, batch in cycle_batches(windows, cfg.batch_size, start=step * cfg.batch_size):
            if step >= total_steps:
                break
            if cfg.time_budget_s and engine.any(time_cap_hit("stage 2", cfg, t0, tokens, planned)):
                capped = True
                break
            engine.set_lr(opt, cfg.lr, step, total_steps, cfg.warmup_steps)
            micro = engine.local(batch, cfg.grad_accum)
            pos = batch_positions(cfg.position_offsets, step, seq_len, micro[0].device)
            loss_value = 0.0
            for j, mb in enumerate(micro):
                with engine.no_sync(model, last=j == len(micro) - 1):
                    if cfg.loss == "kd":
                        loss = _kd_loss(model, peft_model, mb, pos)
                    else:
                        loss = model(input_ids=mb, labels=mb, use_cache=False, **positions_kw(pos)).loss
                    loss_value += engine.backward(loss, f"stage 2, step {step}", scale=1 / len(micro)) / len(micro)
            engine.step(opt, params, lr=cfg.lr, clip=cfg.grad_clip)
            step += 1
            tokens += batch.numel()
            rec = {"step": step, "tokens": tokens, "seconds": time.perf_counter() - t0,
                   "loss": engine.mean(loss_value)}
            record_step(rec, history, bar, callback, checkpoint and checkpoint.due(step) and save)
    finally:
        bar.close()
        if cfg.gradient_checkpointing:
            peft_model.gradient_checkpointing_disable()
    if checkpoint:
        save()
    peft_model.eval()
    return {"steps": step, "tokens": tokens, "tokens_planned": planned, "stopped_by_time_cap": capped,
            "resumed": state is not None, "seconds": time.perf_counter() - t0, "history": history}
