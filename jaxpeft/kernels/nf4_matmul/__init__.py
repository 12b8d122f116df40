"""NF4 matmul without materialising the weight: reference (XLA), Pallas kernel, and the dispatching API."""

from jaxpeft.kernels.nf4_matmul.api import IMPLEMENTATIONS, PALLAS_MAX_M, nf4_matmul, qkernel_matmul, register, supports
from jaxpeft.kernels.nf4_matmul.pallas import Tiles, nf4_matmul_pallas, nf4_matmul_t_pallas
from jaxpeft.kernels.nf4_matmul.reference import nf4_matmul_reference, nf4_matmul_t_reference

register()  # ops.linear multiplies {"qkernel": Quantized4bit} modules through nf4_matmul

__all__ = [
    "IMPLEMENTATIONS", "PALLAS_MAX_M", "Tiles", "nf4_matmul", "nf4_matmul_pallas", "nf4_matmul_reference",
    "nf4_matmul_t_pallas", "nf4_matmul_t_reference", "qkernel_matmul", "register", "supports",
]
