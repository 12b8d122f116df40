"""Helpers shared by the absl entry points: logging to stderr, chat prompts."""

from __future__ import annotations

import sys
from typing import Any

from absl import logging


class _QuietLibraries:
    """Keeps orbax's per-file INFO chatter out of the run log (its warnings and errors still show)."""

    def filter(self, record) -> bool:
        return record.levelno >= 30 or "orbax" not in record.pathname


def log_to_stderr() -> None:
    """absl logs go to stderr (stdout is reserved for results)."""
    logging.use_absl_handler()
    handler = logging.get_absl_handler()
    handler.python_handler.stream = sys.stderr
    handler.addFilter(_QuietLibraries())
    logging.set_verbosity(logging.INFO)


def encode_prompt(tokenizer: Any, text: str, *, chat: bool) -> list[int]:
    """Token ids of a user prompt, through the tokenizer's chat template unless `chat` is False."""
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return tokenizer(text)["input_ids"]


def parse_targets(text: str):
    """--targets: "q_proj,v_proj" (suffixes), "all-linear", or "re:<regex over dotted module names>"."""
    text = text.strip()
    if text.startswith("re:"):
        return text[3:]
    if text == "all-linear":
        return text
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    if not names:
        raise ValueError("--targets is empty; give module-name suffixes such as q_proj,v_proj, 'all-linear' or re:<regex>")
    return names


def define_run_flags(default_steps: int = 200, default_lr: float = 2e-4) -> None:
    """The flags every fine-tuning entry point shares (experiments.lora's set)."""
    from absl import flags

    flags.DEFINE_string("model", None, "HF folder, .gguf file or hub id (default: SmolLM2-135M-Instruct).")
    flags.DEFINE_string("dataset", "builtin:dates", "A JSON/JSONL/parquet file, a hub dataset, or builtin:<task>.")
    flags.DEFINE_string("eval_split", None, "Held-out fraction of --dataset (e.g. 0.05) or a split name.")
    flags.DEFINE_string("eval_dataset", None, "A separate held-out dataset file.")
    flags.DEFINE_integer("steps", default_steps, "Optimizer steps.")
    flags.DEFINE_integer("batch_size", 8, "Sequences per optimizer step (split over --grad_accum micro-steps).")
    flags.DEFINE_integer("grad_accum", 1, "Gradient accumulation micro-steps per optimizer step.")
    flags.DEFINE_integer("seq_len", 128, "Maximum tokens per sequence (batches use the longest example if shorter).")
    flags.DEFINE_bool("pack", False, "Pack several examples per row.")
    flags.DEFINE_float("lr", default_lr, "Peak learning rate (AdamW, linear warm-up, cosine decay).")
    flags.DEFINE_integer("warmup_steps", 10, "Warm-up steps.")
    flags.DEFINE_float("weight_decay", 0.0, "AdamW weight decay (matrices only).")
    flags.DEFINE_float("max_grad_norm", 1.0, "Global-norm gradient clipping (0 = off).")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype (adapter weights stay fp32).")
    flags.DEFINE_bool("remat", False, "Recompute layer activations in the backward pass (saves memory).")
    flags.DEFINE_integer("seed", 0, "Seed for init, data order and dropout.")
    flags.DEFINE_integer("eval_every", 0, "Evaluate every N steps (0 = only before and after).")
    flags.DEFINE_integer("eval_examples", 100, "Held-out examples to evaluate (loss and generation metrics).")
    flags.DEFINE_integer("save_every", 50, "Checkpoint every N steps (and at the end).")
    flags.DEFINE_integer("keep_checkpoints", 2, "Checkpoints to keep.")
    flags.DEFINE_string("out", None, "Run folder (default: runs/<method>-<date>-<time>).")
    flags.DEFINE_bool("resume", False, "Continue the run in --out from its latest checkpoint.")
    flags.DEFINE_bool("overwrite", False, "Empty a non-empty --out first.")
    flags.DEFINE_bool("save_merged", False, "Also write merged/: the base with the adapter merged in (HF folder).")
    flags.DEFINE_enum("merged_dtype", "float32", ["float32", "bfloat16", "float16"], "dtype of merged/.")
    flags.DEFINE_bool("progress", True, "Show a progress bar.")
    flags.DEFINE_string("mesh", None, "Device mesh, e.g. data:2,fsdp:2,tensor:2 (default: every device on data; "
                        "an axis left out is 1, data takes the rest). See launch/README.md.")
    flags.DEFINE_enum("parallel", "jit", ["jit", "pmap"], "jit: sharded over --mesh; pmap: data parallelism.")


def define_lora_flags(default_targets: str = "q_proj,k_proj,v_proj,o_proj") -> None:
    """LoRA's flags (experiments.lora and experiments.qlora)."""
    from absl import flags

    flags.DEFINE_integer("rank", 16, "LoRA rank r.")
    flags.DEFINE_float("alpha", None, "LoRA alpha (default: 2 x rank).")
    flags.DEFINE_float("dropout", 0.0, "Dropout on the LoRA path.")
    flags.DEFINE_string("targets", default_targets,
                        "Module-name suffixes (comma-separated), 'all-linear', or re:<regex>.")
    flags.DEFINE_bool("use_rslora", False, "Scale by alpha/sqrt(r) (rsLoRA).")
    flags.DEFINE_bool("use_dora", False, "Weight-decomposed LoRA (DoRA).")


def lora_config_from_flags():
    """LoraConfig from `define_lora_flags`' flags; a bad --targets is a usage error."""
    from absl import app, flags

    from jaxpeft.methods.lora import LoraConfig

    f = flags.FLAGS
    try:
        targets = parse_targets(f.targets)
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    return LoraConfig(r=f.rank, lora_alpha=f.alpha if f.alpha is not None else 2.0 * f.rank,
                      lora_dropout=f.dropout, target_modules=targets, use_rslora=f.use_rslora,
                      use_dora=f.use_dora)


def run_config_from_flags(method_name: str):
    """RunConfig from the shared flags."""
    import datetime

    from absl import flags

    from jaxpeft.train.run import RunConfig

    f = flags.FLAGS
    out = f.out or f"runs/{method_name}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    eval_split: float | str | None = f.eval_split
    if eval_split is not None:
        try:
            eval_split = float(eval_split)
        except ValueError:
            pass
    return RunConfig(out=out, model=f.model, dataset=f.dataset, eval_split=eval_split, eval_dataset=f.eval_dataset,
                     steps=f.steps, batch_size=f.batch_size, grad_accum=f.grad_accum, seq_len=f.seq_len, pack=f.pack,
                     lr=f.lr, warmup_steps=f.warmup_steps, weight_decay=f.weight_decay,
                     max_grad_norm=f.max_grad_norm, dtype=f.dtype, remat=f.remat, seed=f.seed,
                     eval_every=f.eval_every, eval_examples=f.eval_examples, save_every=f.save_every,
                     keep_checkpoints=f.keep_checkpoints, resume=f.resume, overwrite=f.overwrite,
                     save_merged=f.save_merged, merged_dtype=f.merged_dtype, progress=f.progress,
                     mesh=f.mesh, parallel=f.parallel)


def print_results(results: dict, out: str) -> None:
    """The before/after table on stdout."""
    before, after = results["before"], results["after"]
    keys = [k for k in after if k.startswith("eval_") and k not in ("eval_n", "eval_tokens")]
    print(f"\nresults ({results['steps']} steps; run folder {out})")
    print(f"{'metric':<28}{'before':>12}{'after':>12}")
    for k in keys:
        print(f"{k:<28}{before.get(k, float('nan')):>12.4f}{after[k]:>12.4f}")
    for s in results.get("samples_after", [])[:3]:
        print(f"  sample: {s['prediction']!r}  (reference {s['reference']!r})")


def method_main(method_name: str, config_from_flags, *, base_loader_from_flags=None, run_name: str | None = None):
    """The `main` of a method's entry point: run `method_name` with the shared flags and its own config.

    `config_from_flags()` builds the method's config from its own flags (raising `app.UsageError` on
    bad ones); `base_loader_from_flags()` (optional) returns a `run_finetune` base loader; `run_name`
    names the default run folder (default: the method's name).
    """

    def main(argv) -> None:
        del argv
        log_to_stderr()
        from jaxpeft.methods import get_method
        from jaxpeft.train.run import run_finetune

        method_cfg = config_from_flags()
        cfg = run_config_from_flags(run_name or method_name)
        loader = base_loader_from_flags() if base_loader_from_flags else None
        results = run_finetune(cfg, get_method(method_name), method_cfg, base_loader=loader)
        print_results(results, cfg.out)

    return main


def run_app(main) -> None:
    """absl's app.run, with jaxpeft's own errors shown as one clear message instead of a traceback."""
    from absl import app

    from jaxpeft.core.errors import JaxPeftError

    def guarded(argv):
        try:
            return main(argv)
        except JaxPeftError as e:
            sys.stderr.write(f"error: {e}\n")
            sys.exit(2)

    app.run(guarded)
