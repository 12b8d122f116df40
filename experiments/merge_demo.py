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
from typing import Sequence

from absl import flags

from experiments.common import log_to_stderr, run_cli, run_in_process


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("out", None, "Demo folder.", required=True, flag_values=fv)
    flags.DEFINE_string("model", None, "HF folder, .gguf file or hub id (default: SmolLM2-135M-Instruct).",
                        flag_values=fv)
    flags.DEFINE_list("tasks", ["dates", "times"], "Two bundled tasks, one adapter each.", flag_values=fv)
    flags.DEFINE_integer("steps", 100, "Training steps per adapter.", flag_values=fv)
    flags.DEFINE_integer("rank", 16, "LoRA rank (alpha = 2 x rank, targets q,k,v,o).", flag_values=fv)
    flags.DEFINE_integer("eval_examples", 100, "Held-out examples per task.", flag_values=fv)
    flags.DEFINE_float("density", 0.5, "TIES density.", flag_values=fv)
    flags.DEFINE_list("ties_weights", ["1.0", "1.0"], "TIES weights.", flag_values=fv)
    flags.DEFINE_list("linear_weights", ["1.0", "1.0"], "Linear weights (1,1 = the sum of both deltas).",
                      flag_values=fv)
    flags.DEFINE_bool("reuse", False, "Keep trained adapters found in --out; redo merging and evaluation.",
                      flag_values=fv)
    flags.DEFINE_bool("progress", True, "Progress bars while training.", flag_values=fv)


def train_run(fv: flags.FlagValues, out: Path, task: str, method: str, method_cfg, *, lr: float, result: str) -> Path:
    """`run_finetune` of `method` on builtin:`task` into out/`task` (the main job's settings: --steps, batch 8,
    --eval_examples); returns its `result` folder ("adapter" or "model"), reused under --reuse if it exists."""
    from jaxpeft.methods import get_method
    from jaxpeft.train.run import RunConfig, run_finetune

    run = out / task
    if fv.reuse and (run / result / ("adapter_config.json" if result == "adapter" else "config.json")).exists():
        return run / result
    cfg = RunConfig(out=str(run), model=fv.model, dataset=f"builtin:{task}", steps=fv.steps, batch_size=8,
                    lr=lr, eval_examples=fv.eval_examples, overwrite=True, progress=fv.progress)
    run_finetune(cfg, get_method(method), method_cfg)
    return run / result


def _train(fv: flags.FlagValues, out: Path, task: str) -> Path:
    from jaxpeft.methods.lora import LoraConfig

    lora = LoraConfig(r=fv.rank, lora_alpha=2.0 * fv.rank,
                      target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
    return train_run(fv, out, task, "lora", lora, lr=1e-3, result="adapter")


def held_out(tokenizer, task: str, n: int):
    """(prompts with references, the task) for the first `n` held-out records of builtin:`task`."""
    from jaxpeft import data
    from jaxpeft.data import tasks

    _, eval_records = data.load_records(f"builtin:{task}", seed=0)
    return data.eval_prompts(tokenizer, eval_records[:n]), tasks.get_task(task)


def exact_match(model, params, tokenizer, examples) -> dict[str, float]:
    """Greedy exact match of `params` on each task's held-out examples ({task: held_out(...)})."""
    from jaxpeft.train.evaluate import generation_eval

    return {t: generation_eval(model, params, tokenizer, prompts, task.score,
                               max_new_tokens=task.max_new_tokens)["exact_match"]
            for t, (prompts, task) in examples.items()}


def print_table(title: str, table: dict[str, dict[str, float]], task_names: Sequence[str]) -> None:
    print(f"\n{title}")
    print(f"| model | {' | '.join(task_names)} |\n|---|{'---|' * len(task_names)}")
    for label, row in table.items():
        print(f"| {label} | {' | '.join(f'{row[t]:.2f}' for t in task_names)} |")


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


def main(fv: flags.FlagValues, argv: Sequence[str]) -> None:
    del argv
    log_to_stderr()
    import jaxpeft
    from jaxpeft.merge.folders import MergeConfig, merge_folders
    from jaxpeft.multi import AdapterRegistry

    out = Path(fv.out)
    task_names = list(fv.tasks)
    if len(task_names) != 2:
        raise ValueError(f"--tasks needs two tasks, got {task_names}")
    start = time.perf_counter()
    adapters = {t: _train(fv, out, t) for t in task_names}
    merges = {"ties": MergeConfig(combination_type="ties", weights=tuple(map(float, fv.ties_weights)),
                                  density=fv.density),
              "linear": MergeConfig(combination_type="linear", weights=tuple(map(float, fv.linear_weights)))}
    for name, merge in merges.items():
        merge_folders([adapters[t] for t in task_names], merge, out / name, overwrite=True)
    model, base, tokenizer = jaxpeft.from_pretrained(fv.model)
    reg = AdapterRegistry(model, base)
    for t in task_names:
        reg.load(t, adapters[t])
    for name in merges:
        reg.load(name, out / name / "adapter")
    examples = {t: held_out(tokenizer, t, fv.eval_examples) for t in task_names}
    table: dict[str, dict[str, float]] = {}
    for label, active in [("base", None), *[(f"{t} adapter", t) for t in task_names], *[(f"{m} merge", m)
                                                                                          for m in merges]]:
        if active is None:
            reg.disable_adapters()
        else:
            reg.set_adapter(active)
        table[label] = exact_match(model, reg.params(), tokenizer, examples)
    table["served together (one batch, per-row adapters)"] = _served_together(
        reg, tokenizer, {t: t for t in task_names}, examples)
    result = {"tasks": task_names, "steps": fv.steps, "rank": fv.rank, "eval_examples": fv.eval_examples,
              "merges": {n: {"weights": list(m.weights), "density": m.density} for n, m in merges.items()},
              "exact_match": table, "wall_s": round(time.perf_counter() - start, 1)}
    (out / "demo.json").write_text(json.dumps(result, indent=2) + "\n")
    print_table(f"held-out exact match ({fv.eval_examples} examples per task; {fv.steps} steps per adapter)",
                table, task_names)


def run(argv: Sequence[str]) -> int:
    """`python -m experiments.merge_demo ARGV[1:]` in this process (its own FlagValues); returns the exit code."""
    return run_in_process(define_flags, main, argv, doc=__doc__)


if __name__ == "__main__":
    run_cli(define_flags, main)
