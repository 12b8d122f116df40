"""The method comparison's report: compare.json (everything measured), compare.md (the table and how it
was measured) and compare.png (one bar panel per measure). Written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from jaxpeft.core.atomic import atomic_file

# (row key, column title) of the main table, in order.
COLUMNS = (
    ("lr", "lr"),
    ("trained", "params trained"),
    ("trained_pct", "% of base"),
    ("artifact", "adapter size"),
    ("peak_rss", "peak RSS"),
    ("train_tps", "train tok/s"),
    ("gen_adapted", "gen vs base"),
    ("gen_merged", "gen merged vs base"),
    ("exact_match", "exact match"),
    ("eval_loss", "eval loss"),
)


def _bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


def _num(x: float | None, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def table_rows(summary: Mapping[str, Any]) -> list[dict[str, str]]:
    """One row of display strings per method (failed methods say so)."""
    rows = []
    speed = summary.get("generation", {}).get("variants", {})
    for label, r in summary["methods"].items():
        if "error" in r:
            rows.append({"method": label, **{k: "failed" for k, _ in COLUMNS}})
            continue
        p, after, g = r["parameters"], r["after"], speed.get(label, {})
        adapted = g.get("adapted", {}) or {}
        merged = g.get("merged") or {}
        rows.append({
            "method": label,
            "lr": f"{r['lr']:g}",
            "trained": f"{p['trainable']:,}",
            "trained_pct": f"{p['trainable_percent']:.4g} %",
            "artifact": _bytes(r["artifact_weight_bytes"]),
            "peak_rss": _bytes(r["peak_rss_bytes"]),
            "train_tps": _num(r["train_tokens_per_s"], ".0f"),
            "gen_adapted": "error" if "error" in g else _num(adapted.get("relative_to_base"), ".2f"),
            "gen_merged": ("error" if "error" in g else _num(merged.get("relative_to_base"), ".2f")) if merged
            else "n/a",
            "exact_match": _num(after.get("eval_exact_match"), ".2f"),
            "eval_loss": _num(after.get("eval_loss"), ".3f"),
        })
    return rows


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def size_table_markdown(size_rows: Sequence[Mapping[str, Any]]) -> str:
    return markdown_table(
        ["rank", "parameters", "bytes (fp16)", "MB", "article", "agrees"],
        [[r["rank"], f"{r['parameters']:,}", f"{r['bytes']:,}", f"{r['MB']:.1f}", f"~{r['reference_MB']:g} MB",
          "yes" if r["agrees"] else "NO"] for r in size_rows])


def main_table_markdown(summary: Mapping[str, Any]) -> str:
    rows = table_rows(summary)
    return markdown_table(["method"] + [t for _, t in COLUMNS], [[r["method"]] + [r[k] for k, _ in COLUMNS]
                                                                   for r in rows])


def render_markdown(summary: Mapping[str, Any]) -> str:
    s = summary["settings"]
    base = summary.get("base") or {}
    gen = summary.get("generation", {})
    parts = [
        "# Method comparison",
        "",
        f"Model: `{s['model'] or 'SmolLM2-135M-Instruct (default)'}`; task `builtin:dates`; every method "
        f"{s['steps']} steps at batch {s['batch_size']}, the same data order (seed 0); held-out metrics on "
        f"{s['eval_examples']} examples. Command: `{summary['command']}`" + (" (quick mode: a smoke test, not "
                                                                           "a measurement)" if s["quick"] else ""),
        "",
        f"**Learning rates.** {summary['lr_choice']}",
        "",
        main_table_markdown(summary),
        "",
    ]
    if base:
        parts += [f"Base model (measured once, {base.get('source')}): exact match "
                  f"{_num(base.get('eval_exact_match'), '.2f')}, eval loss {_num(base.get('eval_loss'), '.3f')}; "
                  f"generation {_num(gen.get('base', {}).get('tokens_per_s'), '.1f')} tokens/s.", ""]
    qlora_before = summary["methods"].get("qlora", {}).get("before")
    if qlora_before:
        parts += [f"QLoRA's 4-bit base before training: exact match "
                  f"{_num(qlora_before.get('eval_exact_match'), '.2f')}, eval loss "
                  f"{_num(qlora_before.get('eval_loss'), '.3f')}.", ""]
    failed = {k: v for k, v in summary["methods"].items() if "error" in v}
    failed_gen = {k: v["error"] for k, v in gen.get("variants", {}).items() if "error" in v}
    if "error" in gen:
        failed_gen["all"] = gen["error"]
    if failed or failed_gen:
        parts += ["## Failures", ""]
        parts += [f"- {k}: training failed, see `{v.get('log')}`" for k, v in failed.items()]
        parts += [f"- {k}: generation speed failed: {e}" for k, e in failed_gen.items()]
        parts += [""]
    sweeps = {k: v["tried"] for k, v in summary["methods"].items() if len(v.get("tried", [])) > 1}
    if sweeps:
        parts += ["## Learning-rate sweep", "", markdown_table(
            ["method", "lr", "exact match", "eval loss"],
            [[k, f"{t['lr']:g}", _num(t["eval_exact_match"], ".2f"), _num(t["eval_loss"], ".3f")]
             for k, tried in sweeps.items() for t in tried]), ""]
    g = gen.get("settings", {})
    parts += [
        "## How each column was measured",
        "",
        "- **params trained**: trainable parameters (config.json of the run); **% of base**: of the base "
        "model's parameters (a 4-bit weight counts as one parameter).",
        "- **adapter size**: bytes of the weight files the run saved (adapter/ for PEFT methods, model/ "
        "for full fine-tuning: the whole model in fp32); the json also has the whole folder's bytes.",
        "- **peak RSS**: the training process's own peak resident memory (ru_maxrss from `os.wait4`, the "
        "run forked from a ~10 MB wrapper so that no parent's address space is counted), which covers "
        "loading, XLA compilation, training and the before/after evaluation.",
        "- **train tok/s**: median over training steps 2..N of (real, non-padding tokens in the step's "
        "batch) / (step time), from metrics.jsonl; step 1 is left out (it includes compilation).",
        f"- **gen vs base**: greedy generation tokens/s with the adapter active divided by the base model's, "
        f"on {g.get('prompts')} held-out prompts x {g.get('new_tokens')} new tokens (no early stop), "
        f"best of {g.get('rounds')} rounds alternating with the base, in one process; **gen merged vs "
        "base**: the same after merging (LoRA, QLoRA and IA3; QLoRA's merge is dequantized to fp32, as its "
        "merged/ export). QLoRA's adapted row runs on its 4-bit base.",
        "- **exact match / eval loss**: the run's held-out evaluation after training (results.json).",
        "",
        "## Adapter size for a 7B Llama (LoRA on q, k, v, o of 32 layers, hidden 4096, fp16)",
        "",
        "From shapes: 32 layers x 4 matrices x (4096 r + r 4096) parameters x 2 bytes; the article's "
        "figures (REFERENCE.md) beside them.",
        "",
        size_table_markdown(summary["adapter_size_7b"]),
        "",
    ]
    return "\n".join(parts)


def plot(summary: Mapping[str, Any], out_png: str | os.PathLike) -> None:
    """One bar panel per measure, methods on the x axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = {k: v for k, v in summary["methods"].items() if "error" not in v}
    speed = summary.get("generation", {}).get("variants", {})
    labels = list(ok)

    def adapted(k):
        return ((speed.get(k) or {}).get("adapted") or {}).get("relative_to_base", 0.0)

    def merged(k):
        return ((speed.get(k) or {}).get("merged") or {}).get("relative_to_base", 0.0)

    panels = [
        ("params trained (% of base, log)", [ok[k]["parameters"]["trainable_percent"] for k in labels], True),
        ("adapter size (MB, log)", [ok[k]["artifact_weight_bytes"] / 1e6 for k in labels], True),
        ("peak RSS (GB)", [ok[k]["peak_rss_bytes"] / 1e9 for k in labels], False),
        ("training tokens/s", [ok[k]["train_tokens_per_s"] or 0.0 for k in labels], False),
        ("generation tokens/s vs base", [adapted(k) for k in labels], False),
        ("held-out exact match", [ok[k]["after"].get("eval_exact_match", 0.0) for k in labels], False),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    x = list(range(len(labels)))
    for ax, (title, values, log) in zip(axes.flat, panels):
        if title.startswith("generation"):  # adapter active and merged side by side
            ax.bar([i - 0.2 for i in x], values, width=0.4, color="tab:blue", label="adapter active")
            ax.bar([i + 0.2 for i in x], [merged(k) for k in labels], width=0.4, color="tab:orange", label="merged")
            ax.axhline(1.0, color="gray", linewidth=1)
            ax.legend(loc="lower right", fontsize=8)
        else:
            ax.bar(x, values, color="tab:blue")
        if title.startswith("held-out"):
            ax.set_ylim(0, 1.05)
            if summary.get("base"):
                ax.axhline(summary["base"].get("eval_exact_match", 0.0), color="gray", linestyle="--", label="base")
                ax.legend(loc="lower right", fontsize=8)
        ax.set_xticks(x, labels)
        if log and all(v > 0 for v in values):
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelrotation=45, labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    s = summary["settings"]
    model = "quick smoke test (tiny random model)" if s["quick"] else Path(s["model"] or "SmolLM2-135M-Instruct").name
    fig.suptitle(f"{model}: {s['steps']} steps each, batch {s['batch_size']}", fontsize=11)
    fig.tight_layout()
    tmp = Path(out_png).with_name(Path(out_png).name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out_png)


def write_report(out_dir: str | os.PathLike, summary: Mapping[str, Any]) -> dict[str, Path]:
    """Writes compare.json, compare.md and compare.png under `out_dir`; returns their paths."""
    out = Path(out_dir)
    paths = {"json": out / "compare.json", "md": out / "compare.md", "png": out / "compare.png"}
    with atomic_file(paths["json"]) as f:
        json.dump(summary, f, indent=2, sort_keys=True, default=str)
    with atomic_file(paths["md"]) as f:
        f.write(render_markdown(summary))
    plot(summary, paths["png"])
    return paths
