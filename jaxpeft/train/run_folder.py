"""The run folder of `run_finetune` and its policy:

    config.json       every setting, library versions, the trainable-parameter summary
    <artifact>/       the adapter in its exchange format (PEFT for LoRA), or model/ for full fine-tuning
    metrics.jsonl     one object per logged step / evaluation (and tensorboard/)
    results.json      task metrics before and after training
    checkpoints/      orbax checkpoints of the train state and the data position
    loss.png, merged/ (with save_merged)

A non-empty folder is refused unless --overwrite (empty it) or --resume (continue it, refusing any
setting that changes the run's maths). With several processes (jax.distributed) every process checks the
folder, process 0 alone prepares it and writes the files above, and all of them write the checkpoints
(orbax's sharded save, committed by process 0).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
from absl import logging

from jaxpeft.core.atomic import atomic_file
from jaxpeft.core.errors import ConfigError
from jaxpeft.data.batching import Batcher
from jaxpeft.methods.base import Method
from jaxpeft.train.checkpoint import Checkpointer
from jaxpeft.train.loop import Trainer
from jaxpeft.train.metrics import MetricsWriter, plot_losses
from jaxpeft.train.run_config import RunConfig

# Settings whose change alters the maths of a run, so --resume refuses them (`steps` may grow).
# "preference": the loss, beta, smoothing, prompt budget and init adapter of experiments.dpo (absent for SFT).
MATHS_KEYS = ("model", "dataset", "eval_split", "eval_dataset", "dataset_split", "dataset_config",
              "dataset_text_field", "field_map", "train_on", "chat_template", "truncation", "batch_size", "grad_accum", "seq_len", "lr",
              "warmup_steps", "weight_decay", "max_grad_norm", "dtype", "seed", "pack", "method", "method_config", "preference",
              "base_loader")


def library_versions() -> dict[str, str]:
    out = {}
    for name in ("jaxpeft", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "datasets"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def run_settings(cfg: RunConfig, method: Method, method_config: Any, base_loader: Callable | None) -> dict[str, Any]:
    """Every setting of the run as config.json records it (and --resume compares it)."""
    settings = {**dataclasses.asdict(cfg), "method": method.name, "method_config": _jsonable(method_config)}
    if base_loader is not None:
        settings["base_loader"] = dict(getattr(base_loader, "settings", {}))
    return settings


def check_save_merged(cfg: RunConfig, method: Method) -> None:
    """Refuses --save_merged for a method with nothing to merge, before anything is loaded or written."""
    if not cfg.save_merged or method.mergeable:
        return
    if method.artifact_name == "model":
        raise ConfigError(f"--save_merged: {method.name} trains the weights themselves, so there is no "
                          "adapter to merge; the trained model is written to model/ anyway. Drop --save_merged.")
    raise ConfigError(f"--save_merged: {method.name} cannot be merged into the base weights (its adapter "
                      "changes the computation, not the weights); drop --save_merged and use the adapter "
                      f"folder {method.artifact_name}/ with the base model.")


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
        # A setting newer than the saved run (e.g. train_on) had its default value there.
        defaults = {f.name: f.default for f in dataclasses.fields(RunConfig)}
        saved = {k: saved.get(k, defaults.get(k)) for k in MATHS_KEYS} | saved
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
    _sync("jaxpeft:out_dir_checked")  # every process has looked before process 0 changes anything
    if is_primary():
        if busy and not cfg.resume:
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
    _sync("jaxpeft:out_dir_ready")
    return out


def is_primary() -> bool:
    """Whether this process writes the run's files (process 0; the only one without jax.distributed)."""
    return jax.process_index() == 0


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def write_json(path: Path, obj: Any) -> None:
    with atomic_file(path) as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)


class RunFolder:
    """One run's folder: prepared (and checked) on construction; metrics and checkpoints once `open`ed."""

    def __init__(self, cfg: RunConfig, settings: Mapping[str, Any]) -> None:
        self.cfg, self.settings = cfg, settings
        self.path = prepare_out_dir(cfg, settings)
        self.metrics: MetricsWriter | None = None
        self.ckpt: Checkpointer | None = None

    def write_config(self, parameters: Mapping[str, Any], effective_seq_len: int, base_info: Mapping) -> None:
        if is_primary():
                write_json(self.path / "config.json", {"settings": self.settings, "versions": library_versions(),
                                                   "parameters": parameters, "effective_seq_len": effective_seq_len,
                                                   **base_info})

    def open(self) -> None:
        """Starts metrics.jsonl (and TensorBoard; process 0 only) and the checkpoint manager."""
        self.metrics = MetricsWriter(self.path) if is_primary() else None
        self.ckpt = Checkpointer(self.path / "checkpoints", keep=self.cfg.keep_checkpoints)

    def resume(self, trainer: Trainer, batcher: Batcher) -> dict[str, float] | None:
        """With --resume and a checkpoint: restores the trainer and the data position, drops the metrics
        logged after it, and returns the "before" metrics of results.json. Otherwise None."""
        if not self.cfg.resume or self.ckpt.latest_step() is None:
            return None
        trainer.state, meta = self.ckpt.restore(trainer.state)
        batcher.restore(meta["data"])
        if self.metrics:
            self.metrics.truncate_after(trainer.step)
        logging.info("resumed from step %d", trainer.step)
        return json.loads((self.path / "results.json").read_text())["before"]

    def start(self, before: dict[str, float]) -> dict[str, float]:
        """Records the metrics before training (results.json, and step 0 of metrics.jsonl)."""
        if is_primary():
            write_json(self.path / "results.json", {"before": before})
        self.log({"step": 0, **before})
        return before

    def save(self, step: int, trainer: Trainer, batcher: Batcher) -> None:
        self.ckpt.save(step, trainer.state, {"data": batcher.state()})

    def log(self, record: Mapping[str, Any]) -> None:
        """Appends `record` to metrics.jsonl; a record with nothing but its step (an evaluation that is
        off, --eval_examples=0) is left out."""
        if self.metrics and set(record) - {"step"}:
            self.metrics.write(record)

    def close(self) -> None:
        if self.metrics:
            self.metrics.close()
        self.ckpt.close()

    def finish(self, results: Mapping[str, Any]) -> None:
        """The loss curve and results.json, at the end of a run."""
        if not is_primary():
            return
        plot_losses(self.path / "metrics.jsonl", self.path / "loss.png")
        if self.cfg.eval_examples == 0:
            results = {**results, "evaluation": "skipped: --eval_examples=0 (before and after are empty)"}
        write_json(self.path / "results.json", results)


def _jsonable(config: Any) -> Any:
    if dataclasses.is_dataclass(config):
        return json.loads(json.dumps(dataclasses.asdict(config), default=list))
    return config
