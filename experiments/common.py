"""Helpers shared by the absl entry points: logging to stderr, chat prompts, flag sets, running an entry point.

Every entry point `experiments/<name>.py` has the same shape:

    def define_flags(fv: flags.FlagValues) -> None: ...   # its flags, defined into `fv`
    def main(fv: flags.FlagValues, argv) -> None: ...      # the work, reading the parsed `fv`
    def run(argv) -> int:                                  # in-process: a fresh FlagValues per call
        return run_in_process(define_flags, main, argv, doc=__doc__)
    if __name__ == "__main__":
        run_cli(define_flags, main)                        # absl's app.run over the global FLAGS

`python -m experiments.<name>` defines the flags into absl's global FLAGS exactly as before (same
--help/--helpfull, exit codes, output); `run(argv)` parses into its own `flags.FlagValues`, so several
entry points can run in one process (the tests do) without their flags colliding.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Sequence

from absl import app, flags, logging


class _QuietLibraries:
    """Keeps orbax's per-file INFO chatter out of the run log (its warnings and errors still show)."""

    def filter(self, record) -> bool:
        return record.levelno >= 30 or "orbax" not in record.pathname


def log_to_stderr() -> None:
    """absl logs go to stderr (stdout is reserved for results)."""
    logging.use_absl_handler()
    handler = logging.get_absl_handler()
    handler.python_handler.stream = sys.stderr
    if not any(isinstance(f, _QuietLibraries) for f in handler.filters):  # once, however many runs in a process
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


# The valid range of every numeric flag of the training entry points, in one place: (low, high, low open,
# high open); None is unbounded. `check_flag_ranges` refuses a value outside it before anything loads, and
# `document_flag_ranges` appends the range to the flag's help.
FLAG_RANGES: dict[str, tuple[float | None, float | None, bool, bool]] = {
    "steps": (1, None, False, False), "epochs": (1, None, False, False), "batch_size": (1, None, False, False), "grad_accum": (1, None, False, False),
    "seq_len": (2, None, False, False), "lr": (0, None, True, False), "warmup_steps": (0, None, False, False),
    "weight_decay": (0, None, False, False), "max_grad_norm": (0, None, False, False),
    "seed": (0, None, False, False), "eval_every": (0, None, False, False), "eval_examples": (0, None, False, False),
    "save_every": (0, None, False, False), "keep_checkpoints": (1, None, False, False),
    "rank": (1, None, False, False), "alpha": (0, None, True, False), "dropout": (0, 1, False, True),
    "reduction_factor": (0, None, True, False), "num_virtual_tokens": (1, None, False, False),
    "encoder_hidden_size": (1, None, False, False), "blocksize": (1, None, False, False),
    "beta": (0, None, True, False), "label_smoothing": (0, 0.5, False, True), "sft_weight": (0, None, False, False),
}


def _range_text(low, high, low_open: bool, high_open: bool) -> str:
    if high is None:
        return f"{'>' if low_open else '>='} {low}"
    return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def _in_range(value: float, low, high, low_open: bool, high_open: bool) -> bool:
    above = value > low if low_open else value >= low
    below = high is None or (value < high if high_open else value <= high)
    return above and below


def document_flag_ranges(fv: flags.FlagValues) -> None:
    """Appends its valid range to the help of each numeric flag of a training entry point (one with --steps)."""
    if "steps" not in fv:
        return
    for name, bounds in FLAG_RANGES.items():
        if name in fv and "Valid:" not in (fv[name].help or ""):
            fv[name].help = f"{fv[name].help} Valid: {_range_text(*bounds)}."


def check_flag_ranges(fv: flags.FlagValues) -> None:
    """Refuses, in one error listing all of them, numeric flags outside `FLAG_RANGES` (e.g. --lr=-1, which
    would train by gradient ascent, or --steps=-5)."""
    from jaxpeft.core.errors import ConfigError

    bad = [f"--{name}={fv[name].value} (expected {_range_text(*bounds)})" for name, bounds in FLAG_RANGES.items()
           if name in fv and fv[name].value is not None and not _in_range(fv[name].value, *bounds)]
    if bad:
        raise ConfigError(f"out of range: {'; '.join(bad)}. Pass values in those ranges (--helpfull lists them).")


def define_run_flags(fv: flags.FlagValues, default_steps: int = 200, default_lr: float = 2e-4) -> None:
    """The flags every fine-tuning entry point shares (experiments.lora's set), defined into `fv`."""
    flags.DEFINE_string("model", None, "HF folder, .gguf file or hub id (default: SmolLM2-135M-Instruct).",
                        flag_values=fv)
    define_dataset_flags(fv)
    flags.DEFINE_string("eval_split", None, "Held-out fraction of --dataset (e.g. 0.05) or a split name.",
                        flag_values=fv)
    flags.DEFINE_string("eval_dataset", None, "A separate held-out dataset file.", flag_values=fv)
    flags.DEFINE_integer("steps", default_steps, "Optimizer steps (given explicitly, it wins over --epochs).",
                         flag_values=fv)
    flags.DEFINE_integer("epochs", None, "Passes over the training data (HF's num_train_epochs): the run takes "
                         "the batches of that many epochs, counted after packing; each epoch ends with its own, "
                         "maybe smaller, batch. --resume may raise it.", flag_values=fv)
    flags.DEFINE_integer("batch_size", 8, "Rows per optimizer step (split over --grad_accum micro-steps); with "
                         "--pack a row holds several examples.", flag_values=fv)
    flags.DEFINE_integer("grad_accum", 1, "Gradient accumulation micro-steps per optimizer step.", flag_values=fv)
    flags.DEFINE_integer("seq_len", 128, "Maximum tokens per row. Each batch is padded to its longest row rounded "
                         "up to a length bucket (16, 24, 32, 48, 64, 96, 128, 192, ... up to --seq_len), one "
                         "compiled step per bucket.", flag_values=fv)
    flags.DEFINE_bool("pack", True, "Pack several whole examples into each row of --seq_len tokens (each attends "
                      "only to itself, positions restart); --nopack: one example a row.", flag_values=fv)
    flags.DEFINE_float("lr", default_lr, "Peak learning rate (AdamW, linear warm-up, cosine decay).", flag_values=fv)
    flags.DEFINE_integer("warmup_steps", 10, "Warm-up steps.", flag_values=fv)
    flags.DEFINE_float("weight_decay", 0.0, "AdamW weight decay (matrices only).", flag_values=fv)
    flags.DEFINE_float("max_grad_norm", 1.0, "Global-norm gradient clipping (0 = off).", flag_values=fv)
    flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16", "float16"],
                      "Compute dtype; auto: the base's float dtype (adapters, optimizer state and loss stay fp32).",
                      flag_values=fv)
    define_param_dtype_flag(fv)
    flags.DEFINE_bool("remat", False, "Recompute layer activations in the backward pass (saves memory).",
                      flag_values=fv)
    flags.DEFINE_integer("loss_chunk", None, "Targets per chunk of the head + cross-entropy, so target x vocab "
                         "logits never exist at once (0 = all at once; default: auto, by vocabulary size).",
                         lower_bound=0, flag_values=fv)
    flags.DEFINE_bool("remat_offload", False, "GPU only: keep the checkpointed layer activations in host memory "
                      "(jax.checkpoint_policies offload); refused on the CPU.", flag_values=fv)
    flags.DEFINE_enum("attention", "auto", ["auto", "dense", "blockwise", "cudnn"],
                      "Attention implementation: auto picks cuDNN on a GPU where it applies, blockwise (memory "
                      "linear in the sequence) for sequences of 512+ tokens (1024+ with --remat on the CPU), else dense.", flag_values=fv)
    flags.DEFINE_integer("attention_block", 512, "Query / key block of the blockwise attention.", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Seed for init, data order and dropout.", flag_values=fv)
    flags.DEFINE_integer("eval_every", 0, "Evaluate every N steps (0 = only before and after).", flag_values=fv)
    flags.DEFINE_integer("eval_examples", 100, "Held-out examples to evaluate (loss and generation metrics).",
                         flag_values=fv)
    flags.DEFINE_integer("save_every", 50, "Checkpoint every N steps (and at the end).", flag_values=fv)
    flags.DEFINE_integer("keep_checkpoints", 2, "Checkpoints to keep.", flag_values=fv)
    flags.DEFINE_string("out", None, "Run folder (default: runs/<method>-<date>-<time>).", flag_values=fv)
    flags.DEFINE_bool("resume", False, "Continue the run in --out from its latest checkpoint.", flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "Empty a non-empty --out first.", flag_values=fv)
    flags.DEFINE_bool("save_merged", False, "Also write merged/: the base with the adapter merged in (HF folder).",
                      flag_values=fv)
    flags.DEFINE_enum("merged_dtype", "auto", ["auto", "float32", "bfloat16", "float16"],
                      "dtype of merged/ (auto: the base's dtype; a 4-bit base's dtype before quantization).",
                      flag_values=fv)
    flags.DEFINE_bool("progress", True, "Show a progress bar.", flag_values=fv)
    flags.DEFINE_string("mesh", None, "Device mesh, e.g. data:2,fsdp:2,tensor:2 (default: every device on data; "
                        "an axis left out is 1, data takes the rest). See launch/README.md.", flag_values=fv)
    flags.DEFINE_enum("parallel", "jit", ["jit", "pmap"], "jit: sharded over --mesh; pmap: data parallelism.",
                      flag_values=fv)


def define_dataset_flags(fv: flags.FlagValues) -> None:
    """Which data and which tokens are targets: the training entry points and experiments.data."""
    flags.DEFINE_string("dataset", "builtin:dates", "A .json/.jsonl/.parquet/.csv file, a datasets.save_to_disk "
                        "folder, a hub dataset, builtin:<task>, or several of them comma-separated.", flag_values=fv)
    flags.DEFINE_string("dataset_split", "train", "The split of --dataset to train on (hub datasets, saved "
                        "DatasetDicts).", flag_values=fv)
    flags.DEFINE_string("dataset_config", None, "The hub dataset's configuration (subset) name.", flag_values=fv)
    flags.DEFINE_string("dataset_text_field", "text", "The column holding the text of language-modelling records.",
                        flag_values=fv)
    flags.DEFINE_string("field_map", None, "Rename record fields before the formats are recognised, "
                        "yours:theirs,... (e.g. question:prompt,answer:completion).", flag_values=fv)
    flags.DEFINE_enum("train_on", None, ["all", "completion", "assistant", "last"],
                      "Target tokens. prompt/completion records: completion (default) | all; text: all; messages "
                      "and conversations: assistant (default: every assistant turn) | last | all; Alpaca: its "
                      "answer (all: every token).", flag_values=fv)
    flags.DEFINE_string("chat_template", None, "A Jinja chat template file replacing the tokenizer's (e.g. TRL's "
                        "trl/chat_templates/qwen2_5_training.jinja).", flag_values=fv)
    flags.DEFINE_enum("truncation", "prompt_left", ["prompt_left", "right", "drop"],
                      "Examples longer than --seq_len: prompt_left cuts the prompt from its left and keeps the "
                      "answer; right keeps the first --seq_len tokens (TRL's); drop drops them.", flag_values=fv)


def define_param_dtype_flag(fv: flags.FlagValues) -> None:
    """--param_dtype: the stored dtype of the base weights (the training, generate and merge entry points)."""
    flags.DEFINE_enum("param_dtype", "auto", ["auto", "float32", "bfloat16", "float16"],
                      "Stored dtype of the base weights; auto: as the checkpoint stores them (bf16 stays bf16).",
                      flag_values=fv)


def define_lora_flags(fv: flags.FlagValues, default_targets: str = "q_proj,k_proj,v_proj,o_proj") -> None:
    """LoRA's flags (experiments.lora and experiments.qlora), defined into `fv`."""
    flags.DEFINE_integer("rank", 16, "LoRA rank r.", flag_values=fv)
    flags.DEFINE_float("alpha", None, "LoRA alpha (default: 2 x rank).", flag_values=fv)
    flags.DEFINE_float("dropout", 0.0, "Dropout on the LoRA path.", flag_values=fv)
    flags.DEFINE_string("targets", default_targets,
                        "Module-name suffixes (comma-separated), 'all-linear', or re:<regex>. Not given: the "
                        "attention projections of the --model folder's family (Phi-3: qkv_proj,o_proj), else "
                        "the default shown.", flag_values=fv)
    flags.DEFINE_bool("use_rslora", False, "Scale by alpha/sqrt(r) (rsLoRA).", flag_values=fv)
    flags.DEFINE_bool("use_dora", False, "Weight-decomposed LoRA (DoRA).", flag_values=fv)
    flags.DEFINE_list("target_parameters", [],
                      "PEFT's target_parameters: bare parameters to adapt, beside --targets, e.g. MoE expert stacks "
                      "mlp.experts.gate_up_proj,mlp.experts.down_proj and the router mlp.gate.weight. Needs "
                      "--dropout=0 and no --use_dora (as PEFT).", flag_values=fv)


def family_attention_targets(model: str | None) -> tuple[str, ...] | None:
    """The attention projections ("q_proj", ..., or Phi-3's fused "qkv_proj") of the family of a local HF
    model folder, read from its config.json; None for anything else (the default model, a hub id, a GGUF
    file, an unknown family: the caller keeps its default and the usual errors apply later)."""
    import os

    if not model or not os.path.isfile(os.path.join(model, "config.json")):
        return None
    from jaxpeft.convert.hf import read_config_json
    from jaxpeft.core.errors import CheckpointError, UnsupportedModelError
    from jaxpeft.models.families import family_of

    try:
        family = family_of(read_config_json(model).get("model_type"))
    except (CheckpointError, UnsupportedModelError):
        return None
    return tuple(p.short for p in family.linears if p.name.startswith("self_attn."))


def lora_config_from_flags(fv: flags.FlagValues):
    """LoraConfig from `define_lora_flags`' flags in `fv`; a bad --targets is a usage error."""
    from jaxpeft.methods.lora import LoraConfig

    try:
        targets = parse_targets(fv.targets)
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    if not fv["targets"].present:
        targets = family_attention_targets(getattr(fv, "model", None)) or targets
    from jaxpeft.core.errors import ConfigError

    try:
        return LoraConfig(r=fv.rank, lora_alpha=fv.alpha if fv.alpha is not None else 2.0 * fv.rank,
                          lora_dropout=fv.dropout, target_modules=targets, use_rslora=fv.use_rslora,
                          use_dora=fv.use_dora, target_parameters=tuple(getattr(fv, "target_parameters", ()) or ()))
    except ConfigError as e:  # e.g. --target_parameters with --dropout>0 or --use_dora
        raise app.UsageError(str(e).replace("\n", " ")) from e


def run_config_from_flags(fv: flags.FlagValues, method_name: str):
    """RunConfig from the shared flags in `fv`."""
    import datetime

    from jaxpeft.train.run import RunConfig

    f = fv
    epochs = getattr(f, "epochs", None)
    if epochs is not None and f["steps"].present:
        logging.warning("--steps=%d was given, so it wins over --epochs=%d", f.steps, epochs)
        epochs = None
    out = f.out or f"runs/{method_name}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    eval_split: float | str | None = f.eval_split
    if eval_split is not None:
        try:
            eval_split = float(eval_split)
        except ValueError:
            pass
    return RunConfig(out=out, model=f.model, dataset=f.dataset, eval_split=eval_split, eval_dataset=f.eval_dataset,
                     dataset_split=f.dataset_split, dataset_config=f.dataset_config,
                     dataset_text_field=f.dataset_text_field, field_map=f.field_map, train_on=f.train_on,
                     chat_template=f.chat_template, truncation=f.truncation,
                     steps=f.steps, epochs=epochs, batch_size=f.batch_size, grad_accum=f.grad_accum, seq_len=f.seq_len, pack=f.pack,
                     lr=f.lr, warmup_steps=f.warmup_steps, weight_decay=f.weight_decay,
                     max_grad_norm=f.max_grad_norm, dtype=f.dtype, param_dtype=f.param_dtype, remat=f.remat,
                     loss_chunk=f.loss_chunk,
                     remat_offload=f.remat_offload, attention=f.attention, attention_block=f.attention_block,
                     seed=f.seed,
                     eval_every=f.eval_every, eval_examples=f.eval_examples, save_every=f.save_every,
                     keep_checkpoints=f.keep_checkpoints, resume=f.resume, overwrite=f.overwrite,
                     save_merged=f.save_merged, merged_dtype=f.merged_dtype, progress=f.progress,
                     mesh=f.mesh, parallel=f.parallel)


def print_results(results: dict, out: str) -> None:
    """The before/after table on stdout."""
    before, after = results["before"], results["after"]
    keys = [k for k in after if k.startswith("eval_") and k not in ("eval_n", "eval_tokens")]
    print(f"\nresults ({results['steps']} steps; run folder {out})")
    if not keys:
        print("evaluation skipped (--eval_examples=0)")
        return
    print(f"{'metric':<28}{'before':>12}{'after':>12}")
    for k in keys:
        print(f"{k:<28}{before.get(k, float('nan')):>12.4f}{after[k]:>12.4f}")
    for s in results.get("samples_after", [])[:3]:
        print(f"  sample: {s['prediction']!r}  (reference {s['reference']!r})")


Main = Callable[[flags.FlagValues, Sequence[str]], None]


def method_main(method_name: str, config_from_flags, *, base_loader_from_flags=None, run_name: str | None = None
                ) -> Main:
    """The `main(fv, argv)` of a method's entry point: run `method_name` with the shared flags and its own config.

    `config_from_flags(fv)` builds the method's config from its own flags (raising `app.UsageError` on
    bad ones); `base_loader_from_flags(fv)` (optional) returns a `run_finetune` base loader; `run_name`
    names the default run folder (default: the method's name).
    """

    def main(fv: flags.FlagValues, argv: Sequence[str]) -> None:
        del argv
        log_to_stderr()
        check_flag_ranges(fv)
        from jaxpeft.methods import get_method
        from jaxpeft.plan.runs import plan_run
        from jaxpeft.train.run import run_finetune

        method_cfg = config_from_flags(fv)
        cfg = run_config_from_flags(fv, run_name or method_name)
        loader = base_loader_from_flags(fv) if base_loader_from_flags else None
        results = run_finetune(cfg, get_method(method_name), method_cfg, base_loader=loader,
                               callbacks={"plan": plan_run})
        print_results(results, cfg.out)

    return main


def run_app(main) -> None:
    """absl's app.run, with jaxpeft's own errors shown as one clear message instead of a traceback."""
    from jaxpeft.core.errors import JaxPeftError

    def guarded(argv):
        try:
            return main(argv)
        except JaxPeftError as e:
            sys.stderr.write(f"error: {e}\n")
            sys.exit(e.exit_code)

    app.run(guarded)


def run_cli(define_flags: Callable[[flags.FlagValues], None], main: Main) -> None:
    """`python -m experiments.<name>`: the flags go into absl's global FLAGS and `run_app` runs `main`.

    Exactly the command line of before: the same flags (attributed to the same modules, so --help and
    --helpfull read the same), absl's own flags, and the same exit codes (1: a usage or flag error, 2: a
    jaxpeft error, shown as one line; a run stopped by SIGTERM or SIGINT: 143 or 130, and a write that
    found no room: 74, each also one line).
    """
    define_flags(flags.FLAGS)
    document_flag_ranges(flags.FLAGS)
    run_app(lambda argv: main(flags.FLAGS, argv))


def run_in_process(define_flags: Callable[[flags.FlagValues], None], main: Main, argv: Sequence[str], *,
                   doc: str | None = None) -> int:
    """Runs an entry point in this process on `argv` (argv[0] is the program name) and returns its exit code.

    The flags are parsed into a fresh `flags.FlagValues`, so entry points can run one after another in one
    process. Exit codes and stderr messages follow `run_cli`: a flag error prints absl's "FATAL Flags
    parsing error" lines (1), an `app.UsageError` the entry point's `doc` and the error (its exitcode, 1),
    a `JaxPeftError` "error: <message>" (its `exit_code`: 2, or 143/130/74 as in `run_cli`). absl's own
    flags (--helpfull, --verbosity, ...) exist only on the command line. Any other exception propagates.
    """
    from jaxpeft.core.errors import JaxPeftError

    fv = flags.FlagValues()
    define_flags(fv)
    document_flag_ranges(fv)
    try:
        args = fv(list(argv))
    except flags.Error as e:
        sys.stderr.write(f"FATAL Flags parsing error: {e}\n")
        sys.stderr.write("Pass --helpshort or --helpfull to see help on flags.\n")
        return 1
    try:
        main(fv, args)
    except app.UsageError as e:
        sys.stderr.write(f"{doc or ''}\n\n{e}\n")
        return e.exitcode
    except JaxPeftError as e:
        sys.stderr.write(f"error: {e}\n")
        return e.exit_code
    except SystemExit as e:  # an entry point that exits itself
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0
