"""Attention-fidelity analysis: do the paper's spikiness and monotonicity findings hold on this model?

For every layer and head of a real model on real text, compares the softmax teacher with each feature
map, untrained (fresh maps) and trained (the maps of a converted run, when one is given):
KL(softmax || linear), row entropy next to the softmax entropy, and monotonicity (Spearman rank
correlation of q.k against the attention weight, per row). Writes ``analysis.json``, PNG figures
and ``summary.md`` (which claims hold, with numbers) into the output directory.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

import torch

from hedgehog.eval.plotting import label_axes, pyplot, save_figure
from hedgehog.layers.attention import hedgehog_layers
from hedgehog.modules.feature_maps import get_feature_map
from hedgehog.modules.heads import repeat_heads
from hedgehog.modules.metrics import attention_fidelity, spearman_rows
from hedgehog.ops import quadratic_hybrid_attention, quadratic_linear_attention
from hedgehog.ops.settings import TeacherSettings
from hedgehog.ops.softmax import softmax_attention_weights

DEFAULT_MAPS = ["hedgehog", "elu", "relu", "performer", "cosformer", "t2r", "taylor"]
METRICS = ("kl", "entropy_softmax", "entropy_linear", "spearman_linear")


def _fresh_maps(name: str, d: int, hq: int, hkv: int, max_len: int, layer_idx: int):
    kw = {"max_len": max_len} if name == "cosformer" else {"seed": 1000 + layer_idx} if name == "performer" else {}
    return get_feature_map(name, d, hq, **kw), get_feature_map(name, d, hkv, **kw)


@torch.no_grad()
def analyze_captures(caps: List[tuple], teachers: List[TeacherSettings], n_rep: int,
                     maps: Dict[str, List[tuple]]) -> Dict:
    """caps: per layer [(q (1,Hq,N,d), k (1,Hkv,N,d)) per window]; ``teachers``: per layer, the softmax it is
    compared with; maps: label -> per layer (fq, fk, qk_scale[, HybridSettings or None]).

    Returns {label: {metric: [[per head] per layer]}} with every metric averaged over rows and windows.
    """
    out: Dict[str, Dict[str, list]] = {}
    for label, per_layer in maps.items():
        res = {m: [] for m in METRICS}
        for li, windows in enumerate(caps):
            fq, fk, s, *hyb = per_layer[li]
            hyb = hyb[0] if hyb else None
            acc = None
            for q, k in windows:
                kr = repeat_heads(k, n_rep)
                f = attention_fidelity(q, kr, fq(q * s), repeat_heads(fk(k * s), n_rep), teacher=teachers[li],
                                       hybrid=hyb)
                acc = f if acc is None else {m: acc[m] + f[m] for m in f}
            for m in METRICS:
                res[m].append((acc[m] / len(windows)).tolist())
        out[label] = res
    return out


def _mean(x):  # nested per-layer/per-head list -> scalar
    flat = [v for row in x for v in row]
    return sum(flat) / len(flat)


def _layer_means(x):
    return [sum(r) / len(r) for r in x]


@torch.no_grad()
def run(model: str, out: str, feature_maps: Optional[List[str]] = None, data: str = "shakespeare",
        windows: int = 2, seq_len: int = 256, layer: Optional[int] = None, head: int = 0, span: int = 32) -> Dict:
    from hedgehog.data.corpora import load_corpus, tokenize_windows
    from hedgehog.layers.capture import capture_qkv
    from hedgehog.models.loading import load, load_base, load_teacher, needs_separate_teacher
    from hedgehog.models.convert import convert_model
    from hedgehog.models.formats import is_converted_dir, read_meta

    feature_maps = feature_maps or DEFAULT_MAPS
    outd = Path(out)
    outd.mkdir(parents=True, exist_ok=True)
    trained = None
    if is_converted_dir(model):
        conv, tok = load(model)
        base_name = read_meta(model)["base_model"]
        trained = conv
        teacher = conv
        if needs_separate_teacher(model):  # LoRA is in the weights: teacher mode would not be the teacher
            teacher = convert_model(load_teacher(model))
    else:
        teacher, tok, _ = load_base(model)
        convert_model(teacher)  # identity maps; only used in softmax (capture) mode here
        base_name = model
    layers = hedgehog_layers(teacher)
    L0 = layers[0]
    d, hq, hkv, n_rep = L0.hh_head_dim, L0.num_q_heads, L0.num_kv_heads, L0.n_rep
    corpus = load_corpus(data)
    win = tokenize_windows(corpus.splits["test"], tok, seq_len, max_tokens=windows * seq_len)[:windows]
    caps = [[] for _ in layers]
    teachers = [lay.teacher for lay in layers]
    for w in win:
        for li, cap in enumerate(capture_qkv(teacher, w[None])):
            caps[li].append((cap.q, cap.k))
            teachers[li] = cap.teacher  # the settings the model's forward passed, where the call says them
    maps = {}
    for name in feature_maps:
        maps[name] = [(*_fresh_maps(name, d, hq, hkv, seq_len, lay.layer_idx), 1.0) for lay in layers]
    if trained is not None:
        tl = hedgehog_layers(trained)
        tname = tl[0].hh_config.feature_map
        if tl[0].hybrid:
            tname = f"hybrid w={tl[0].hh_config.window} + {tname}"
        maps[f"{tname} (trained)"] = [(lay.feature_map_q, lay.feature_map_k, lay.hh_config.qk_scale,
                                       lay.hybrid_settings()) for lay in tl]
    results = analyze_captures(caps, teachers, n_rep, maps)

    # one layer/head, one span of text: the pictures
    li = layer if layer is not None else len(layers) // 2
    q, k = caps[li][0]
    n = min(span, q.shape[2])
    tokens = [tok.decode([t]) for t in win[0, :n].tolist()]
    qs, ks = q[:, head:head + 1, :n], repeat_heads(k, n_rep)[:, head:head + 1, :n]
    scale = teachers[li].scale_for(qs.shape[-1])
    pictures = {"softmax": softmax_attention_weights(qs, ks, scale=scale, **teachers[li].masking())[0, 0]}
    scores = (qs @ ks.transpose(-1, -2))[0, 0] * scale
    for label, per_layer in maps.items():
        fq, fk, s = per_layer[li][:3]
        phi_q = fq(q[:, :, :n] * s)[:, head:head + 1]
        phi_k = repeat_heads(fk(k[:, :, :n] * s), n_rep)[:, head:head + 1]
        hyb = per_layer[li][3] if len(per_layer[li]) > 3 else None
        zeros = phi_q.new_zeros(1, 1, n, 1).double()
        if hyb is not None:
            _, w = quadratic_hybrid_attention(qs.double(), ks.double(), zeros, phi_q.double(), phi_k.double(),
                                              hyb.window, hyb.gamma[head:head + 1].double(), scale=scale,
                                              return_weights=True, sinks=hyb.sinks,
                                              decay=None if hyb.decay is None else hyb.decay[head:head + 1].double())
        else:
            _, w = quadratic_linear_attention(phi_q.double(), phi_k.double(), zeros, return_weights=True)
        pictures[label] = w[0, 0].float()
    _plot_heatmaps(pictures, tokens, outd / "heatmaps.png", f"layer {li}, head {head}")
    _plot_per_layer(results, outd / "entropy_per_layer.png", outd / "kl_per_layer.png")
    _plot_scatter(pictures, scores, outd / "monotonicity.png", row=n - 1, title=f"layer {li}, head {head}, row {n - 1}")

    summary = {label: {m: _mean(res[m]) for m in METRICS} for label, res in results.items()}
    analysis = {"model": model, "base_model": base_name, "data": data, "windows": windows, "seq_len": seq_len,
                "layers": len(layers), "q_heads": hq, "kv_heads": hkv, "summary": summary, "per_layer_head": results,
                "picture": {"layer": li, "head": head, "span": n}}
    (outd / "analysis.json").write_text(json.dumps(analysis, indent=2))
    (outd / "summary.md").write_text(summary_markdown(analysis))
    return analysis


def summary_markdown(a: Dict) -> str:
    s = a["summary"]
    soft_ent = next(iter(s.values()))["entropy_softmax"]
    lines = [f"# Attention fidelity: {a['base_model']} on {a['data']} (test split)", "",
             f"{a['windows']} window(s) of {a['seq_len']} tokens, {a['layers']} layers x {a['q_heads']} heads; "
             "means over layers, heads and query rows.", "",
             "| feature map | KL(softmax‖linear) | entropy (softmax = %.3f) | Spearman(q·k, weight) |" % soft_ent,
             "|---|---|---|---|"]
    for label, m in sorted(s.items(), key=lambda kv: kv[1]["kl"]):
        lines.append(f"| {label} | {m['kl']:.3f} | {m['entropy_linear']:.3f} | {m['spearman_linear']:.3f} |")
    lines += ["", "## The paper's claims on this model", ""]
    trained = [k for k in s if k.endswith("(trained)")]
    untrained = {k: v for k, v in s.items() if not k.endswith("(trained)")}
    best = min(s, key=lambda k: s[k]["kl"])
    if trained:
        t = trained[0]
        lines.append(f"- Trained Hedgehog has the lowest KL: **{'holds' if best == t else 'does not hold'}** "
                     f"({t}: {s[t]['kl']:.3f}; lowest: {best} {s[best]['kl']:.3f}).")
        closest = min(s, key=lambda k: abs(s[k]["entropy_linear"] - soft_ent))
        lines.append(f"- Trained Hedgehog's entropy is closest to softmax's: "
                     f"**{'holds' if closest == t else 'does not hold'}** ({t}: {s[t]['entropy_linear']:.3f} vs "
                     f"softmax {soft_ent:.3f}; closest: {closest} {s[closest]['entropy_linear']:.3f}).")
    else:
        lines.append(f"- No converted run given (pass `--model RUN/model`), so only untrained maps are compared; "
                     f"lowest KL among them: {best} ({s[best]['kl']:.3f}).")
    for name in ("elu", "performer", "cosformer"):
        if name in untrained:
            higher = untrained[name]["entropy_linear"] > soft_ent
            lines.append(f"- {name} attention is less spiky (higher entropy) than softmax: "
                         f"**{'holds' if higher else 'does not hold'}** ({untrained[name]['entropy_linear']:.3f} vs "
                         f"{soft_ent:.3f}).")
    if "hedgehog" in untrained:
        h = untrained["hedgehog"]
        lines.append(f"- Untrained (identity) Hedgehog: KL {h['kl']:.3f}, entropy {h['entropy_linear']:.3f}, "
                     f"Spearman {h['spearman_linear']:.3f}: training is what makes it match softmax.")
    lines += ["", "Figures: `heatmaps.png`, `entropy_per_layer.png`, `kl_per_layer.png`, `monotonicity.png`."]
    return "\n".join(lines) + "\n"


def _plot_heatmaps(pictures: Dict[str, torch.Tensor], tokens: List[str], path: Path, title: str) -> None:
    plt = pyplot()
    n = len(pictures)
    cols = min(4, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.2 * rows), squeeze=False)
    labels = [t.replace("\n", "\\n")[:8] for t in tokens]
    for ax, (name, w) in zip(axes.flat, pictures.items()):
        ax.imshow(w.numpy(), cmap="viridis", aspect="auto")
        ax.set_title(name)
        if len(tokens) <= 40:
            ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
            ax.set_yticks(range(len(labels)), labels, fontsize=6)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(f"attention weights, {title}")
    save_figure(fig, path, dpi=100)


def _plot_per_layer(results: Dict, entropy_path: Path, kl_path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    first = next(iter(results.values()))
    ax.plot(_layer_means(first["entropy_softmax"]), "k-", lw=2.5, label="softmax")
    for label, res in results.items():
        ax.plot(_layer_means(res["entropy_linear"]), "-o", ms=3, label=label)
    label_axes(ax, "layer", "row entropy (nats)", "attention entropy per layer (lower = spikier)", legend_size=7)
    save_figure(fig, entropy_path, dpi=110)
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, res in results.items():
        ax.semilogy(_layer_means(res["kl"]), "-o", ms=3, label=label)
    label_axes(ax, "layer", "KL(softmax || linear)", "attention KL per layer", legend_size=7)
    save_figure(fig, kl_path, dpi=110)


def _plot_scatter(pictures: Dict[str, torch.Tensor], scores: torch.Tensor, path: Path, row: int, title: str) -> None:
    plt = pyplot()
    n = len(pictures)
    cols = min(4, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.2 * rows), squeeze=False)
    s = scores[row, : row + 1].numpy()
    for ax, (name, w) in zip(axes.flat, pictures.items()):
        wr = w[row, : row + 1].numpy()
        rho = spearman_rows(torch.tensor(s), torch.tensor(wr)).item()
        ax.scatter(s, wr, s=10)
        ax.set_title(f"{name} (Spearman {rho:.2f})", fontsize=9)
        ax.set_xlabel("q·k / √d")
        ax.set_ylabel("weight")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(f"monotonicity: weight vs q·k, {title}")
    save_figure(fig, path, dpi=100)
