"""Model-merging demonstration (issue 18): two full fine-tunes of one model, one per bundled task, merged as
mergekit merges model folders (task_arithmetic, ties, slerp) and each extracted to a LoRA; held-out exact match
of every result on both tasks (beside experiments.merge_demo, which merges LoRA adapters).

    python -m experiments.merge_models_demo --out=runs/merge_models_demo    # SmolLM2-135M-Instruct, ~30 min CPU
    python -m experiments.merge_models_demo --out=DIR --reuse               # keep the trained fine-tunes

What it does, in --out:
1. dates/, times/: `run_finetune` of full fine-tuning (experiments.full's library path and default lr 5e-5;
   --steps, batch 8) on builtin:dates and builtin:times, each a run folder with model/ (skipped with --reuse
   when model/ exists).
2. task_arithmetic/, ties/, slerp/ (YAML beside each: <name>.yml): `merge_config_file` (what
   `python -m experiments.merge_models` runs) of the two fine-tunes: task_arithmetic (--weights) and ties
   (--weights, --density) over the base (--model's folder, or the default model's cached HF folder); slerp
   between the two fine-tunes (the first task's as mergekit's base_model, t = --t).
3. lora_<task>_r<rank>/, lora_<task>_energy/: `extract_lora` of each fine-tune against the base at --rank and at
   --energy (every attention and MLP linear; the embedding, norms and head stay the base's unless named in
   --save_modules: the LoRA modules' share of ||F - B||^2 is in demo.json).
4. Greedy exact match on the first --eval_examples held-out records of each task (the runs' own eval records)
   for the base, each fine-tune, each merge and each extracted LoRA (on the base). Prints the table and
   writes demo.json. The figures belong in the README / BUILD_NOTES.md with the command and commit.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

from absl import flags

from experiments.common import log_to_stderr, run_cli, run_in_process
from experiments.full import DEFAULT_LR as FULL_LR
from experiments.merge_demo import exact_match, held_out, print_table, train_run


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("out", None, "Demo folder.", required=True, flag_values=fv)
    flags.DEFINE_string("model", None, "Base HF folder (default: SmolLM2-135M-Instruct's cached HF folder).",
                        flag_values=fv)
    flags.DEFINE_list("tasks", ["dates", "times"], "Two bundled tasks, one full fine-tune each.", flag_values=fv)
    flags.DEFINE_integer("steps", 100, "Training steps per fine-tune.", flag_values=fv)
    flags.DEFINE_float("lr", FULL_LR, "Peak learning rate of the full fine-tunes.", flag_values=fv)
    flags.DEFINE_integer("eval_examples", 100, "Held-out examples per task.", flag_values=fv)
    flags.DEFINE_list("weights", ["1.0", "1.0"], "task_arithmetic and ties weights (1,1 = both task vectors).",
                      flag_values=fv)
    flags.DEFINE_float("density", 0.5, "ties density.", flag_values=fv)
    flags.DEFINE_float("t", 0.5, "slerp t (0 = the first task's fine-tune, 1 = the second's).", flag_values=fv)
    flags.DEFINE_integer("rank", 16, "Fixed rank of the extracted LoRAs.", flag_values=fv)
    flags.DEFINE_float("energy", 0.95, "Energy kept by the per-module-rank extracted LoRAs.", flag_values=fv)
    flags.DEFINE_list("save_modules", [], "Module-name suffixes the extracted LoRAs store whole (modules_to_save, "
                      "e.g. embed_tokens,norm); by default a LoRA carries only the linears' differences.",
                      flag_values=fv)
    flags.DEFINE_bool("reuse", False, "Keep fine-tunes found in --out; redo merging, extraction and evaluation.",
                      flag_values=fv)
    flags.DEFINE_bool("progress", True, "Progress bars while training and merging.", flag_values=fv)


def merge_configs(base: str, fts: dict[str, Path], weights: Sequence[float], density: float, t: float) -> dict:
    """The three mergekit YAML texts, {name: text}, of the fine-tunes `fts` ({task: model folder}) over `base`."""
    (a, fa), (b, fb) = fts.items()
    w = [float(x) for x in weights]
    return {
        "task_arithmetic": f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
                           f"  - {{model: {fa}, parameters: {{weight: {w[0]}}}}}\n"
                           f"  - {{model: {fb}, parameters: {{weight: {w[1]}}}}}\n",
        "ties": f"merge_method: ties\nbase_model: {base}\nmodels:\n"
                f"  - {{model: {fa}, parameters: {{weight: {w[0]}, density: {density}}}}}\n"
                f"  - {{model: {fb}, parameters: {{weight: {w[1]}, density: {density}}}}}\n",
        "slerp": f"merge_method: slerp\nbase_model: {fa}\nmodels: [{{model: {fa}}}, {{model: {fb}}}]\n"
                 f"parameters: {{t: {t}}}\n",
    }


def _base_folder(model: str | None) -> str:
    from jaxpeft.convert.default_model import cached_hf_folder

    if model is None:
        return cached_hf_folder()
    if not (Path(model) / "config.json").exists():
        raise ValueError(f"--model={model}: the merges need the base as an HF folder (config.json and "
                         "safetensors); convert it first (python -m experiments.convert) or leave --model unset")
    return str(Path(model).resolve())


def main(fv: flags.FlagValues, argv: Sequence[str]) -> None:
    del argv
    log_to_stderr()
    import jaxpeft
    from jaxpeft.merge.extract import ExtractConfig, extract_lora
    from jaxpeft.merge.kit_exec import MergeOptions, merge_config_file
    from jaxpeft.methods.full import FullConfig
    from jaxpeft.multi import AdapterRegistry

    out = Path(fv.out)
    task_names = list(fv.tasks)
    if len(task_names) != 2 or len(fv.weights) != 2:
        raise ValueError(f"--tasks and --weights need two entries each, got {task_names} and {fv.weights}")
    start = time.perf_counter()
    base = _base_folder(fv.model)
    fts = {t: train_run(fv, out, t, "full", FullConfig(), lr=fv.lr, result="model") for t in task_names}
    merges = merge_configs(base, fts, fv.weights, fv.density, fv.t)
    for name, text in merges.items():
        (out / f"{name}.yml").write_text(text)
        merge_config_file(out / f"{name}.yml", out / name, MergeOptions(overwrite=True, progress=fv.progress))
    extractions: dict[str, dict] = {}
    for t, ft in fts.items():
        saved = tuple(fv.save_modules)
        for kind, cfg in ((f"r{fv.rank}", ExtractConfig(rank=fv.rank, save_modules=saved)),
                          ("energy", ExtractConfig(energy=fv.energy, save_modules=saved))):
            report = extract_lora(base, ft, out / f"lora_{t}_{kind}", cfg, overwrite=True)
            ranks = [m["rank"] for m in report["modules"].values()]
            kept = [m["energy_kept"] for m in report["modules"].values()]
            extractions[f"lora_{t}_{kind}"] = {
                "ranks": {"min": min(ranks), "max": max(ranks), "mean": sum(ranks) / len(ranks)},
                "energy_kept": {"min": min(kept), "max": max(kept)}, "lora_share": report["lora_share"],
                "saved": report["saved"]}

    model, base_params, tokenizer = jaxpeft.from_pretrained(base)
    examples = {t: held_out(tokenizer, t, fv.eval_examples) for t in task_names}
    table: dict[str, dict[str, float]] = {"base": exact_match(model, base_params, tokenizer, examples)}
    for label, folder in [*[(f"{t} full fine-tune", fts[t]) for t in task_names],
                          *[(f"{m} merge", out / m) for m in merges]]:
        m, params, _ = jaxpeft.from_pretrained(str(folder), load_tokenizer=False)
        table[label] = exact_match(m, params, tokenizer, examples)
        del params
    reg = AdapterRegistry(model, base_params)
    for name in extractions:
        reg.load(name, out / name)
        reg.set_adapter(name)
        t, kind = name[len("lora_"):].rsplit("_", 1)
        label = f"{t} LoRA, rank {fv.rank}" if kind != "energy" else f"{t} LoRA, {fv.energy:g} energy"
        table[label] = exact_match(model, reg.params(), tokenizer, examples)
    result = {"tasks": task_names, "base": base, "steps": fv.steps, "lr": fv.lr, "eval_examples": fv.eval_examples,
              "merges": merges, "extractions": extractions, "exact_match": table,
              "wall_s": round(time.perf_counter() - start, 1)}
    (out / "demo.json").write_text(json.dumps(result, indent=2) + "\n")
    print_table(f"held-out exact match ({fv.eval_examples} examples per task; {fv.steps} steps per fine-tune)",
                table, task_names)
    for name, e in extractions.items():
        print(f"{name}: ranks {e['ranks']['min']}-{e['ranks']['max']} (mean {e['ranks']['mean']:.1f}), energy kept "
              f"{e['energy_kept']['min']:.3f}-{e['energy_kept']['max']:.3f}, LoRA modules carry "
              f"{e['lora_share']:.3f} of ||F - B||^2")


def run(argv: Sequence[str]) -> int:
    """`python -m experiments.merge_models_demo ARGV[1:]` in this process (its own FlagValues); the exit code."""
    return run_in_process(define_flags, main, argv, doc=__doc__)


if __name__ == "__main__":
    run_cli(define_flags, main)
