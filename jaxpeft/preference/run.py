"""One preference-tuning run, end to end: the library side of `python -m experiments.dpo`.

The run folder is the SFT run's (train/run_folder.py: config.json, adapter/ as a PEFT folder, metrics.jsonl
with TRL's metric names per step, tensorboard/, loss.png, checkpoints/, --resume); the Trainer is the SFT
Trainer with the preference step (step.py). Evaluated before and after: the held-out preference accuracy and
greedy generation scored against the chosen answer (exact match for builtin:dates-pref).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
from absl import logging

from jaxpeft.convert.default_model import DEFAULT_MODEL
from jaxpeft.core.errors import ConfigError
from jaxpeft.core.tree import flatten_params, unflatten_params
from jaxpeft.data import sources, tasks as sft_tasks
from jaxpeft.data.encode import pad_id_of
from jaxpeft.data.records import holdout_split
from jaxpeft.methods.base import Method
from jaxpeft.preference.data import PairBatcher, encode_pairs, is_conversational
from jaxpeft.preference.logps import REF_PREFIX
from jaxpeft.preference.step import PreferenceConfig, PreferenceEvaluator, preference_step_fn
from jaxpeft.preference.tasks import PREFERENCE_TASKS, load_preference_task
from jaxpeft.train import optim
from jaxpeft.train.evaluate import generation_eval
from jaxpeft.train.loop import TrainConfig, Trainer
from jaxpeft.train.run import load_base
from jaxpeft.train.run_config import RunConfig
from jaxpeft.train.run_folder import RunFolder, run_settings
from jaxpeft.train.run_guard import RunGuard
from jaxpeft.train.runners import run_mesh
from jaxpeft.train.sharding import resolve_parallel

DEFAULT_PREFERENCE_DATASET = "builtin:dates-pref"


def load_preference_records(cfg: RunConfig) -> tuple[list[dict], list[dict], Callable]:
    """(train records, held-out records, scorer) of `cfg.dataset`: a bundled task, or a local file / hub
    dataset in TRL's preference format with a held-out fraction (--eval_split, default 0.05)."""
    if cfg.dataset.startswith("builtin:"):
        name = cfg.dataset.split(":", 1)[1]
        if name not in PREFERENCE_TASKS:
            raise ConfigError(f"--dataset={cfg.dataset} is not a preference task; the bundled one is "
                              f"{DEFAULT_PREFERENCE_DATASET}")
        train, held = load_preference_task(name, seed=cfg.seed)
        return train, held, sft_tasks.get_task("dates").score
    records, source = sources.read(cfg.dataset, cfg.dataset_split, cfg.dataset_config)
    if cfg.eval_dataset:
        held, _ = sources.read(cfg.eval_dataset, "train")
        return list(records), list(held), sft_tasks.default_score
    fraction = float(cfg.eval_split) if cfg.eval_split is not None else 0.05
    train, held = holdout_split(list(records), fraction, cfg.seed)
    return train, held, sft_tasks.default_score


def _completion_text(value: Any) -> str:
    return value[-1]["content"] if isinstance(value, list) else str(value)


def run_preference(cfg: RunConfig, pref: PreferenceConfig, method: Method, method_config: Any, *,
                   base_loader: Callable | None = None) -> dict[str, Any]:
    """Trains `method`'s adapter on preference pairs with `pref`'s loss; returns results.json's dict."""
    with RunGuard(Path(cfg.out) / "checkpoints", total_steps=cfg.steps) as guard:
        return _run(cfg, pref, method, method_config, guard, base_loader)


def _run(cfg, pref, method, method_config, guard, base_loader) -> dict[str, Any]:
    if cfg.epochs is not None:
        raise ConfigError(f"--epochs={cfg.epochs}: preference runs count optimizer steps only; give --steps.")
    if cfg.pack:
        logging.info("preference pairs are never packed (one chosen and one rejected row each): pack has no effect")
    settings = {**run_settings(cfg, method, method_config, base_loader), "preference": dataclasses.asdict(pref)}
    folder = RunFolder(cfg, settings)
    parallel = resolve_parallel(cfg.mesh, cfg.parallel)
    mesh = run_mesh(parallel)
    model, params, tokenizer, base_info = load_base(cfg, base_loader, mesh)
    train_records, eval_records, score = load_preference_records(cfg)
    pairs = encode_pairs(tokenizer, train_records, seq_len=cfg.seq_len, max_prompt_len=pref.max_prompt_len,
                         name=cfg.dataset)
    eval_records = eval_records[: cfg.eval_examples]
    eval_pairs = encode_pairs(tokenizer, eval_records, seq_len=cfg.seq_len, max_prompt_len=pref.max_prompt_len,
                              name=f"{cfg.dataset} (held out)") if eval_records else []
    longest = max(len(p["prompt_ids"]) + max(len(p["chosen_ids"]), len(p["rejected_ids"])) for p in pairs + eval_pairs)
    seq_len = min(cfg.seq_len, -(-longest // 16) * 16)
    pad_id = pad_id_of(tokenizer)
    logging.info("preference data: %d train / %d held-out pairs, rows of %d tokens, loss %s beta %g",
                 len(pairs), len(eval_pairs), seq_len, pref.loss, pref.beta)

    if pref.init_adapter:
        model, params, method_config = method.load(pref.init_adapter, model, params)
        params = _with_frozen_reference(params, method, method_config)
    else:
        method_config = method.prepare(method_config, model_config=model.config, tokenizer=tokenizer)
        params = method.init(jax.random.PRNGKey(cfg.seed), params, method_config)
    labels = method.labels(params, method_config)
    counts = method.param_counts(params, method_config)
    folder.write_config(counts, seq_len, base_info)

    rows = 2 * (cfg.batch_size // cfg.grad_accum)
    per_row = max(max(len(p["chosen_ids"]), len(p["rejected_ids"])) for p in pairs)
    max_targets = max(8, -(-rows * min(per_row, seq_len - 1) // 8) * 8)
    train_model = model.clone(deterministic=False, **method.model_kwargs(method_config))
    optim_cfg = optim.OptimConfig(lr=cfg.lr, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps,
                                  weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm)
    train_cfg = TrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, seed=cfg.seed,
                            eval_every=cfg.eval_every, save_every=cfg.save_every, loss_chunk=cfg.loss_chunk)
    is_added = (lambda p: method.is_added(p, method_config))  # noqa: E731
    trainer = Trainer(model, params, labels, optim_cfg=optim_cfg, train_cfg=train_cfg, max_targets=max_targets,
                      parallel=parallel, mesh=mesh, log_metrics=pref.metric_names(), rows_per_example=2,
                      make_step=lambda tx: preference_step_fn(model, tx, pref, max_targets=max_targets,
                                                              is_added=is_added, train_model=train_model,
                                                              loss_chunk=cfg.loss_chunk))
    batcher = PairBatcher(pairs, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, seq_len=seq_len,
                          pad_id=pad_id, seed=cfg.seed)
    pref_eval = PreferenceEvaluator(model, eval_pairs, seq_len=seq_len, pad_id=pad_id)
    prompts = [(list(p["prompt_ids"]), _completion_text(r["chosen"])) for p, r in zip(eval_pairs, eval_records)]
    max_new = 24 if cfg.dataset.startswith("builtin:") else 128

    def evaluate(p) -> dict[str, float]:
        if not eval_pairs:
            return {}
        p = _without_reference(p)
        out = pref_eval(p)
        gen = generation_eval(model, p, tokenizer, prompts, score, max_new_tokens=max_new)
        out.update({f"eval_{k}": v for k, v in gen.items() if isinstance(v, float)})
        return out

    folder.open()
    before = folder.resume(trainer, batcher)
    if before is None:
        before = folder.start(evaluate(trainer.params()))
    trainer.fit(batcher, on_log=folder.log, progress=cfg.progress,
                on_eval=lambda step: folder.log({"step": step, **evaluate(trainer.params())}),
                on_save=lambda step: folder.save(step, trainer, batcher), should_stop=guard.should_stop)
    folder.save(trainer.step, trainer, batcher)
    guard.stop_after_final_save(trainer.step, folder.close)
    final = _without_reference(trainer.params())
    after = evaluate(final)
    folder.log({"step": trainer.step, **after})
    folder.close()
    method.save(folder.path / method.artifact_name, final, method_config, model_config=model.config,
                base_model_name_or_path=cfg.model or DEFAULT_MODEL, tokenizer=tokenizer, overwrite=True)
    results = {"before": before, "after": after, "steps": trainer.step, "parameters": counts,
               "preference": dataclasses.asdict(pref),
               "conversational": bool(train_records) and is_conversational(train_records[0])}
    folder.finish(results)
    return results


def _with_frozen_reference(params: Mapping, method: Method, config: Any) -> dict:
    """The loaded --init_adapter's trainable leaves get frozen `ref_*` siblings: the reference keeps them as
    loaded while the policy's copies train (TRL's `ref_adapter_name`). Only the adapter (small) is copied."""
    flat = dict(flatten_params(params))
    for path, leaf in list(flat.items()):
        if method.is_trainable(path, config) and method.is_added(path, config):
            flat[path[:-1] + (REF_PREFIX + path[-1],)] = jax.numpy.array(leaf, copy=True)
    return unflatten_params(flat)


def _without_reference(params: Mapping) -> dict:
    return unflatten_params({p: v for p, v in flatten_params(params).items() if not p[-1].startswith(REF_PREFIX)})
