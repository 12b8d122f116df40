"""Cross-check of a plan: XLA's compiled memory analysis of the real train step on abstract inputs.

Nothing is materialised: the parameters come from `jax.eval_shape` of the model's init (then of
`quantize_params` and the method's init), the train state from `eval_shape` of `init_state`, and
`make_train_step(...).lower(...).compile().memory_analysis()` reports the step's argument, output,
aliased (donated) and temporary bytes. What the step needs at its peak is
`argument + output - alias + temp`; the plan's `static` should equal `argument` to the byte.

On the CPU two backend habits decide the temp bytes, so read them with care:
- XLA's CPU backend runs bf16 dots in fp32 and keeps fp32 copies of the weights, so only fp32 plans
  compare (a GPU computes in bf16);
- its default scheduler (concurrency-optimised) starts recomputations (remat) and the backward's
  dequantizations early, next to the forward; `--xla_cpu_enable_concurrency_optimized_scheduler=false`
  (`MEMORY_SCHEDULER_FLAG`, set before JAX starts its backend) picks the memory-minimising one;
- even that scheduler, with remat, keeps about ten hidden-sized tensors a layer (the rebuilt normed x,
  attention output and rope cotangents of every layer, apparently for LoRA's weight gradients, which it
  runs late) where the plan keeps one: measured 84 MB a layer against the plan's 8.4 MB on 7B widths,
  fp32, 1 x 512. Few-layer cross-checks agree; a full-depth remat step on the CPU holds more.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import jax.numpy as jnp

from jaxpeft.core.errors import ConfigError
from jaxpeft.core.partition import split_trainable
from jaxpeft.methods import get_method
from jaxpeft.methods.full import FullConfig
from jaxpeft.methods.lora import LoraConfig
from jaxpeft.models.config import LlamaConfig
from jaxpeft.models.families import build_model
from jaxpeft.plan.analytic import MemoryPlan, PlanConfig, plan_memory
from jaxpeft.quant import quantize_params
from jaxpeft.train import optim
from jaxpeft.train.step import init_state, make_train_step

MEMORY_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


@dataclasses.dataclass(frozen=True)
class CompiledMemory:
    """XLA's memory analysis of the compiled train step, in bytes."""

    argument: int
    output: int
    alias: int
    temp: int
    backend: str
    compile_seconds: float
    memory_scheduler: bool  # the CPU's memory-minimising scheduler was on

    @property
    def dynamic(self) -> int:
        """Bytes beyond the arguments: temporaries and outputs that do not reuse a donated argument."""
        return self.temp + self.output - self.alias

    @property
    def total(self) -> int:
        return self.argument + self.dynamic


@dataclasses.dataclass(frozen=True)
class CrossCheck:
    plan: MemoryPlan
    measured: CompiledMemory

    @property
    def peak_ratio(self) -> float:
        """planned peak / compiled peak."""
        return self.plan.peak / self.measured.total

    @property
    def dynamic_ratio(self) -> float:
        """planned activations, gradients and transients / compiled temporaries."""
        return self.plan.peak_phase.nbytes / max(self.measured.dynamic, 1)


def memory_scheduler_active() -> bool:
    return MEMORY_SCHEDULER_FLAG in os.environ.get("XLA_FLAGS", "")


def use_memory_scheduler() -> None:
    """Adds `MEMORY_SCHEDULER_FLAG` to XLA_FLAGS; effective only before JAX initialises its backend."""
    if not memory_scheduler_active():
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + MEMORY_SCHEDULER_FLAG).strip()


def _method(plan: PlanConfig) -> tuple[Any, Any]:
    if plan.method == "full":
        return get_method("full"), FullConfig()
    return get_method("lora"), LoraConfig(r=plan.rank, lora_alpha=2.0 * plan.rank, target_modules=plan.targets)


def abstract_train_step(config: LlamaConfig, plan: PlanConfig) -> tuple[Any, tuple[Any, Any, Any]]:
    """(jitted train step, (state, frozen, batch) as ShapeDtypeStructs) exactly as `Trainer` builds them."""
    method, method_config = _method(plan)
    model = build_model(config, dtype=jnp.dtype(plan.dtype), param_dtype=jnp.dtype(plan.param_dtype),
                             remat=plan.remat)
    key = jax.random.PRNGKey(0)
    params = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 2), jnp.int32))["params"], key)
    if plan.method == "qlora":
        params = jax.eval_shape(lambda p: quantize_params(p, targets="all-linear", quant_type="nf4",
                                                          blocksize=plan.quant_blocksize,
                                                          double_quant=plan.double_quant), params)
    params = jax.eval_shape(lambda p: method.init(key, p, method_config), params)
    trainable, frozen = split_trainable(params, method.labels(params, method_config))
    tx = optim.adamw(optim.OptimConfig())
    state = jax.eval_shape(lambda t: init_state(t, tx, 0), trainable)
    shape = (1, plan.batch_size, plan.seq_len)
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32) for k in ("input_ids", "attention_mask", "loss_mask")}
    train_model = model.clone(deterministic=False, **method.model_kwargs(method_config))
    step = make_train_step(model, tx, max_targets=plan.targets_k, train_model=train_model, loss_chunk=plan.loss_chunk)
    return step, (state, frozen, batch)


def compiled_memory(config: LlamaConfig, plan: PlanConfig) -> CompiledMemory:
    """Compiles the real train step for `config` and `plan` on abstract inputs; reads XLA's memory analysis.

    Compile time grows with the layer count (layers are unrolled): use a few layers of the real widths
    (`analytic.layer_count_scaled`) on a CPU.
    """
    step, args = abstract_train_step(config, plan)
    start = time.perf_counter()
    compiled = step.lower(*args).compile()
    seconds = time.perf_counter() - start
    analysis = compiled.memory_analysis()
    if analysis is None:
        raise ConfigError(f"XLA's {jax.default_backend()} backend gives no memory analysis; cross-check on a "
                          "CPU or GPU backend.")
    return CompiledMemory(
        argument=int(analysis.argument_size_in_bytes), output=int(analysis.output_size_in_bytes),
        alias=int(analysis.alias_size_in_bytes), temp=int(analysis.temp_size_in_bytes),
        backend=jax.default_backend(), compile_seconds=seconds,
        memory_scheduler=jax.default_backend() == "cpu" and memory_scheduler_active(),
    )


def crosscheck(config: LlamaConfig, plan: PlanConfig) -> CrossCheck:
    """The analytic plan beside the compiled step's memory analysis, for the same shapes."""
    return CrossCheck(plan=plan_memory(config, plan), measured=compiled_memory(config, plan))


__all__ = ["MEMORY_SCHEDULER_FLAG", "CompiledMemory", "CrossCheck", "abstract_train_step", "compiled_memory",
           "crosscheck", "memory_scheduler_active", "use_memory_scheduler"]
