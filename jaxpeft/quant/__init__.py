"""4-bit (NF4/FP4) quantization matching bitsandbytes, and the tree transforms QLoRA needs."""

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
    register,
)

register()  # ops.linear reads {"qkernel": Quantized4bit} modules

__all__ = [
    "ALLOWED_BLOCKSIZES", "FP4_CODE", "NF4_CODE", "Quantized4bit", "create_dynamic_map", "dequantize_4bit",
    "dequantize_blockwise_8bit", "dequantize_kernel", "dequantize_params", "param_bytes", "quantize_4bit",
    "quantize_blockwise_8bit", "quantize_kernel", "quantize_params",
]
import jaxpeft.kernels.nf4_matmul  # noqa: E402,F401  registers ops.KERNEL_MATMULS["qkernel"] (a plain import: avoids a cycle)
