"""The training loop: steps over the trainable partition on a runner, logging, evaluation and saving hooks."""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Iterator, Mapping

import numpy as np
from absl import logging

from jaxpeft.core.errors import JaxPeftError
from jaxpeft.core.partition import combine, split_trainable
from jaxpeft.train import optim, step as step_lib
from jaxpeft.train.chunked_loss import check_loss_chunk
from jaxpeft.train.runners import make_runner
from jaxpeft.train.sharding import ParallelConfig


class NonFiniteLossError(JaxPeftError, FloatingPointError):
    """The loss became NaN or infinite; the run stopped without saving the bad state."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    steps: int = 100
    batch_size: int = 8  # sequences per optimizer step (split into grad_accum micro-batches)
    grad_accum: int = 1
    seed: int = 0
    log_every: int = 1
    eval_every: int = 0  # 0: no periodic evaluation
    save_every: int = 0  # 0: save only at the end
    loss_chunk: int | None = None  # targets per chunk of the head + loss (train/chunked_loss.py); None auto, 0 off

    def __post_init__(self) -> None:
        check_loss_chunk(self.loss_chunk)
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("steps, batch_size and grad_accum must be positive")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")


class Trainer:
    """Holds the frozen base, the train state, and the step, all on a runner (train/runners.py)."""

    def __init__(self, model: Any, params: Mapping, labels: Mapping, *, optim_cfg: optim.OptimConfig,
                 train_cfg: TrainConfig, max_targets: int, train_model: Any | None = None,
                 parallel: ParallelConfig | None = None, mesh: Any = None, make_step: Callable | None = None,
                 log_metrics: tuple[str, ...] = (), rows_per_example: int = 1) -> None:
        """`parallel`: a `sharding.ParallelConfig` (a mesh, or pmap: every device on data); None runs on the
        default device (a mesh of one). `make_step(tx)` returns a step replacing the causal-LM one (same
        signature, e.g. jaxpeft/preference/step.py's); `log_metrics` name its extra metrics, logged per step;
        `rows_per_example` is the rows each of batch_size's examples fills (a preference pair: 2)."""
        self.model, self.cfg = model, train_cfg
        trainable, frozen = split_trainable(params, labels)
        self.tx = optim.adamw(optim_cfg)
        self.schedule = optim.schedule(optim_cfg)
        if make_step is None:
            step_fn = step_lib.train_step_fn(model, self.tx, max_targets=max_targets, train_model=train_model,
                                             loss_chunk=train_cfg.loss_chunk)
        else:
            step_fn = make_step(self.tx)
        self.log_metrics = tuple(log_metrics)
        micro_rows = rows_per_example * train_cfg.batch_size // train_cfg.grad_accum
        self._runner = make_runner(parallel, model_config=getattr(model, "config", None), micro_rows=micro_rows,
                                   step_fn=step_fn,
                                   tx=self.tx, trainable=trainable, frozen=frozen, seed=train_cfg.seed,
                                   mesh=mesh)
        self.frozen, self._state = self._runner.frozen, self._runner.initial_state
        self.max_targets = max_targets

    @property
    def state(self) -> dict:
        """The train state (global arrays on the runner's mesh; checkpoints hold this form)."""
        return self._state

    @state.setter
    def state(self, value: dict) -> None:
        self._state = self._runner.import_state(value)

    @property
    def step(self) -> int:
        return int(np.asarray(self._state["step"]).reshape(-1)[0])

    def params(self) -> dict:
        """The full parameter tree (frozen base + current trainable leaves)."""
        return combine(self.frozen, self._state["params"])

    def compiled_step(self, batch: Mapping[str, np.ndarray]) -> Any:
        """The step compiled for `batch`'s shape, not run: `.memory_analysis()` says what a step will need
        (bench/long_context.py compiles first and only runs what fits). The next train_step reuses it."""
        return self._runner.compile(self._state, self.frozen, self._micro(batch))

    def _micro(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        a = self.cfg.grad_accum
        return {k: v.reshape(a, v.shape[0] // a, *v.shape[1:]) for k, v in batch.items()}

    def train_step(self, batch: Mapping[str, np.ndarray]) -> dict[str, float]:
        a = self.cfg.grad_accum
        micro = self._micro(batch)
        targets = micro["loss_mask"][:, :, 1:].reshape(a, -1).sum(axis=1).max()
        if targets > self.max_targets:
            raise ValueError(f"a micro-batch has {targets} target tokens but max_targets is {self.max_targets}")
        self._state, metrics = self._runner.step(self._state, self.frozen, micro)
        return {k: float(v) for k, v in metrics.items()}

    def fit(
        self,
        batches: Iterator[Mapping[str, np.ndarray]],
        *,
        on_log: Callable[[dict], None] | None = None,
        on_eval: Callable[[int], dict] | None = None,
        on_save: Callable[[int], None] | None = None,
        should_stop: Callable[[int], bool] | None = None,
        progress: bool = True,
    ) -> list[dict]:
        """Runs until `steps`, or until `should_stop(step)` (asked after every step, once it is logged) says
        True; returns the logged records. Raises NonFiniteLossError on NaN/inf."""
        from tqdm.auto import tqdm

        cfg, logs = self.cfg, []
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not progress, desc="train", dynamic_ncols=True)
        window_tokens, window_start = 0.0, time.perf_counter()
        while self.step < cfg.steps:
            batch = next(batches)
            step_now = self.step + 1
            metrics = self.train_step(batch)
            if not math.isfinite(metrics["loss"]) or not metrics["finite"]:
                bar.close()
                what = f"the loss became {metrics['loss']}" if not math.isfinite(metrics["loss"]) else \
                    "the update made the trainable weights non-finite"
                raise NonFiniteLossError(
                    f"{what} at step {step_now}; the run stopped and the last good checkpoint is kept. "
                    "Lower --lr, set --max_grad_norm, or use --dtype=float32.")
            window_tokens += float(batch["attention_mask"].sum())
            bar.update(1)
            if step_now % cfg.log_every == 0 or step_now == cfg.steps:
                elapsed = time.perf_counter() - window_start
                record = {"step": step_now, "loss": metrics["loss"], "grad_norm": metrics["grad_norm"],
                          "lr": float(self.schedule(step_now - 1)), "tokens_per_s": window_tokens / max(elapsed, 1e-9),
                          **{k: metrics[k] for k in self.log_metrics}}
                window_tokens, window_start = 0.0, time.perf_counter()
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
                logs.append(record)
                if on_log:
                    on_log(record)
            if should_stop and should_stop(step_now):
                bar.close()
                logging.info("stopping after step %d of %d", step_now, cfg.steps)
                return logs
            if on_eval and cfg.eval_every and step_now % cfg.eval_every == 0 and step_now < cfg.steps:
                on_eval(step_now)
                window_start = time.perf_counter()
            if on_save and cfg.save_every and step_now % cfg.save_every == 0 and step_now < cfg.steps:
                on_save(step_now)
                window_start = time.perf_counter()
        bar.close()
        logging.info("training finished at step %d", self.step)
        return logs


def micro_batch_targets(encoded: list[Mapping[str, Any]], rows: int, seq_len: int, packed: bool) -> int:
    """A static bound on target tokens per micro-batch of `rows` rows (rounded up to a multiple of 8).

    A row holds one example, or with packing at most seq_len // (shortest example) of them."""
    if not encoded:
        return max(8, -(-rows * (seq_len - 1) // 8) * 8)
    per_example = max(int(np.sum(np.asarray(e["loss_mask"]))) for e in encoded)
    per_row = per_example * (seq_len // max(min(len(e["input_ids"]) for e in encoded), 1) if packed else 1)
    bound = rows * min(per_row, seq_len - 1)
    return max(8, -(-bound // 8) * 8)

