"""Compare every method on one model, task and step budget: full, LoRA, QLoRA, adapters, prefix, prompt, IA3.

    python -m experiments.compare --out=runs/compare            # the comparison (estimate: ~40 min, 2 quiet cores)
    python -m experiments.compare --out=/tmp/c --quick           # smoke test on a tiny random model
    python -m experiments.compare --only_size_table              # the 7B adapter-size table alone

Each method is trained by its own entry point (experiments.full, .lora, .qlora, .adapters, .prefix,
.prompt, .ia3, with their default method settings) in its own process, on SmolLM2-135M-Instruct and the
bundled date task, for --steps steps at --batch_size (defaults: the main job's 100 x 8) with held-out
evaluation on --eval_examples examples before and after. Then one process times greedy generation of
the base, each adapter, and each merged model on the same prompts.

Learning rates: ONE per method, the entry point's default (full 5e-5, LoRA 1e-3, QLoRA 2e-3, adapters
1e-3, prefix 1e-2, prompt 3e-2, IA3 1e-2), because a sweep of every method does not fit the 60-minute
budget on this CPU. --sweep also runs 3x each default and keeps the better run by held-out exact match
(about twice the time); --lrs=lora:1e-3/3e-3,full:1e-4 sets a method's grid by hand.

Writes under --out: compare.md (the table and how each column was measured), compare.json (everything),
compare.png, runs/<method>-lr<lr>/ (each run folder, checkpoints removed unless --keep_checkpoints) and
logs/. Also prints the article's adapter-size table for a 7B Llama (LoRA rank 4-64 on q,k,v,o, fp16),
computed from shapes and checked against the article's figures. Exit code 1 if any method failed (the
report is still written, with the failure).
"""

from __future__ import annotations

import shlex
import sys

from absl import app, flags, logging

from experiments.common import log_to_stderr, run_app
from jaxpeft import compare
from jaxpeft.compare.report import main_table_markdown, size_table_markdown

_OUT = flags.DEFINE_string("out", None, "Folder for compare.md/json/png, the run folders and logs.")
_QUICK = flags.DEFINE_bool("quick", False, "Smoke test: a tiny random model (unless --model), 3 steps, 4 eval "
                           "examples, short generation. Not a measurement.")
_MODEL = flags.DEFINE_string("model", None, "HF folder, .gguf file or hub id (default: SmolLM2-135M-Instruct).")
_METHODS = flags.DEFINE_list("methods", None, "Methods to compare (default: full,lora,qlora,adapters,prefix,"
                             "prompt,ia3).")
_STEPS = flags.DEFINE_integer("steps", 100, "Optimizer steps, the same for every method (--quick: 3).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Sequences per step (--quick: 4).")
_EVAL = flags.DEFINE_integer("eval_examples", 100, "Held-out examples evaluated before and after (--quick: 4).")
_SWEEP = flags.DEFINE_bool("sweep", False, "Also train at 3x each default learning rate; keep the better run.")
_LRS = flags.DEFINE_string("lrs", None, "Per-method learning-rate grids: method:lr[/lr...],... (overrides).")
_GEN_PROMPTS = flags.DEFINE_integer("gen_prompts", 8, "Prompts per generation-speed batch (--quick: 2).")
_GEN_TOKENS = flags.DEFINE_integer("gen_tokens", 32, "New tokens per prompt when timing generation (--quick: 4).")
_GEN_ROUNDS = flags.DEFINE_integer("gen_rounds", 3, "Timed generation rounds per variant (--quick: 1).")
_KEEP = flags.DEFINE_bool("keep_checkpoints", False, "Keep each run's checkpoints/ (full: ~1.6 GB on SmolLM2).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Empty a non-empty --out first.")
_SIZE_ONLY = flags.DEFINE_bool("only_size_table", False, "Print the 7B adapter-size table and exit.")

QUICK = {"steps": 3, "batch_size": 4, "eval_examples": 4, "gen_prompts": 2, "gen_tokens": 4, "gen_rounds": 1}


def parse_lrs(text: str | None) -> tuple[tuple[str, tuple[float, ...]], ...]:
    """"lora:1e-3/3e-3,full:5e-5" -> (("lora", (0.001, 0.003)), ("full", (5e-05,)))."""
    if not text:
        return ()
    out = []
    for item in text.split(","):
        name, _, grid = item.strip().partition(":")
        try:
            lrs = tuple(float(x) for x in grid.split("/") if x.strip())
        except ValueError:
            lrs = ()
        if not name or not lrs:
            raise app.UsageError(f"--lrs item {item!r}: write method:lr[/lr...], e.g. lora:1e-3/3e-3")
        out.append((name.strip(), lrs))
    return tuple(out)


def print_size_table() -> bool:
    rows = compare.adapter_size_table()
    print("LoRA adapter size for a 7B Llama (q,k,v,o of 32 layers, hidden 4096, fp16), from shapes:")
    print(size_table_markdown(rows))
    ok = all(r["agrees"] for r in rows)
    print("check against the article's figures (REFERENCE.md): " + ("all agree (within 5 %)" if ok else "MISMATCH"))
    return ok


def _value(flag, name: str):
    """A flag's value; in --quick mode, the quick default unless the flag was given."""
    return QUICK[name] if _QUICK.value and name in QUICK and not flag.present else flag.value


def main(argv) -> None:
    del argv
    log_to_stderr()
    size_ok = print_size_table()
    if _SIZE_ONLY.value:
        sys.exit(0 if size_ok else 1)
    if not _OUT.value:
        raise app.UsageError("--out is required: the folder for compare.md/json/png and the run folders")

    model, tmp = _MODEL.value, None
    if _QUICK.value and model is None:
        import tempfile

        try:
            from tests.hf_tiny import tiny_model_folder
        except ImportError as e:
            raise app.UsageError("--quick without --model builds a tiny model with tests/hf_tiny.py; run from the "
                                 "repository root or pass --model=<a small HF folder>") from e
        tmp = tempfile.TemporaryDirectory(prefix="compare-tiny-")
        model = tiny_model_folder(f"{tmp.name}/model")
    cfg = compare.CompareConfig(
        out=_OUT.value, model=model, methods=tuple(_METHODS.value or compare.METHOD_ORDER),
        steps=_value(_STEPS, "steps"), batch_size=_value(_BATCH, "batch_size"),
        eval_examples=_value(_EVAL, "eval_examples"), sweep=_SWEEP.value, lrs=parse_lrs(_LRS.value),
        quick=_QUICK.value, gen_prompts=_value(_GEN_PROMPTS, "gen_prompts"),
        gen_tokens=_value(_GEN_TOKENS, "gen_tokens"), gen_rounds=_value(_GEN_ROUNDS, "gen_rounds"),
        keep_checkpoints=_KEEP.value, overwrite=_OVERWRITE.value)
    command = "python -m experiments.compare " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    try:
        summary = compare.run_comparison(cfg, command=command, on_event=lambda m: logging.info("%s", m))
    finally:
        if tmp is not None:
            tmp.cleanup()
    print(f"\nmethod comparison ({cfg.steps} steps each; {summary['wall_s'] / 60:.1f} min; "
          f"report in {cfg.out}/compare.md)")
    print(main_table_markdown(summary))
    base, gen = summary["base"] or {}, summary["generation"]
    if base:
        print(f"base ({base['source']}): exact match {base.get('eval_exact_match', float('nan')):.2f}, eval loss "
              f"{base.get('eval_loss', float('nan')):.3f}; generation "
              f"{gen.get('base', {}).get('tokens_per_s', float('nan')):.1f} tokens/s")
    failed = [k for k, r in summary["methods"].items() if "error" in r]
    failed += [k for k, r in gen.get("variants", {}).items() if "error" in r]
    failed += ["generation timing"] if "error" in gen else []
    if failed:
        print(f"failed: {', '.join(sorted(set(failed)))} (see compare.md and logs/)")
    if failed or not size_ok:
        sys.exit(1)


if __name__ == "__main__":
    run_app(main)
