"""Text renderings of memory plans: the per-model table beside the article's figures, one plan's
breakdown (ending with `peak: <N> GB`), and a cross-check against XLA. Functions return strings."""

from __future__ import annotations

from typing import Mapping, Sequence

from jaxpeft.plan.analytic import GB, MemoryPlan, PlanConfig
from jaxpeft.plan.shapes import ARTICLE_GB


def _gb(nbytes: float, digits: int = 2) -> str:
    return f"{nbytes / GB:.{digits}f}"


def _targets(plan: PlanConfig) -> str:
    return plan.targets if isinstance(plan.targets, str) else ",".join(plan.targets)


def settings_lines(plan: PlanConfig, methods: Sequence[str]) -> list[str]:
    """What a plan assumes, one line per method, as the table's header states it."""
    lines = [f"batch {plan.batch_size} x {plan.seq_len} tokens ({plan.targets_k} target slots), compute "
             f"{plan.dtype}, AdamW; GB = 1e9 bytes"]
    p = plan.param_dtype
    text = {
        "full": f"full: {p} weights + {p} gradients + {p} AdamW moments (optax keeps mu and nu in the "
                "param dtype): 8 bytes a parameter in 16-bit, the article's count",
        "lora": f"lora: frozen {p} base; LoRA r={plan.rank} on {_targets(plan)} with float32 adapters, "
                "gradients and AdamW moments",
        "qlora": f"qlora: NF4 base (blocksize {plan.quant_blocksize}"
                 + (", double quant" if plan.double_quant else "")
                 + f"; every linear but lm_head; embeddings, norms and lm_head {p}) with the same LoRA on top",
    }
    return lines + [text[m] for m in methods]


def format_table(rows: Mapping[str, Mapping[str, Mapping[bool, MemoryPlan]]], plan: PlanConfig) -> str:
    """rows[model][method][remat] -> plan. One row per model, a column group per method with the article."""
    methods = list(next(iter(rows.values())))
    remats = list(next(iter(next(iter(rows.values())).values())))
    label = {False: "no remat", True: "remat"}
    heads = [label[r] for r in remats] + ["article"]
    width = max(10, *(len(h) + 1 for h in heads))
    group = len(heads) * width
    lines = ["Planned peak memory of one train step, GB (the article's figure beside it)"]
    lines += ["  " + line for line in settings_lines(plan, methods)]
    lines.append("")
    lines.append(f"{'':12s}" + "".join(f" | {m:^{group}s}" for m in methods))
    lines.append(f"{'model':12s}" + "".join(" | " + "".join(f"{h:>{width}s}" for h in heads) for _ in methods))
    for model, by_method in rows.items():
        cells = []
        for m in methods:
            article = ARTICLE_GB.get(model, {}).get(m)
            vals = [_gb(by_method[m][r].peak, 1) for r in remats] + [f"~{article:.0f}" if article else "-"]
            cells.append("".join(f"{v:>{width}s}" for v in vals))
        lines.append(f"{model:12s}" + "".join(f" | {c}" for c in cells))
    return "\n".join(lines)


def format_breakdown(label: str, p: MemoryPlan) -> str:
    """One plan, item by item; the last line is `peak: <N> GB`."""
    c, cfg = p.config, p.plan
    n = c.num_hidden_layers
    train_dtype = cfg.param_dtype if cfg.method == "full" else "float32"
    settings = settings_lines(cfg, [cfg.method])
    lines = [f"{label}, {cfg.method}: {settings[0]}, remat {'on' if cfg.remat else 'off'}",
             "  " + settings[1],
             f"  {n} layers, hidden {c.hidden_size}, intermediate {c.intermediate_size}, heads "
             f"{c.num_attention_heads} (kv {c.num_key_value_heads}), vocab {c.vocab_size}",
             f"parameters: {p.base_params:,} base, {p.trainable_params:,} trainable "
             f"({100.0 * p.trainable_params / max(p.base_params, 1):.3f} %)"
             + (f"; {p.active_params:,} active per token" if p.active_params != p.base_params else ""),
             ""]
    row = lambda name, nbytes, note="": lines.append(f"{name:64s} {_gb(nbytes, 3):>9s} GB{note}")  # noqa: E731
    row("weights", p.weight_bytes)
    for item in p.weights:
        row("  " + item.name, item.nbytes)
    row(f"gradients (trainable leaves only, {train_dtype})", p.gradients)
    row(f"optimizer state (AdamW mu + nu, {train_dtype})", p.optimizer)
    row("batch, rng key, step", p.misc)
    row("static: the step's arguments", p.static)
    lines.append("")
    if cfg.remat:
        row(f"activations kept: {n} layer inputs (remat)", n * p.saved_per_layer)
        row("  + one layer rebuilt during its backward", p.activations - n * p.saved_per_layer)
    else:
        row(f"activations saved for the backward: {n} layers", p.activations)
    lines.append("  one layer's saved tensors:")
    for item in p.layer_saved:
        row("    " + item.name, item.nbytes)
    row("loss head (target logits in float32, gathered hidden states)", p.head)
    row("one layer's backward transients", p.layer_backward)
    row("attention mask and rope tables", p.shared)
    lines.append("")
    for item in p.phases:
        row(f"phase: {item.name}", item.nbytes, "  <- peak" if item is p.peak_phase else "")
    row(f"peak = static + {p.peak_phase.name}", p.peak)
    lines.append(f"peak: {_gb(p.peak)} GB")
    return "\n".join(lines)


def format_crosscheck(cc, layers: int) -> str:
    """The plan of a `layers`-layer model beside XLA's compiled memory analysis of the real step."""
    m, p = cc.measured, cc.plan
    sched = ("memory-minimising scheduler" if m.memory_scheduler else "default scheduler") if m.backend == "cpu" else ""
    lines = [f"cross-check on {layers} layer(s) of these widths: XLA {m.backend} {sched}, compiled in "
             f"{m.compile_seconds:.1f} s",
             f"{'':34s}{'plan':>12s}{'XLA':>12s}{'plan/XLA':>10s}",
             f"{'arguments (weights, state, batch)':34s}{_gb(p.static, 3):>12s}{_gb(m.argument, 3):>12s}"
             f"{p.static / max(m.argument, 1):>10.4f}",
             f"{'activations, gradients, transients':34s}{_gb(p.peak_phase.nbytes, 3):>12s}{_gb(m.dynamic, 3):>12s}"
             f"{cc.dynamic_ratio:>10.4f}",
             f"{'peak':34s}{_gb(p.peak, 3):>12s}{_gb(m.total, 3):>12s}{cc.peak_ratio:>10.4f}"]
    if m.backend == "cpu" and p.plan.dtype != "float32":
        lines.append("note: XLA's CPU backend computes bf16 dots in fp32 and keeps fp32 weight copies; cross-check "
                     "with --dtype=float32 --param_dtype=float32 on the CPU")
    return "\n".join(lines)


__all__ = ["format_breakdown", "format_crosscheck", "format_table", "settings_lines"]
