"""The NF4 matmul on raw arrays: the fused Pallas kernel, its `supports` gate and the XLA/Pallas choice."""

from jaxpeft.kernels.nf4_matmul.api import IMPLEMENTATIONS, PALLAS_MAX_M, Plan, plan_nf4_matmul, supports
from jaxpeft.kernels.nf4_matmul.pallas import Tiles, nf4_matmul_pallas, nf4_matmul_t_pallas

__all__ = ["IMPLEMENTATIONS", "PALLAS_MAX_M", "Plan", "Tiles", "nf4_matmul_pallas", "nf4_matmul_t_pallas",
           "plan_nf4_matmul", "supports"]
