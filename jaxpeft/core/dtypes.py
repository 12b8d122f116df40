"""Float dtypes by name, and what `"auto"` means for a checkpoint or a parameter tree.

`"auto"` follows transformers' `dtype="auto"`: the dtype the weights are stored in. For a checkpoint that is
config.json's `dtype` (or the older `torch_dtype`), else the dtype of its floating tensors; for a parameter
tree it is the dtype of its dense float weights, or for a quantized base the dtype its kernels had before
quantization (`dtype_name`, bitsandbytes' `quant_state.dtype`).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np

from jaxpeft.core.errors import ConfigError
from jaxpeft.core.tree import flatten_params

AUTO = "auto"
FLOAT_DTYPES = ("float32", "bfloat16", "float16")
DTYPE_CHOICES = (AUTO,) + FLOAT_DTYPES
# safetensors header codes -> names
SAFETENSORS_FLOATS = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


def dtype_name(dtype: Any) -> str:
    """The canonical name ("float32", "bfloat16", "float16") of a numpy/jax dtype, a name, or torch's "torch.bfloat16"."""
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
    else:
        name = np.dtype(dtype).name
    name = {"float": "float32", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}.get(
        name, name)
    if name not in FLOAT_DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not one of {list(FLOAT_DTYPES)} (or 'auto')")
    return name


def jnp_dtype(name: Any):
    """The jax.numpy dtype of a name (or dtype); "auto" is not resolved here."""
    import jax.numpy as jnp

    return jnp.dtype(dtype_name(name))


def numpy_dtype(name: Any):
    """The numpy dtype (ml_dtypes for bfloat16) of a name."""
    import ml_dtypes

    return {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
            "bfloat16": np.dtype(ml_dtypes.bfloat16)}[dtype_name(name)]


def config_dtype(hf_config: Mapping[str, Any]) -> str | None:
    """The stored dtype a config.json declares (`dtype`, else `torch_dtype`), or None when it declares none."""
    for key in ("dtype", "torch_dtype"):
        value = hf_config.get(key)
        if value and value != AUTO:
            try:
                return dtype_name(value)
            except ConfigError:
                continue
    return None


def majority_float(names: Iterable[str]) -> str | None:
    """The most common float dtype name among `names` (ties: the wider one), None when there is none."""
    counts: dict[str, int] = {}
    for n in names:
        if n in FLOAT_DTYPES:
            counts[n] = counts.get(n, 0) + 1
    if not counts:
        return None
    width = {"float32": 2, "bfloat16": 1, "float16": 0}
    return max(counts, key=lambda n: (counts[n], width[n]))


def tree_dtype_name(params: Mapping) -> str:
    """The `"auto"` dtype of a parameter tree: its dense float weights' dtype, or (no dense float kernel, e.g.
    every linear quantized) the pre-quantization dtype of its quantized kernels; float32 when it has neither."""
    dense, quantized = [], []
    for path, leaf in flatten_params(params).items():
        if hasattr(leaf, "dtype_name"):
            quantized.append(leaf.dtype_name)
        elif path[-1] in ("kernel", "embedding") and np.dtype(leaf.dtype).name in FLOAT_DTYPES:
            dense.append(np.dtype(leaf.dtype).name)
    return majority_float(quantized) or majority_float(dense) or "float32"


def resolve(name: Any, auto: str) -> str:
    """`name` as a canonical dtype name, with "auto" (or None) replaced by `auto`."""
    if name is None or name == AUTO:
        return dtype_name(auto)
    return dtype_name(name)
