"""The model card (``README.md``) of a converted model: where it came from, how it was made, how well it keeps
its teacher, and how to load it."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional


def _fidelity_rows(report: Dict) -> list:
    rows = []
    final = (report.get("fidelity") or {}).get("final") or {}
    for name, f in final.items():
        rows.append(f"| {name} | {f['teacher_ppl']:.2f} | {f['student_ppl']:.2f} | {f['ppl_ratio']:.2f}x | "
                    f"{f['top1_agreement']:.3f} | {f['kl_per_token']:.3f} |")
    return rows


def _long_context_rows(lc: Optional[Dict]) -> list:
    """The long-context section: ratio and agreement per context length beside the no-training baseline, passkey."""
    if not lc:
        return []
    base = f"teacher, last {lc['window']} keys + {lc['sinks']} sinks, no training"
    rows = ["", f"## Long context (mean of {len(lc['texts'])} held-out texts)", ""]
    if lc.get("student_memory"):
        rows += [f"This model's attention: {lc['student_memory']}.", ""]
    rows += [f"| context | ppl ratio | top-1 agreement | {base}: ratio | agreement |", "|---|---|---|---|---|"]
    for L, m in lc["mean"].items():
        s, b = m["student"], m["baseline"]
        rows.append(f"| {L} | {s['ppl_ratio']:.2f}x | {s['top1_agreement']:.3f} | {b['ppl_ratio']:.2f}x | "
                    f"{b['top1_agreement']:.3f} |")
    pk = lc.get("passkey") or {}
    if pk:
        rows += ["", "Passkey retrieval (a 5-digit key beyond the window, greedy answer; hits / trials):", "",
                 "| tokens | " + " | ".join(pk) + " |", "|---|" + "---|" * len(pk)]
        for name, label in (("teacher", "teacher"), ("student", "this model")):
            rows.append(f"| {label} | " + " | ".join(f"{r[name]}/{r['trials']}" for r in pk.values()) + " |")
        rows += ["", "(The window baseline is not run here: every key lies beyond its window.)"]
    rows += ["", "![fidelity vs context length](long_context.png)"]
    return rows


def model_card(config: Dict, report: Optional[Dict] = None) -> str:
    """Markdown for a converted model's ``README.md``; ``config`` is the hf-format ``config.json`` as a dict."""
    hh = config.get("hedgehog") or {}
    conv = config.get("conversion") or {}
    base = config.get("base_model") or "(not recorded)"
    base_type = (config.get("base_config") or {}).get("model_type", "?")
    kind = (f"hybrid: the last {hh.get('window')} keys through exact softmax, older keys through learned "
            f"`{hh.get('feature_map')}` feature maps" if hh.get("attention") == "hybrid"
            else f"linear attention with learned `{hh.get('feature_map')}` feature maps")
    lora = config.get("lora")
    lines = [
        "---",
        "library_name: transformers",
        "tags: [hedgehog, linear-attention]",
        "---",
        f"# Linear-attention conversion of {base}",
        "",
        f"This model is `{base}` ({base_type}) with its softmax attention replaced by {kind}, converted with "
        "[hedgehog](https://arxiv.org/abs/2402.04347): stage 1 trains the feature maps to mimic each layer's own "
        "softmax attention; stage 2 fine-tunes with LoRA"
        + (f" (r={lora['r']}, alpha={lora['alpha']}, merged into the weights)" if lora else " (not run)") + ".",
        "It generates with a constant-size state per layer instead of a growing KV cache.",
        "",
        "## Load it",
        "",
        "```python",
        "import hedgehog  # registers the 'hedgehog' model type with transformers",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'model = AutoModelForCausalLM.from_pretrained("THIS_DIR")',
        'tok = AutoTokenizer.from_pretrained("THIS_DIR")',
        "```",
        "",
        "Without `import hedgehog`, transformers refuses this directory (unknown model type `hedgehog`).",
        "",
        "## How it was made",
        "",
        f"- base model: `{base}`",
        f"- converted layers: {len(config.get('converted_layers') or [])}",
        f"- attention: {hh.get('attention')}, feature map {hh.get('feature_map')}, window {hh.get('window')}",
    ]
    for key, label in (("data", "training data"), ("seq_len", "sequence length")):
        if key in conv:
            lines.append(f"- {label}: `{conv[key]}`")
    if report:
        s1, s2 = report.get("stage1") or {}, report.get("stage2") or {}
        if s1:
            lines.append(f"- stage 1: {s1.get('tokens')} tokens")
        if s2:
            lines.append(f"- stage 2: {s2.get('tokens')} tokens ({s2.get('loss', 'ce')} loss)")
        rows = _fidelity_rows(report)
        if rows:
            lines += ["", "## Fidelity to the teacher (measured by `hedgehog convert`)", "",
                      "| text | teacher ppl | this model's ppl | ratio | top-1 agreement | KL / token |",
                      "|---|---|---|---|---|---|", *rows]
        lines += _long_context_rows(report.get("long_context"))
    return "\n".join(lines) + "\n"


def write_model_card(model_dir, config: Dict, report: Optional[Dict] = None) -> Path:
    from hedgehog.utils.atomic import atomic_file

    path = Path(model_dir) / "README.md"
    text = model_card(config, report)
    atomic_file(path, lambda tmp: tmp.write_text(text))
    return path
