"""Timing behind docs/results.md (stage 1 speed). Stage 1's loss on SmolLM2 captures (all 30 layers, batch 2 x 512, one row subset of 128): autograd through
hybrid_weights (before) vs _hybrid_block_ce (now), in one process, alternating."""
import time, torch
from hedgehog.jobs.config import ConvertJob, hybrid_settings
from hedgehog.layers.capture import capture_qkv
from hedgehog.layers.attention import hedgehog_layers, HedgehogConfig
from hedgehog.models.loading import load_base
from hedgehog.models.convert import convert_model
from hedgehog.modules import losses
from hedgehog.ops.hybrid import hybrid_weights
from hedgehog.train.stage1 import batch_positions
model, tok, _ = load_base("smollm2", None, False, dtype=torch.float32)
convert_model(model, HedgehogConfig(feature_map="hedgehog", attention="hybrid", window=64, **hybrid_settings(ConvertJob())))
layers = hedgehog_layers(model)
x = torch.randint(0, 40000, (2, 512))
caps = capture_qkv(model, x, None, batch_positions(7680, 3, 512))
for p in model.parameters(): p.requires_grad_(False)
params = [p for l in layers for m in l.trainable_modules().values() for p in m.parameters()]
for p in params: p.requires_grad_(True)
rows = torch.randperm(512)[:128]
new = losses._hybrid_block_ce
def old(q_blk, k_vis, pq_blk, pk_vis, row_pos, p, scale, hybrid, eps):
    a, win, log_win = hybrid_weights(q_blk, k_vis, pq_blk, pk_vis, scale=scale, q_positions=row_pos, **hybrid.op_kwargs())
    log_den = a.sum(-1).clamp_min(eps).log()
    log_a = torch.where(win, log_win, a.clamp_min(eps).log())
    return log_den.sum() - torch.vdot(p.reshape(-1), log_a.reshape(-1))
def run():
    tot = 0.0
    for l, c in zip(layers, caps):
        loss = l.layer_distill_loss(c.q, c.k, c.v, query_index=rows, teacher=c.teacher)
        loss.backward(); tot += loss.item()
    return tot
res = {"before": [], "now": []}
vals = {}
for i in range(4):
    for name, fn in (("before", old), ("now", new)):
        losses._hybrid_block_ce = fn
        for p in params: p.grad = None
        t = time.perf_counter(); vals[name] = run(); res[name].append(time.perf_counter() - t)
        grads = torch.cat([p.grad.flatten() for p in params]); vals[name + "_g"] = grads
b, n = sorted(res["before"])[1], sorted(res["now"])[1]
print(f"loss (30 layers, 128 rows): before {b:.3f} s, now {n:.3f} s, {b / n:.2f}x; loss values {vals['before']:.6f} / {vals['now']:.6f}; "
      f"max grad diff {(vals['before_g'] - vals['now_g']).abs().max():.2e} of {vals['now_g'].abs().max():.2e}")
