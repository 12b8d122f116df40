"""Merging demonstration: two LoRA adapters trained on two tasks, merged with TIES and linear, each task's
held-out metric before and after merging (and both adapters served side by side in one batch).

    python -m experiments.merge_demo --out=runs/merge_demo            # SmolLM2-135M-Instruct, ~15-25 min CPU
    python -m experiments.merge_demo --out=DIR --reuse                # re-merge/re-evaluate, keep trained adapters

What it does, in --out:
1. dates/, times/: `run_finetune` of LoRA (rank 16, alpha 32, q,k,v,o, the main job's settings: --steps,
   batch 8, lr 1e-3) on builtin:dates (dates -> ISO 8601) and builtin:times (times of day -> 24-hour
   HH:MM), each a normal run folder with adapter/ (skipped with --reuse when adapter/ exists).
2. ties/, linear/: `merge_folders` (what `python -m experiments.merge` runs) on the two adapter folders,
   semantics exact: TIES with --ties_weights and --density, linear with --linear_weights.
3. Greedy generation on the first --eval_examples held-out records of each task (the run's own eval
   records) with: the base model, each adapter alone, the TIES merge, the linear merge, and "served
   together": one batch mixing both tasks' prompts, each row with its own adapter
   (`AdapterRegistry.per_example_generate`), which must score as each adapter alone.
Prints a table of exact match per task and writes demo.json. The figures belong in the README /
BUILD_NOTES.md with the command and commit that produced them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from absl import flags

from experiments.common import log_to_stderr, run_app

_OUT = flags.DEFINE_string("out", None, "Demo folder.", required=True)
_MODEL = flags.DEFINE_string("model", None, "HF folder, .gguf file or hub id (default: SmolLM2-135M-Instruct).")
_TASKS = flags.DEFINE_list("tasks", ["dates", "times"], "Two bundled tasks, one adapter each.")
_STEPS = flags.DEFINE_integer("steps", 100, "Training steps per adapter.")
_RANK = flags.DEFINE_integer("rank", 16, "LoRA rank (alpha = 2 x rank, targets q,k,v,o).")
_EVAL = flags.DEFINE_integer("eval_examples", 100, "Held-out examples per task.")
_DENSITY = flags.DEFINE_float("density", 0.5, "TIES density.")
_TIES_W = flags.DEFINE_list("ties_weights", ["1.0", "1.0"], "TIES weights.")
_LINEAR_W = flags.DEFINE_list("linear_weights", ["1.0", "1.0"], "Linear weights (1,1 = the sum of both deltas).")
_REUSE = flags.DEFINE_bool("reuse", False, "Keep trained adapters found in --out; redo merging and evaluation.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Progress bars while training.")


def _train(out: Path, task: str) -> Path:
    from jaxpeft.methods import get_method
    from jaxpeft.methods.lora import LoraConfig
    from jaxpeft.train.run import RunConfig, run_finetune

    run = out / task
    if _REUSE.value and (run / "adapter" / "adapter_config.json").exists():
        return run / "adapter"
    cfg = RunConfig(out=str(run), model=_MODEL.value, dataset=f"builtin:{task}", steps=_STEPS.value, batch_size=8,
                    lr=1e-3, eval_examples=_EVAL.value, overwrite=True, progress=_PROGRESS.value)
    lora = LoraConfig(r=_RANK.value, lora_alpha=2.0 * _RANK.value,
                      target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
    run_finetune(cfg, get_method("lora"), lora)
    return run / "adapter"


def _examples(tokenizer, task: str):
    from jaxpeft import data
    from jaxpeft.data import tasks

    _, eval_records = data.load_records(f"builtin:{task}", seed=0)
    return data.eval_prompts(tokenizer, eval_records[: _EVAL.value]), tasks.get_task(task)


def _served_together(reg, tokenizer, names, examples) -> dict[str, float]:
    """Both tasks' prompts interleaved in one batch, row i with its task's adapter; exact match per task."""
    from jaxpeft.models.generate import stop_ids_for

    rows = [(task, name, prompt, ref) for (task, name) in names.items()
            for prompt, ref in examples[task][0]]
    rows = rows[0::2] + rows[1::2]  # mix the tasks within every batch
    longest = max(len(r[2]) for r in rows)
    max_new = max(examples[t][1].max_new_tokens for t in names)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores: dict[str, list[float]] = {t: [] for t in names}
    for start in range(0, len(rows), 64):
        chunk = rows[start:start + 64]
        outs = reg.per_example_generate([r[2] for r in chunk], [r[1] for r in chunk], max_new_tokens=max_new,
                                        stop_ids=stop_ids_for(tokenizer, reg.model.config), pad_id=pad,
                                        min_prompt_len=longest)
        for (task, _, _, ref), out in zip(chunk, outs):
            pred = tokenizer.decode(out, skip_special_tokens=True).strip()
            scores[task].append(examples[task][1].score(pred, ref)["exact_match"])
    return {t: sum(v) / len(v) for t, v in scores.items()}


def main(argv) -> None:
    del argv
    log_to_stderr()
    import jaxpeft
    from jaxpeft.merge.folders import MergeConfig, merge_folders
    from jaxpeft.multi import AdapterRegistry
    from jaxpeft.train.evaluate import generation_eval

    out = Path(_OUT.value)
    task_names = list(_TASKS.value)
    if len(task_names) != 2:
        raise ValueError(f"--tasks needs two tasks, got {task_names}")
    start = time.perf_counter()
    adapters = {t: _train(out, t) for t in task_names}
    merges = {"ties": MergeConfig(combination_type="ties", weights=tuple(map(float, _TIES_W.value)),
                                  density=_DENSITY.value),
              "linear": MergeConfig(combination_type="linear", weights=tuple(map(float, _LINEAR_W.value)))}
    for name, merge in merges.items():
        merge_folders([adapters[t] for t in task_names], merge, out / name, overwrite=True)
    model, base, tokenizer = jaxpeft.from_pretrained(_MODEL.value)
    reg = AdapterRegistry(model, base)
    for t in task_names:
        reg.load(t, adapters[t])
    for name in merges:
        reg.load(name, out / name / "adapter")
    examples = {t: _examples(tokenizer, t) for t in task_names}
    table: dict[str, dict[str, float]] = {}
    for label, active in [("base", None), *[(f"{t} adapter", t) for t in task_names], *[(f"{m} merge", m)
                                                                                          for m in merges]]:
        if active is None:
            reg.disable_adapters()
        else:
            reg.set_adapter(active)
        params = reg.params()
        table[label] = {t: generation_eval(model, params, tokenizer, prompts, task.score,
                                           max_new_tokens=task.max_new_tokens)["exact_match"]
                        for t, (prompts, task) in examples.items()}
    table["served together (one batch, per-row adapters)"] = _served_together(
        reg, tokenizer, {t: t for t in task_names}, examples)
    result = {"tasks": task_names, "steps": _STEPS.value, "rank": _RANK.value, "eval_examples": _EVAL.value,
              "merges": {n: {"weights": list(m.weights), "density": m.density} for n, m in merges.items()},
              "exact_match": table, "wall_s": round(time.perf_counter() - start, 1)}
    (out / "demo.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nheld-out exact match ({_EVAL.value} examples per task; {_STEPS.value} steps per adapter)")
    print(f"| model | {' | '.join(task_names)} |\n|---|{'---|' * len(task_names)}")
    for label, row in table.items():
        print(f"| {label} | {' | '.join(f'{row[t]:.2f}' for t in task_names)} |")


if __name__ == "__main__":
    run_app(main)
