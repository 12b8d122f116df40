"""Which MoE MLP implementation runs (tokamax-style: a table, a tested `supports` gate, one entry point).

- "grouped": tokens sorted by expert, padded to tiles, one batched matmul per tile (`grouped.py`); any platform,
  the default on the CPU.
- "ragged_dot": `jax.lax.ragged_dot` over the sorted tokens; GPU only (on the CPU jax 0.10.2 lowers it to a dense
  dot over every expert, so the gate refuses it there); the default on a GPU.
- "dense": every expert on every token (`reference.py`); the spec, for tests and the bench, never a default.
"""

from __future__ import annotations

from typing import Any

import jax

from jaxpeft.kernels.moe.grouped import expert_mlp_grouped, expert_mlp_ragged
from jaxpeft.kernels.moe.reference import expert_mlp_dense

IMPLEMENTATIONS = ("grouped", "ragged_dot", "dense")


def supports(implementation: str, platform: str | None = None) -> tuple[bool, str]:
    """(ok, reason): whether `implementation` runs (and is worth running) on `platform` (default: jax's backend)."""
    platform = platform or jax.default_backend()
    if implementation not in IMPLEMENTATIONS:
        return False, f"unknown implementation {implementation!r}; expected one of {list(IMPLEMENTATIONS)}"
    if implementation == "ragged_dot" and platform != "gpu":
        return False, (f"ragged_dot on {platform}: jax 0.10.2 lowers it there to a dense dot over every expert; "
                       "use 'grouped'")
    return True, "supported"


def default_implementation(platform: str | None = None) -> str:
    return "ragged_dot" if supports("ragged_dot", platform)[0] else "grouped"


def expert_mlp(x_NxH: jax.Array, gate_up_ExFxH: jax.Array, down_ExHxI: jax.Array, experts_NxK: jax.Array,
               weights_NxK: jax.Array, dtype: Any, *, implementation: str | None = None) -> jax.Array:
    """sum_k weights[n, k] * expert_{experts[n, k]}(x[n]) (shapes: `reference.py`), by `implementation`
    (None: `default_implementation()`); an implementation the gate refuses raises NotImplementedError."""
    implementation = implementation or default_implementation()
    ok, reason = supports(implementation)
    if not ok:
        raise NotImplementedError(f"MoE implementation {implementation!r} is not available: {reason}")
    fn = {"grouped": expert_mlp_grouped, "ragged_dot": expert_mlp_ragged, "dense": expert_mlp_dense}[implementation]
    return fn(x_NxH, gate_up_ExFxH, down_ExHxI, experts_NxK, weights_NxK, dtype)
