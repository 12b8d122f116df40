"""The planner's figure for a real run (`run_finetune` logs it at the start and records it in config.json):
the same `plan_memory` as `experiments.memory`, with the run's own model, method, batch, sequence length
and dtypes. The figure is the jitted step's memory (weights, state, activations, transients); a process
adds its baseline (the Python runtime, JAX, the tokenizer) on top.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp

from jaxpeft.core.dtypes import tree_dtype_name
from jaxpeft.core.errors import ConfigError
from jaxpeft.core.tree import flatten_params
from jaxpeft.plan.analytic import PlanConfig, plan_memory


def plan_run(*, cfg: Any, method: Any, method_config: Any, model: Any, params: Mapping, seq_len: int,
             max_targets: int) -> dict[str, Any] | None:
    """{"method", "peak_bytes", "static_bytes"} for LoRA (QLoRA on a 4-bit base) and full fine-tuning of a
    family the planner knows; None for the methods it does not model (DoRA, IA3, prefix, ...)."""
    quantized = [leaf for path, leaf in flatten_params(params).items() if path[-1] == "qkernel"]
    if method.name == "lora" and not getattr(method_config, "use_dora", False):
        name = "qlora" if quantized else "lora"
    elif method.name == "full":
        name = "full"
    else:
        return None
    extra = {} if name == "full" else {"rank": int(method_config.r), "targets": method_config.target_modules}
    if quantized:
        extra.update(quant_blocksize=quantized[0].blocksize, double_quant=quantized[0].double_quant)
    try:
        plan_cfg = PlanConfig(method=name, batch_size=cfg.batch_size // cfg.grad_accum, seq_len=seq_len,
                              remat=cfg.remat, dtype=jnp.dtype(model.dtype).name,
                              param_dtype=tree_dtype_name(params), max_targets=max_targets,
                              loss_chunk=getattr(cfg, "loss_chunk", None), **extra)
        plan = plan_memory(model.config, plan_cfg)
    except (ConfigError, KeyError, ValueError):
        return None  # a family or setting the planner does not model
    return {"method": name, "peak_bytes": int(plan.peak), "static_bytes": int(plan.static),
            "batch_size": plan_cfg.batch_size, "seq_len": seq_len, "remat": cfg.remat}
