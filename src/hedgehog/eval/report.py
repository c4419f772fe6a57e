"""What the main job and `hedgehog compare` print and plot from their reports: the run summary, the fidelity
table (per text: perplexity ratio to the teacher, top-1 agreement, KL per token, after each stage) and the
feature-map comparison. Pure formatting: it reads report dicts and imports nothing of the job that writes them."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

def mean_fidelity(rows: List[Dict]) -> Dict[str, float]:
    keys = ("ppl_ratio", "top1_agreement", "kl_per_token")
    return {k: sum(r[k] for r in rows) / len(rows) for k in keys}


def slim_stage_report(rep: Optional[Dict]) -> Optional[Dict]:
    if rep is None:
        return None
    rep = dict(rep)
    hist = rep.pop("history", None)
    if hist:
        rep["loss_first"] = hist[0]["loss"]
        rep["loss_last"] = hist[-1]["loss"]
        rep["loss_curve"] = [(h["tokens"], round(h["loss"], 4)) for h in hist[:: max(1, len(hist) // 50)]]
    return rep


def format_report(r: Dict) -> str:
    lines = [
        f"{'model':<28} {r['model']}",
        f"{'training data':<28} {r['data']}",
        f"{'attention KL / layer':<28} {r['mean_kl_before']:.3f} -> {r['mean_kl_after']:.3f}",
    ]
    for name in ("stage1", "stage2"):
        s = r.get(name)
        if s:
            capped = "  (ended by the time cap)" if s.get("stopped_by_time_cap") else ""
            lines.append(f"{name + ' tokens / seconds':<28} {s.get('tokens', 0)} of {s.get('tokens_planned', 0)} / "
                         f"{s.get('seconds', 0):.0f}"
                         + (f"  (loss {s['loss_first']:.3f} -> {s['loss_last']:.3f})" if "loss_first" in s else "")
                         + capped)
    lines.append(f"{'reload max |logit diff|':<28} {r['reload_max_abs_logit_diff']:.2e}")
    lines.append(f"{'wall seconds':<28} {r['wall_s']:.0f}")
    if r.get("curve"):
        lines.append("curve (stage, tokens, val ppl ratio): " + ", ".join(
            f"{c['stage']}@{c['tokens']}:{c['val_ppl_ratio']:.2f}x" for c in r["curve"]))
    held = r.get("held_out")
    lines += ["", format_fidelity({"stage 1": r["fidelity"]["stage1"], "final": r["fidelity"]["final"]},
                                  {"stage 1": held["stage1"], "final": held["final"]} if held else None)]
    if r.get("long_context"):
        lines += ["", format_long_context(r["long_context"])]
    return "\n".join(lines)


def format_fidelity(stages: Dict[str, Dict[str, Dict]], held_out: Optional[Dict[str, Dict]] = None) -> str:
    """The fidelity table. ``stages``: label -> text -> :func:`hedgehog.eval.fidelity.fidelity` result (one
    column per label, shown as ``a -> b``); ``held_out``: label -> the mean over the held-out texts."""
    labels = list(stages)
    names = list(stages[labels[-1]])
    arrow = " -> ".join(labels)

    def cell(vals, fmt):
        return " -> ".join(fmt.format(v) for v in vals)

    width = max(16, len(arrow))
    lines = [f"{'fidelity to the teacher':<30} {'teacher ppl':>11}  {'ppl ratio':>{width}}  {'top-1 agreement':>{width}}"
             f"  {'KL / token':>{width}}",
             f"{'':<30} {'':>11}  {arrow:>{width}}  {arrow:>{width}}  {arrow:>{width}}"]
    rows = [(n, f"{stages[labels[-1]][n]['teacher_ppl']:.2f}", [stages[lb][n] for lb in labels]) for n in names]
    if held_out:
        rows.append(("mean of the held-out texts", "", [held_out[lb] for lb in labels]))
    for name, tp, fs in rows:
        lines.append(f"{name:<30} {tp:>11}  {cell([f['ppl_ratio'] for f in fs], '{:.2f}x'):>{width}}  "
                     f"{cell([f['top1_agreement'] for f in fs], '{:.3f}'):>{width}}  "
                     f"{cell([f['kl_per_token'] for f in fs], '{:.2f}'):>{width}}")
    return "\n".join(lines)


def format_compare(rows: List[Dict]) -> str:
    head = (f"{'feature map':<14} {'KL before':>9} {'KL after':>9} {'ppl stage1':>11} {'ppl final':>10} {'ratio':>7}"
            f" {'held-out ratio':>14} {'agreement':>9} {'KL/token':>8}")
    lines = [head, "-" * len(head)]
    for r in sorted(rows, key=lambda r: r["ppl_ratio"]):
        h = r.get("held_out") or {}
        tail = (f" {h['ppl_ratio']:>13.2f}x {h['top1_agreement']:>9.3f} {h['kl_per_token']:>8.2f}" if h else "")
        lines.append(f"{r['feature_map']:<14} {r['mean_kl_before']:>9.3f} {r['mean_kl_after']:>9.3f} "
                     f"{r['student_ppl_stage1']:>11.1f} {r['student_ppl']:>10.2f} {r['ppl_ratio']:>6.2f}x" + tail)
    if rows:
        lines.append(f"teacher ppl {rows[0]['teacher_ppl']:.2f}")
    return "\n".join(lines)


def plot_compare(rows: List[Dict], path: Path) -> None:
    from hedgehog.eval.plotting import pyplot, save_figure

    plt = pyplot()

    rows = sorted(rows, key=lambda r: r["ppl_ratio"])
    names = [r["feature_map"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].bar(names, [r["ppl_ratio"] for r in rows], color="tab:blue")
    axes[0].axhline(1.0, color="gray", lw=0.8)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("student / teacher perplexity (test)")
    axes[0].set_title("perplexity ratio after conversion")
    x = range(len(rows))
    axes[1].bar([i - 0.2 for i in x], [r["mean_kl_before"] for r in rows], width=0.4, label="before stage 1")
    axes[1].bar([i + 0.2 for i in x], [r["mean_kl_after"] for r in rows], width=0.4, label="after stage 1")
    axes[1].set_xticks(list(x), names)
    axes[1].set_ylabel("KL(softmax || linear) per layer")
    axes[1].set_title("attention fidelity")
    axes[1].legend()
    for ax in axes:
        ax.tick_params(axis="x", rotation=30)
    save_figure(fig, path, dpi=110)


def format_long_context(r: Dict) -> str:
    """The long-context table (held-out mean per length: student | baseline) and the passkey table."""
    base = f"window {r['window']} + {r['sinks']} sinks, no training"
    lines = [f"long context: the student and the teacher limited to {base} (mean of {len(r['texts'])} held-out texts)"]
    if r.get("student_memory"):
        lines.append(f"student attention: {r['student_memory']}")
    lines += [f"{'context':>8}  {'ppl ratio':>15}  {'top-1 agreement':>15}  {'KL / token':>13}",
              f"{'':>8}  {'student | base':>15}  {'student | base':>15}  {'student | base':>13}"]
    for L, m in r["mean"].items():
        s, b = m["student"], m["baseline"]
        lines.append(f"{L:>8}  {s['ppl_ratio']:>6.2f}x | {b['ppl_ratio']:.2f}x  {s['top1_agreement']:>7.3f} | "
                     f"{b['top1_agreement']:.3f}  {s['kl_per_token']:>5.2f} | {b['kl_per_token']:.2f}")
    if r.get("passkey"):
        pk = r["passkey"]
        Ls = list(pk)
        lines += ["", f"passkey retrieval (greedy; hits of {next(iter(pk.values()))['trials']} keys at spread depths, "
                      f"each beyond the window)", f"{'tokens':<28}" + "".join(f"{L:>8}" for L in Ls)]
        for name, label in (("teacher", "teacher (softmax)"), ("student", "converted model")):
            lines.append(f"{label[:28]:<28}" + "".join(f"{pk[L][name]:>6}/{pk[L]['trials']}" for L in Ls))
        lines.append(f"(not run for the {base}: every key lies beyond its window)")
    return "\n".join(lines)


def plot_long_context(r: Dict, path) -> None:
    """PNG: perplexity ratio to the teacher against context length (student, baseline; per text and mean) and the
    passkey hits per length."""
    from hedgehog.eval.plotting import label_axes, pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    for name, per in r["texts"].items():
        Ls = [int(L) for L in per]
        ax.plot(Ls, [per[str(L)]["student"]["ppl_ratio"] for L in Ls], color="tab:blue", alpha=0.3, lw=1)
        ax.plot(Ls, [per[str(L)]["baseline"]["ppl_ratio"] for L in Ls], color="tab:orange", alpha=0.3, lw=1)
    Ls = [int(L) for L in r["mean"]]
    ax.plot(Ls, [r["mean"][str(L)]["student"]["ppl_ratio"] for L in Ls], "o-", color="tab:blue", lw=2,
            label="converted model")
    ax.plot(Ls, [r["mean"][str(L)]["baseline"]["ppl_ratio"] for L in Ls], "s--", color="tab:orange", lw=2,
            label=f"teacher, window {r['window']} + {r['sinks']} sinks (no training)")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    label_axes(ax, "context length (tokens)", "perplexity / teacher's (held-out texts)", "fidelity vs context length")
    ax = axes[1]
    pk = r.get("passkey") or {}
    Ls = list(pk)
    x = range(len(Ls))
    for j, (name, color) in enumerate((("teacher", "tab:green"), ("student", "tab:blue"))):
        ax.bar([i + (j - 0.5) * 0.35 for i in x], [pk[L][name] for L in Ls], width=0.35, color=color, label=name)
    ax.set_xticks(list(x), Ls)
    if Ls:
        ax.set_ylim(0, pk[Ls[0]]["trials"])
    label_axes(ax, "prompt length (tokens)", "keys retrieved", "passkey retrieval")
    save_figure(fig, path)
