"""The method comparison (`python -m experiments.compare`): the library side, without flags.

Every method is trained by its own entry point (`python -m experiments.<method>`) in its own child
process, so each run's peak memory is that process's own peak RSS (read with `os.wait4`), and every
method gets the same step budget, batch, data order and held-out examples. A run folder
(jaxpeft/train/run_folder.py) then gives the rest: parameter counts (config.json), the held-out metrics
before and after (results.json), per-step training tokens/s (metrics.jsonl) and the saved artifact
(adapter/ or model/). Generation speed is measured afterwards in one process
(`jaxpeft.compare.speed`), and the report written by `jaxpeft.compare.report`. Child processes and
their peak memory: `jaxpeft.compare.children`; the 7B adapter-size table: `jaxpeft.compare.sizes`.

Learning rates: each method trains at its entry point's default learning rate (the `lrs[0]` below),
because a sweep over every method does not fit the comparison's 60-minute CPU budget; `sweep=True`
adds the second point of each grid (3x the default) and keeps the better run by held-out exact match
(ties: lower held-out loss). The grids are stated in `SPECS` and copied into compare.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from jaxpeft.compare import report, speed
from jaxpeft.compare.children import run_child
from jaxpeft.compare.sizes import adapter_size_table
from jaxpeft.core.errors import ConfigError, bullet_list
from jaxpeft.methods import get_method
from jaxpeft.train.metrics import read_metrics
from jaxpeft.train.run_folder import library_versions


@dataclasses.dataclass(frozen=True, kw_only=True)
class MethodSpec:
    """One row of the comparison: which entry point trains it, at which learning rates, with which flags."""

    label: str  # the row's name
    entry: str  # the absl entry point module, e.g. "experiments.qlora"
    method: str  # the registry name of the method whose artifact the run writes
    lrs: tuple[float, ...]  # the learning-rate grid; lrs[0] is the entry point's default (the one run)
    args: tuple[str, ...] = ()  # extra flags, always
    quick_args: tuple[str, ...] = ()  # extra flags in quick mode (tiny models: hidden 40, 8-wide k/v)
    quantized_base: bool = False  # the run's base is 4-bit (QLoRA): generation must quantize it too


# The method settings are each entry point's defaults (LoRA: rank 16 on q,k,v,o; QLoRA: rank 16 on
# every linear of an NF4 base; Houlsby adapters with reduction factor 16; 20 virtual tokens for prefix
# and prompt tuning; IA3 on k, v and the MLP down projection), so a row is what a user gets by default.
SPECS: dict[str, MethodSpec] = {s.label: s for s in (
    # 5e-5: transformers' Trainer default; LoRA's rates would wreck a fully trained base.
    MethodSpec(label="full", entry="experiments.full", method="full", lrs=(5e-5, 1.5e-4)),
    MethodSpec(label="lora", entry="experiments.lora", method="lora", lrs=(1e-3, 3e-3), quick_args=("--rank=4",)),
    MethodSpec(label="qlora", entry="experiments.qlora", method="lora", lrs=(2e-3, 6e-3), quick_args=("--rank=4",),
               quantized_base=True),
    MethodSpec(label="adapters", entry="experiments.adapters", method="adapters", lrs=(1e-3, 3e-3),
               args=("--adapter_type=houlsby",), quick_args=("--reduction_factor=8",)),
    MethodSpec(label="prefix", entry="experiments.prefix", method="prefix", lrs=(1e-2, 3e-2),
               quick_args=("--num_virtual_tokens=4",)),
    MethodSpec(label="prompt", entry="experiments.prompt", method="prompt", lrs=(3e-2, 1e-1),
               quick_args=("--num_virtual_tokens=4",)),
    MethodSpec(label="ia3", entry="experiments.ia3", method="ia3", lrs=(1e-2, 3e-2)),
)}
METHOD_ORDER = tuple(SPECS)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CompareConfig:
    """Settings of one comparison. `lrs` overrides a method's grid: ((label, (lr, ...)), ...)."""

    out: str
    model: str | None = None  # None: the default model (SmolLM2-135M-Instruct)
    methods: tuple[str, ...] = METHOD_ORDER
    steps: int = 100
    batch_size: int = 8
    eval_examples: int = 100
    sweep: bool = False
    lrs: tuple[tuple[str, tuple[float, ...]], ...] = ()
    quick: bool = False
    gen_prompts: int = 8  # held-out prompts per generation-speed batch
    gen_tokens: int = 32  # new tokens per prompt (no early stop, so every variant decodes the same count)
    gen_rounds: int = 3  # timed rounds per variant, alternating with the base
    keep_checkpoints: bool = False  # keep each run's checkpoints/ (the full run's is ~1.6 GB on SmolLM2)
    overwrite: bool = False

    def __post_init__(self) -> None:
        problems = [f"unknown method {m!r}" for m in self.methods if m not in SPECS]
        problems += [f"--lrs names {m!r}, which is not compared" for m, _ in self.lrs if m not in self.methods]
        problems += [f"{m}: learning rate {lr} must be > 0" for m, grid in self.lrs for lr in grid if not lr > 0]
        if len(set(self.methods)) != len(self.methods) or not self.methods:
            problems.append(f"methods {list(self.methods)}: give each method once, at least one")
        for name in ("steps", "batch_size", "eval_examples", "gen_prompts", "gen_tokens", "gen_rounds"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        if problems:
            raise ConfigError("invalid comparison settings:\n" + bullet_list(problems)
                              + f"\nKnown methods: {','.join(METHOD_ORDER)}.")

    def grid(self, label: str) -> tuple[float, ...]:
        """The learning rates `label` is trained at."""
        override = dict(self.lrs).get(label)
        if override:
            return tuple(override)
        return SPECS[label].lrs if self.sweep else SPECS[label].lrs[:1]


def lr_text(lr: float) -> str:
    return f"{lr:g}"


def run_argv(spec: MethodSpec, cfg: CompareConfig, lr: float, run_dir: Path) -> list[str]:
    """The command line that trains `spec` at `lr` into `run_dir`."""
    argv = [sys.executable, "-m", spec.entry, f"--out={run_dir}", "--overwrite", f"--steps={cfg.steps}",
            f"--batch_size={cfg.batch_size}", f"--eval_examples={cfg.eval_examples}", f"--lr={lr_text(lr)}",
            "--save_every=0", "--keep_checkpoints=1", "--noprogress", *spec.args]
    if cfg.model:
        argv.append(f"--model={cfg.model}")
    if cfg.quick:
        argv += list(spec.quick_args)
    return argv


def folder_bytes(folder: str | os.PathLike) -> tuple[int, int]:
    """(all bytes, weight-file bytes) of a saved artifact folder (weights: .safetensors/.bin/.pt files)."""
    total = weights = 0
    for p in Path(folder).rglob("*"):
        if p.is_file():
            total += p.stat().st_size
            if p.suffix in (".safetensors", ".bin", ".pt"):
                weights += p.stat().st_size
    return total, weights


def train_tokens_per_s(records: Sequence[Mapping[str, Any]]) -> float | None:
    """Median training tokens/s over the logged steps, leaving out step 1 (it includes XLA's compile)."""
    values = [r["tokens_per_s"] for r in records if "tokens_per_s" in r and r.get("step", 0) > 1]
    if not values:
        values = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    return float(statistics.median(values)) if values else None


def summarize_run(run_dir: str | os.PathLike, artifact_name: str) -> dict[str, Any]:
    """What the comparison reads from one run folder."""
    run_dir = Path(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    results = json.loads((run_dir / "results.json").read_text())
    total, weights = folder_bytes(run_dir / artifact_name)
    return {
        "run_dir": str(run_dir),
        "artifact": str(run_dir / artifact_name),
        "parameters": config["parameters"],
        "artifact_bytes": total,
        "artifact_weight_bytes": weights,
        "train_tokens_per_s": train_tokens_per_s(read_metrics(run_dir / "metrics.jsonl")),
        "before": results["before"],
        "after": results["after"],
        "samples_after": results.get("samples_after", []),
        "quantization": config.get("quantization"),
        "settings": config["settings"],
    }


def selection_key(run: Mapping[str, Any]) -> tuple[float, float]:
    """Higher is better: held-out exact match, then lower held-out loss."""
    after = run.get("after", {})
    loss = after.get("eval_loss", math.inf)
    return (after.get("eval_exact_match", -math.inf), -loss if math.isfinite(loss) else -math.inf)


def run_trainings(cfg: CompareConfig, *, on_event=None) -> dict[str, dict[str, Any]]:
    """Trains every method of `cfg` at every learning rate of its grid; returns {label: row}.

    A row holds the chosen (best) run's summary plus `peak_rss_bytes`, `wall_s`, `lr`, and `tried`
    (every learning rate with its metric); a method whose every run failed has `error` instead.
    `on_event(message)` hears about each run as it starts and ends.
    """
    out = Path(cfg.out)
    rows: dict[str, dict[str, Any]] = {}
    for label in cfg.methods:
        spec = SPECS[label]
        artifact_name = get_method(spec.method).artifact_name
        tried, best = [], None
        for lr in cfg.grid(label):
            run_dir = out / "runs" / f"{label}-lr{lr_text(lr)}"
            log_path = out / "logs" / f"{label}-lr{lr_text(lr)}.log"
            argv = run_argv(spec, cfg, lr, run_dir)
            if on_event:
                on_event(f"{label} at lr {lr_text(lr)}: {' '.join(argv[1:])}")
            child = run_child(argv, log_path=log_path)
            entry: dict[str, Any] = {"lr": lr, "returncode": child.returncode, "peak_rss_bytes": child.peak_rss_bytes,
                                     "launcher_peak_rss_bytes": child.launcher_peak_rss_bytes, "wall_s": child.wall_s,
                                     "log": str(log_path), "command": argv[1:]}
            if child.returncode == 0:
                try:
                    entry.update(summarize_run(run_dir, artifact_name))
                except (OSError, KeyError, ValueError) as e:  # a run folder missing a file or field
                    entry["error"] = f"the run exited 0 but its folder is incomplete: {type(e).__name__}: {e}"
                if not cfg.keep_checkpoints:
                    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
            else:
                entry["error"] = _tail(log_path)
            if on_event:
                metric = entry.get("after", {}).get("eval_exact_match")
                on_event(f"{label} at lr {lr_text(lr)}: rc {child.returncode}, {child.wall_s:.0f} s, peak RSS "
                         f"{child.peak_rss_bytes / 1e9:.2f} GB, exact match {metric}")
            tried.append(entry)
            if "error" not in entry and (best is None or selection_key(entry) > selection_key(best)):
                best = entry
        summary = [{"lr": t["lr"], "returncode": t["returncode"],
                    "eval_exact_match": t.get("after", {}).get("eval_exact_match"),
                    "eval_loss": t.get("after", {}).get("eval_loss")} for t in tried]
        if best is None:
            rows[label] = {"method": spec.method, "entry": spec.entry, "error": tried[-1]["error"],
                           "tried": summary, "log": tried[-1]["log"]}
        else:
            rows[label] = {**best, "method": spec.method, "entry": spec.entry, "tried": summary}
    return rows


def base_metrics(rows: Mapping[str, Mapping[str, Any]]) -> dict[str, Any] | None:
    """The base model's held-out metrics, measured once: the "before" of a run whose method equals the
    base at init on the unquantized base (full, LoRA, IA3 or adapters), or None when no such run ran."""
    for label in ("full", "lora", "ia3", "adapters"):
        row = rows.get(label)
        if row and "before" in row and get_method(SPECS[label].method).identity_at_init:
            return {"source": f"{label} run, before training", **row["before"]}
    return None


def _tail(path: Path, chars: int = 2000) -> str:
    try:
        return Path(path).read_text(errors="replace")[-chars:]
    except OSError as e:
        return f"(no log: {e})"


def lr_choice_text(cfg: CompareConfig) -> str:
    """The learning-rate choice, in words, for compare.md."""
    used = ", ".join(f"{m} {'/'.join(lr_text(lr) for lr in cfg.grid(m))}" for m in cfg.methods)
    overridden = [m for m, _ in cfg.lrs]
    if cfg.sweep:
        how = ("each method at both points of its grid (its entry point's default and 3x it); the row is the "
               "run with the better held-out exact match (ties: lower held-out loss), chosen on the same "
               "held-out examples the table reports, so the winner's score is slightly optimistic")
    else:
        how = ("one learning rate per method, its entry point's default (the rate each method's author chose "
               "for this task and budget; full fine-tuning uses transformers' 5e-5); no sweep, because "
               "sweeping every method does not fit the comparison's 60-minute CPU budget (pass --sweep to add "
               "3x each default and keep the better run)")
    extra = f"; set by --lrs for {', '.join(overridden)}" if overridden else ""
    return f"{how}{extra}. Learning rates used: {used}. AdamW, 10 warm-up steps, cosine decay, clip 1.0."


def prepare_out(cfg: CompareConfig) -> Path:
    """Refuses a non-empty --out unless overwrite (which empties it first)."""
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()):
        if not cfg.overwrite:
            raise ConfigError(f"{out} exists and is not empty; pass --overwrite to replace it or choose another "
                              "--out. Nothing was changed.")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def run_comparison(cfg: CompareConfig, *, command: str = "", on_event=None) -> dict[str, Any]:
    """Trains every method, times generation, and writes compare.{json,md,png} under `cfg.out`.

    Returns the summary (the content of compare.json)."""
    start = time.perf_counter()
    out = prepare_out(cfg)
    rows = run_trainings(cfg, on_event=on_event)
    variants = [speed.Variant(label=k, method=r["method"], artifact=r["artifact"],
                                      quantization=(r["settings"].get("base_loader") or {}).get("quantization")
                                      if SPECS[k].quantized_base else None)
                for k, r in rows.items() if "error" not in r]
    speed_cfg = speed.SpeedConfig(prompts=cfg.gen_prompts, new_tokens=cfg.gen_tokens, rounds=cfg.gen_rounds)
    gen_start = time.perf_counter()
    try:
        generation = speed.measure_generation(cfg.model, variants, cfg=speed_cfg, on_event=on_event)
    except Exception as e:  # noqa: BLE001  (keep the training results: the report says what failed)
        generation = {"error": f"{type(e).__name__}: {e}", "variants": {}}
    generation["wall_s"] = time.perf_counter() - gen_start
    for label, row in rows.items():
        row["mergeable"] = get_method(SPECS[label].method).mergeable
    summary = {
        "settings": {**dataclasses.asdict(cfg), "lrs": {m: list(cfg.grid(m)) for m in cfg.methods}},
        "command": command,
        "lr_choice": lr_choice_text(cfg),
        "methods": rows,
        "base": base_metrics(rows),
        "generation": generation,
        "adapter_size_7b": adapter_size_table(),
        "versions": library_versions(),
    }
    summary["wall_s"] = time.perf_counter() - start
    report.write_report(out, summary)
    return summary
