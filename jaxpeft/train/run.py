"""One fine-tuning run, end to end: the library side of `python -m experiments.lora` (and the other
method entry points). The pieces: the settings (`run_config`), the data (`run_data`), the run folder and
its policy (`run_folder`: config.json, results.json, metrics, checkpoints, resume checks), the held-out
evaluation (`evaluate.Evaluator`) and the Trainer (`loop`). `run_finetune` below only orders them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from absl import logging

from jaxpeft.convert.default_model import DEFAULT_MODEL
from jaxpeft.convert.load import from_pretrained
from jaxpeft.core.dtypes import tree_dtype_name
from jaxpeft.core.partition import count
from jaxpeft.core.tree import flatten_params
from jaxpeft.merge.unload import save_merged
from jaxpeft.methods.base import Method
from jaxpeft.models.remat import check_offload
from jaxpeft.train import optim
from jaxpeft.train.evaluate import Evaluator, scalars
from jaxpeft.train.loop import TrainConfig, Trainer, micro_batch_targets
from jaxpeft.train.run_config import RunConfig
from jaxpeft.train.run_data import RunData, prepare_data
from jaxpeft.train.run_folder import RunFolder, check_save_merged, run_settings
from jaxpeft.train.run_guard import RunGuard
from jaxpeft.train.runners import release_freed_memory, run_mesh
from jaxpeft.train.sharding import MeshPlacement, resolve_parallel

__all__ = ["RunConfig", "run_finetune"]


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
    recorded (and checked by --resume) and `info` goes into config.json. `callbacks["on_log"](record)`
    hears every logged step.

    SIGTERM or SIGINT stops the run after the current step with its checkpoint saved (`RunStopped`); a
    write that finds no room raises one `WriteFailedError` naming the newest intact checkpoint
    (train/run_guard.py).
    """
    with RunGuard(Path(cfg.out) / "checkpoints", total_steps=cfg.steps) as guard:
        return _run_finetune(cfg, method, method_config, guard, callbacks=callbacks, base_loader=base_loader)


def _run_finetune(cfg: RunConfig, method: Method, method_config: Any, guard: RunGuard, *,
                  callbacks: Mapping[str, Callable] | None, base_loader: Callable | None) -> dict[str, Any]:
    check_save_merged(cfg, method)
    folder = RunFolder(cfg, run_settings(cfg, method, method_config, base_loader))
    parallel = resolve_parallel(cfg.mesh, cfg.parallel)
    mesh = run_mesh(parallel)
    model, params, tokenizer, base_info = load_base(cfg, base_loader, mesh)
    data = prepare_data(cfg, tokenizer)
    guard.total_steps = data.steps  # --epochs: the steps counted from the data
    method_config = method.prepare(method_config, model_config=model.config, tokenizer=tokenizer)
    params = method.init(jax.random.PRNGKey(cfg.seed), params, method_config)
    counts = method.param_counts(params, method_config)
    logging.info("%s: %s trainable parameters (%.4f %% of the %s base parameters)", method.name,
                 f"{counts['trainable']:,}", counts["trainable_percent"], f"{counts['base']:,}")
    base_info = {**base_info, "plan": _plan(cfg, method, method_config, model, params, data, callbacks)}
    folder.write_config(counts, data.seq_len, base_info)
    trainer = _trainer(cfg, model, params, method, method_config, data, parallel, mesh)
    evaluate = Evaluator(model, tokenizer, data)
    folder.open()
    before = folder.resume(trainer, data.batcher)
    if before is None:
        # The trainer's tree, placed on the mesh as every later evaluation's is: the evaluation compiles once.
        before = folder.start(scalars(evaluate(trainer.params())))

    def on_log(record: dict) -> None:
        folder.log(record)
        if callbacks and "on_log" in callbacks:
            callbacks["on_log"](record)

    trainer.fit(iter(data.batcher), on_log=on_log, progress=cfg.progress,
                on_eval=lambda step: folder.log({"step": step, **scalars(evaluate(trainer.params()))}),
                on_save=lambda step: folder.save(step, trainer, data.batcher), should_stop=guard.should_stop)
    folder.save(trainer.step, trainer, data.batcher)
    guard.stop_after_final_save(trainer.step, folder.close)
    final = trainer.params()
    after_full = evaluate(final)
    after = scalars(after_full)
    folder.log({"step": trainer.step, **after})
    folder.close()
    method.save(folder.path / method.artifact_name, final, method_config, model_config=model.config,
                base_model_name_or_path=cfg.model or DEFAULT_MODEL, tokenizer=tokenizer, overwrite=True)
    if cfg.save_merged:
        # Module by module: each merged in fp32 (a 4-bit kernel dequantized), cast to merged_dtype, written.
        save_merged(folder.path / "merged", final, method, method_config, model.config, tokenizer=tokenizer,
                    dtype=cfg.merged_dtype, overwrite=True)
    results = {"before": before, "after": after, "steps": trainer.step, "parameters": counts,
               "samples_after": after_full.get("eval_samples", [])}
    folder.finish(results)
    return results


def load_base(cfg: RunConfig, base_loader: Callable | None, mesh: Any) -> tuple[Any, dict, Any, dict]:
    """(model, params, tokenizer, info for config.json) from `from_pretrained` or the run's base loader,
    each weight read once and put straight onto its place on `mesh`."""
    load = from_pretrained if base_loader is None else base_loader
    if cfg.remat_offload:
        check_offload()
    remat = "offload" if cfg.remat_offload else cfg.remat
    out = load(cfg.model, dtype=cfg.dtype, param_dtype=cfg.param_dtype, remat=remat,
               placement=MeshPlacement(mesh), progress=cfg.progress)
    model, params, tokenizer, info = out if base_loader is not None else (*out, {})
    if hasattr(model, "attention"):  # every CausalLM family; a custom base loader may bring another module
        model = model.clone(attention=cfg.attention, attention_block=cfg.attention_block)
    release_freed_memory()  # e.g. the host copies the loader dropped
    info = {**info, "base": base_summary(params, model)}
    b = info["base"]
    logging.info("base: %s weights held as %s, computing in %s: %.2f GB resident (dense %.2f GB, 4-bit %.2f GB)",
                 f"{b['parameters']:,}", b["param_dtype"], b["compute_dtype"], b["resident_bytes"] / 1e9,
                 b["dense_bytes"] / 1e9, b["quantized_bytes"] / 1e9)
    return model, params, tokenizer, info


def base_summary(params: Mapping, model: Any) -> dict[str, Any]:
    """What the loaded base holds: its parameter count, dtypes and resident bytes (dense and 4-bit parts)."""
    flat = flatten_params(params)
    quantized = sum(v.nbytes for p, v in flat.items() if p[-1] == "qkernel")
    dense = sum(int(v.nbytes) for p, v in flat.items() if p[-1] != "qkernel")
    return {"parameters": count(params), "param_dtype": tree_dtype_name(params),
            "compute_dtype": jnp.dtype(model.dtype).name, "resident_bytes": dense + quantized,
            "dense_bytes": dense, "quantized_bytes": quantized}


def _plan(cfg: RunConfig, method: Method, method_config: Any, model: Any, params: Mapping, data: RunData,
          callbacks: Mapping[str, Callable] | None) -> dict | None:
    """The planner's figure for this run (callbacks["plan"], e.g. `jaxpeft.plan.runs.plan_run`), logged."""
    if not callbacks or "plan" not in callbacks:
        return None
    rows = cfg.batch_size // cfg.grad_accum
    plan = callbacks["plan"](cfg=cfg, method=method, method_config=method_config, model=model, params=params,
                             seq_len=data.seq_len, max_targets=micro_batch_targets(data.encoded, rows, data.seq_len,
                                                                                    cfg.pack))
    if plan is None:
        logging.info("memory plan: the planner does not model this run's method (%s)", method.name)
    else:
        logging.info("memory plan (%s, %d x %d tokens): the step needs %.2f GB (static %.2f GB); the process adds "
                     "its baseline", plan["method"], plan["batch_size"], plan["seq_len"], plan["peak_bytes"] / 1e9,
                     plan["static_bytes"] / 1e9)
    return plan


def _trainer(cfg: RunConfig, model: Any, params: dict, method: Method, method_config: Any, data: RunData,
             parallel: Any, mesh: Any) -> Trainer:
    """The Trainer of the run: its optimizer, step budget, target bound and devices."""
    rows = cfg.batch_size // cfg.grad_accum
    optim_cfg = optim.OptimConfig(lr=cfg.lr, warmup_steps=cfg.warmup_steps, total_steps=data.steps,
                                  weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm)
    train_cfg = TrainConfig(steps=data.steps, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, seed=cfg.seed,
                            eval_every=cfg.eval_every, save_every=cfg.save_every, loss_chunk=cfg.loss_chunk)
    return Trainer(model, params, method.labels(params, method_config), optim_cfg=optim_cfg, train_cfg=train_cfg,
                   max_targets=micro_batch_targets(data.encoded, rows, data.seq_len, cfg.pack),
                   train_model=model.clone(deterministic=False, **method.model_kwargs(method_config)),
                   parallel=parallel, mesh=mesh)
