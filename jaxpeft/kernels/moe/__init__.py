"""The mixture-of-experts MLP on raw arrays: grouped (tokens sorted by expert, tiles), ragged_dot (GPU), the
expert-parallel one (`expert_parallel.py`, the mesh's expert axis) and the dense every-expert reference, behind one `supports` gate."""

from jaxpeft.kernels.moe.api import IMPLEMENTATIONS, default_implementation, expert_mlp, supports
from jaxpeft.kernels.moe.expert_parallel import expert_mlp_expert_parallel
from jaxpeft.kernels.moe.grouped import expert_mlp_grouped, expert_mlp_ragged, tile_size
from jaxpeft.kernels.moe.reference import expert_mlp_dense

__all__ = ["IMPLEMENTATIONS", "default_implementation", "expert_mlp", "expert_mlp_dense", "expert_mlp_expert_parallel",
           "expert_mlp_grouped", "expert_mlp_ragged", "supports", "tile_size"]
