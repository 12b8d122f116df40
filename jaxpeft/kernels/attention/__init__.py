"""Attention by implementation (dense reference, blockwise, cuDNN) behind one entry point and `supports` gate."""

from jaxpeft.kernels.attention.api import BLOCKWISE_MIN_LEN, CHOICES, IMPLEMENTATIONS, REMAT_BLOCKWISE_MIN_LEN, Case, \
    attention, auto_for_remat, case_of, choose, supports
from jaxpeft.kernels.attention.blockwise import DEFAULT_BLOCK, blockwise_attention
from jaxpeft.kernels.attention.cudnn import cudnn_attention
from jaxpeft.kernels.attention.dense import dense_attention
from jaxpeft.kernels.attention.mask import AttentionMask, make_mask

__all__ = ["BLOCKWISE_MIN_LEN", "CHOICES", "DEFAULT_BLOCK", "IMPLEMENTATIONS", "REMAT_BLOCKWISE_MIN_LEN", "AttentionMask",
           "Case", "attention", "auto_for_remat", "blockwise_attention", "case_of", "choose", "cudnn_attention", "dense_attention", "make_mask", "supports"]
