"""One fine-tuning run, end to end: the library side of `python -m experiments.lora` (and the other
method entry points). It owns the run folder:

    config.json       every setting, library versions, the trainable-parameter summary
    adapter/          the adapter in its exchange format (PEFT for LoRA)
    metrics.jsonl     one object per logged step / evaluation
    results.json      task metrics before and after training
    loss.png, tensorboard/, checkpoints/, merged/ (with save_merged)
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from absl import logging

from jaxpeft.core.atomic import atomic_file
from jaxpeft.core.errors import ConfigError
from jaxpeft.methods.base import Method

DEFAULT_DATASET = "builtin:dates"
# Settings whose change alters the maths of a run, so --resume refuses them (`steps` may grow).
MATHS_KEYS = ("model", "dataset", "eval_split", "eval_dataset", "batch_size", "grad_accum", "seq_len", "lr",
              "warmup_steps", "weight_decay", "max_grad_norm", "dtype", "seed", "pack", "method", "method_config",
              "base_loader")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    out: str
    model: str | None = None
    dataset: str = DEFAULT_DATASET
    eval_split: float | str | None = None
    eval_dataset: str | None = None
    steps: int = 200
    batch_size: int = 8
    grad_accum: int = 1
    seq_len: int = 128
    pack: bool = False
    lr: float = 2e-4
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    dtype: str = "float32"
    remat: bool = False
    seed: int = 0
    eval_every: int = 0
    save_every: int = 0
    keep_checkpoints: int = 2
    eval_examples: int = 100  # held-out examples evaluated (loss and generation)
    resume: bool = False
    overwrite: bool = False
    save_merged: bool = False
    merged_dtype: str = "float32"
    progress: bool = True
    mesh: str | None = None  # "data:2,fsdp:2,tensor:2"; None: every device on data (train/sharding.py)
    parallel: str = "jit"  # "jit" (the mesh) or "pmap"


def library_versions() -> dict[str, str]:
    out = {}
    for name in ("jaxpeft", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "datasets"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def prepare_out_dir(cfg: RunConfig, settings: Mapping[str, Any]) -> Path:
    """Refuses a non-empty folder unless --overwrite (empty it) or --resume (check the maths is unchanged)."""
    out = Path(cfg.out)
    if cfg.resume and cfg.overwrite:
        raise ConfigError("--resume and --overwrite contradict each other: --resume continues the run in "
                          f"{out}, --overwrite deletes it. Pass one of them.")
    busy = out.exists() and any(out.iterdir())
    if cfg.resume:
        if not (out / "config.json").exists():
            raise ConfigError(f"--resume needs a run folder with config.json; {out} has none. Drop --resume.")
        saved = json.loads((out / "config.json").read_text())["settings"]
        changed = [f"{k}: {saved.get(k)!r} -> {settings.get(k)!r}" for k in MATHS_KEYS if saved.get(k) != settings.get(k)]
        if changed:
            raise ConfigError("--resume refuses settings that change the run's maths:\n"
                              + "\n".join(f"  - {c}" for c in changed)
                              + "\nUse the original values (only --steps may grow), or start a new --out.")
        if settings["steps"] < saved["steps"]:
            logging.warning("--steps shrank from %d to %d", saved["steps"], settings["steps"])
    elif busy and not cfg.overwrite:
        raise ConfigError(f"{out} exists and is not empty; pass --overwrite to replace it, --resume to continue "
                          "it, or choose another --out. Nothing was changed.")
    elif busy:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_json(path: Path, obj: Any) -> None:
    with atomic_file(path) as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)


def run_finetune(
    cfg: RunConfig,
    method: Method,
    method_config: Any,
    *,
    callbacks: Mapping[str, Callable] | None = None,
    base_loader: Callable[..., tuple[Any, dict, Any, dict]] | None = None,
) -> dict[str, Any]:
    """Trains `method` on the configured model and data; returns the results dict (also results.json).

    `base_loader` replaces `from_pretrained` (QLoRA: `jaxpeft.convert.bnb.QuantizedBaseLoader`): called as
    `base_loader(cfg.model, dtype=, remat=)` -> (model, params, tokenizer, info); its `settings` dict is
    recorded (and checked by --resume) and `info` goes into config.json.
    """
    import jaxpeft
    from jaxpeft.convert.default_model import DEFAULT_MODEL
    from jaxpeft.train import data as data_lib
    from jaxpeft.train import optim, tasks
    from jaxpeft.train.checkpoint import Checkpointer
    from jaxpeft.train.evaluate import eval_loss, generation_eval
    from jaxpeft.train.loop import TrainConfig, Trainer, micro_batch_targets, release_freed_memory
    from jaxpeft.train.metrics import MetricsWriter, plot_losses
    from jaxpeft.train.step import make_eval_step

    callbacks = dict(callbacks or {})
    if cfg.save_merged and not method.mergeable:
        if method.artifact_name == "model":
            raise ConfigError(f"--save_merged: {method.name} trains the weights themselves, so there is no "
                              "adapter to merge; the trained model is written to model/ anyway. Drop --save_merged.")
        raise ConfigError(f"--save_merged: {method.name} cannot be merged into the base weights (its adapter "
                          "changes the computation, not the weights); drop --save_merged and use the adapter "
                          f"folder {method.artifact_name}/ with the base model.")
    settings = {**dataclasses.asdict(cfg), "method": method.name, "method_config": _jsonable(method_config)}
    if base_loader is not None:
        settings["base_loader"] = dict(getattr(base_loader, "settings", {}))
    out = prepare_out_dir(cfg, settings)
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[cfg.dtype]
    if base_loader is None:
        model, params, tokenizer = jaxpeft.from_pretrained(cfg.model, dtype=dtype, remat=cfg.remat)
        base_info: dict[str, Any] = {}
    else:
        model, params, tokenizer, base_info = base_loader(cfg.model, dtype=dtype, remat=cfg.remat)
    release_freed_memory()  # e.g. the fp32 weights a quantizing loader dropped

    # Data: the builtin task carries its own held-out split and scorer; files get a held-out fraction.
    task = tasks.get_task(cfg.dataset.split(":", 1)[1]) if cfg.dataset.startswith("builtin:") else None
    eval_split = cfg.eval_split if (cfg.eval_split is not None or task or cfg.eval_dataset) else 0.05
    train_records, eval_records = data_lib.load_records(cfg.dataset, eval_split=eval_split,
                                                        eval_dataset=cfg.eval_dataset, seed=cfg.seed)
    encoded, stats = data_lib.encode_records(tokenizer, train_records, seq_len=cfg.seq_len)
    # The held-out loss and the generation metrics use the same first `eval_examples` records.
    eval_records = eval_records[: cfg.eval_examples]
    eval_encoded, _ = data_lib.encode_records(tokenizer, eval_records, seq_len=cfg.seq_len)
    # Static shapes: pad to the longest example (rounded to 16) when that is shorter than seq_len.
    seq_len = cfg.seq_len if cfg.pack else min(cfg.seq_len, -(-stats.max_len // 16) * 16)
    pad_id = data_lib.pad_id_of(tokenizer)
    batcher = data_lib.Batcher(encoded, batch_size=cfg.batch_size, seq_len=seq_len, pad_id=pad_id,
                               seed=cfg.seed, pack=cfg.pack)
    logging.info("data: %d train / %d eval records, %d truncated, longest %d tokens, batches %d x %d",
                 len(encoded), len(eval_encoded), stats.num_truncated, stats.max_len, cfg.batch_size, seq_len)

    method_config = method.prepare(method_config, model_config=model.config, tokenizer=tokenizer)
    params = method.init(jax.random.PRNGKey(cfg.seed), params, method_config)
    counts = method.param_counts(params, method_config)
    logging.info("%s: %s trainable parameters (%.4f %% of the %s base parameters)", method.name,
                 f"{counts['trainable']:,}", counts["trainable_percent"], f"{counts['base']:,}")
    write_json(out / "config.json", {"settings": settings, "versions": library_versions(), "parameters": counts,
                                     "effective_seq_len": seq_len, **base_info})

    rows = cfg.batch_size // cfg.grad_accum
    max_targets = micro_batch_targets(encoded, rows, seq_len, cfg.pack)
    optim_cfg = optim.OptimConfig(lr=cfg.lr, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps,
                                  weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm)
    train_cfg = TrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, seed=cfg.seed,
                            eval_every=cfg.eval_every, save_every=cfg.save_every)
    train_model = model.clone(deterministic=False, **method.model_kwargs(method_config))
    from jaxpeft.train.sharding import resolve_parallel

    trainer = Trainer(model, params, method.labels(params, method_config), optim_cfg=optim_cfg,
                      train_cfg=train_cfg, max_targets=max_targets, train_model=train_model,
                      parallel=resolve_parallel(cfg.mesh, cfg.parallel))
    eval_rows = max(1, min(32, len(eval_encoded)))
    eval_step = make_eval_step(model, max_targets=micro_batch_targets(eval_encoded, eval_rows, seq_len, False))
    eval_prompts = data_lib.eval_prompts(tokenizer, eval_records)
    score = task.score if task else tasks.default_score
    max_new = task.max_new_tokens if task else 128

    def evaluate(p: Mapping) -> dict[str, Any]:
        start = time.perf_counter()
        result = eval_loss(eval_step, p, ordered_batches(eval_encoded, eval_rows, seq_len, pad_id))
        mid = time.perf_counter()
        result.update({f"eval_{k}": v for k, v in generation_eval(
            model, p, tokenizer, eval_prompts, score, max_new_tokens=max_new).items()})
        logging.info("evaluation: loss %.1f s, generation on %d examples %.1f s", mid - start, len(eval_prompts),
                     time.perf_counter() - mid)
        return result

    metrics = MetricsWriter(out)
    ckpt = Checkpointer(out / "checkpoints", keep=cfg.keep_checkpoints)
    results_path = out / "results.json"
    if cfg.resume and ckpt.latest_step() is not None:
        trainer.state, meta = ckpt.restore(trainer.state)
        batcher.restore(meta["data"])
        metrics.truncate_after(trainer.step)
        before = json.loads(results_path.read_text())["before"]
        logging.info("resumed from step %d", trainer.step)
    else:
        before = _scalars(evaluate(params))
        write_json(results_path, {"before": before})
        metrics.write({"step": 0, **before})

    def save(step: int) -> None:
        ckpt.save(step, trainer.state, {"data": batcher.state()})

    def on_eval(step: int) -> None:
        metrics.write({"step": step, **_scalars(evaluate(trainer.params()))})

    def on_log(record: dict) -> None:
        metrics.write(record)
        if "on_log" in callbacks:
            callbacks["on_log"](record)

    trainer.fit(iter(batcher), on_log=on_log, on_eval=on_eval, on_save=save, progress=cfg.progress)
    save(trainer.step)
    final = trainer.params()
    after_full = evaluate(final)
    after = _scalars(after_full)
    metrics.write({"step": trainer.step, **after})
    metrics.close()
    ckpt.close()
    base_name = cfg.model or DEFAULT_MODEL
    method.save(out / method.artifact_name, final, method_config, model_config=model.config,
                base_model_name_or_path=base_name, tokenizer=tokenizer, overwrite=True)
    if cfg.save_merged:
        from jaxpeft.quant import dequantize_params

        # A quantized base (QLoRA) is written dequantized, in fp32 before the cast to merged_dtype.
        merged = dequantize_params(method.merge(final, method_config), jnp.float32)
        jaxpeft.save_hf_folder(out / "merged", merged, model.config, tokenizer=tokenizer, dtype=cfg.merged_dtype,
                               overwrite=True)
    plot_losses(out / "metrics.jsonl", out / "loss.png")
    results = {"before": before, "after": after, "steps": trainer.step, "parameters": counts,
               "samples_after": after_full.get("eval_samples", [])}
    write_json(results_path, results)
    return results


def ordered_batches(encoded: list[Mapping[str, Any]], rows: int, seq_len: int, pad_id: int):
    """One pass over `encoded` in order, in fixed-shape batches (the last one padded with empty rows)."""
    import numpy as np

    for start in range(0, len(encoded), rows):
        ids = np.full((rows, seq_len), pad_id, np.int32)
        loss_mask = np.zeros((rows, seq_len), np.int32)
        attention = np.zeros((rows, seq_len), np.int32)
        for i, example in enumerate(encoded[start:start + rows]):
            n = min(len(example["input_ids"]), seq_len)
            ids[i, :n] = example["input_ids"][:n]
            loss_mask[i, :n] = example["loss_mask"][:n]
            attention[i, :n] = 1
        yield {"input_ids": ids, "loss_mask": loss_mask, "attention_mask": attention}


def _scalars(d: Mapping[str, Any]) -> dict[str, float]:
    return {k: v for k, v in d.items() if isinstance(v, (int, float))}


def _jsonable(config: Any) -> Any:
    if dataclasses.is_dataclass(config):
        return json.loads(json.dumps(dataclasses.asdict(config), default=list))
    return config
