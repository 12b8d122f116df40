"""The quantized kernel protocol: what any quantized (I, O) linear kernel held under the `qkernel` leaf provides.

A linear module stores its weight either as a dense `kernel` (I, O) or as one object under `qkernel`
that implements `QuantizedKernel`. Nothing outside the format's own module looks inside that object:

- the model (`models/ops.py`) calls `.dequantize(dtype)` and `.matmul(x, dtype)` (duck typing: models
  imports nothing from quant);
- tree helpers read `.shape` (the logical (I, O)) and `.dtype` (the dtype it was quantized from);
- sharding (`train/sharding.py`) asks `.partition_specs(mesh_sizes, axis_choices)`;
- byte counts (the planner's cross-checks, `param_bytes`) read `.nbytes`.

A format is also a pytree (its arrays children, its layout static metadata), so that it passes through
jit, eval_shape and device_put like any leaf. `nf4.Quantized4bit` (bitsandbytes NF4/FP4) is the one
implementation today.
"""

from __future__ import annotations

import abc
from typing import Any, Mapping, Sequence

import jax


class QuantizedKernel(abc.ABC):
    """A frozen quantized (I, O) kernel. Implementations also define the attributes
    `shape: tuple[int, int]` (logical (I, O)) and `dtype` (the dtype it was quantized from), as
    dataclass fields or properties (they are not declared here, so a dataclass field may provide them)."""

    shape: tuple[int, ...]

    @property
    @abc.abstractmethod
    def nbytes(self) -> int:
        """Bytes the kernel holds (codes and statistics)."""

    @abc.abstractmethod
    def dequantize(self, dtype: Any) -> jax.Array:
        """The dense (I, O) kernel in `dtype`."""

    @abc.abstractmethod
    def matmul(self, x: jax.Array, dtype: Any) -> jax.Array:
        """x @ W in `dtype` for x (..., I); no gradient ever flows to the (frozen) kernel."""

    @abc.abstractmethod
    def partition_specs(self, mesh_sizes: Mapping[str, int],
                        axis_choices: Sequence[tuple[str, ...]]) -> tuple[Any, bool]:
        """(a pytree of the kernel's structure holding one PartitionSpec per array, whether it is split).

        The kernel splits along its own storage unit (whole blocks for a blockwise format) over the first
        group of mesh axes in `axis_choices` whose size (the product of the axes of size > 1 in
        `mesh_sizes`) divides the number of units; when none does it is replicated.
        """


__all__ = ["QuantizedKernel"]
