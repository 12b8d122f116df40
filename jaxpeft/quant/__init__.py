"""Quantized kernels (the `QuantizedKernel` protocol; NF4/FP4 matching bitsandbytes) and the tree transforms QLoRA needs."""

from jaxpeft.quant.dynamic8 import create_dynamic_map, dequantize_blockwise_8bit, quantize_blockwise_8bit
from jaxpeft.quant.nf4 import (
    ALLOWED_BLOCKSIZES,
    FP4_CODE,
    NF4_CODE,
    Quantized4bit,
    dequantize_4bit,
    dequantize_kernel,
    dequantize_params,
    param_bytes,
    quantize_4bit,
    quantize_kernel,
    quantize_params,
)
from jaxpeft.quant.nf4_matmul import nf4_matmul, nf4_matmul_reference, nf4_matmul_t_reference
from jaxpeft.quant.protocol import QuantizedKernel

__all__ = [
    "ALLOWED_BLOCKSIZES", "FP4_CODE", "NF4_CODE", "Quantized4bit", "QuantizedKernel", "create_dynamic_map",
    "dequantize_4bit", "dequantize_blockwise_8bit", "dequantize_kernel", "dequantize_params", "nf4_matmul",
    "nf4_matmul_reference", "nf4_matmul_t_reference", "param_bytes", "quantize_4bit", "quantize_blockwise_8bit",
    "quantize_kernel", "quantize_params",
]
