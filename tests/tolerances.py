"""Numerical tolerances, in one place. Any loosening carries its reason."""

# fp32 logits against transformers (torch CPU) on the same weights (DESIGN.md: within 1e-4).
LOGITS_FP32 = dict(atol=1e-4, rtol=0.0)
# Tree closeness for exact round trips (export/import, split/combine): bit-for-bit after dtype casts.
EXACT = dict(atol=0.0, rtol=0.0)
# Gradients and optimizer updates compared across implementations in fp32.
GRAD_FP32 = dict(atol=1e-5, rtol=1e-5)
# NF4 matmul (kernel vs dequantize-then-matmul reference, forward and dx), keyed by compute dtype.
# The dequantized weights are bit-identical; only the fp32 accumulation order differs (fp32: ~1e-7
# relative to the output scale, ~4e-5 absolute at |y| ~ 100). bf16 outputs are rounded once from
# fp32 sums that differ in order, so they may land one bf16 ulp apart (2^-8 relative): rtol 1e-2.
NF4_MATMUL = {
    "float32": dict(atol=2e-4, rtol=1e-5),
    "bfloat16": dict(atol=1e-2, rtol=1e-2),
}
# The same on a GPU at 4096 x 11008: sums over 4096 (forward) / 11008 (dx) terms in a different order
# than cuBLAS's, so the fp32 absolute error grows with the sum length and |y| (~100-200): 4x looser.
NF4_MATMUL_GPU = {
    "float32": dict(atol=8e-4, rtol=4e-5),
    "bfloat16": dict(atol=4e-2, rtol=2e-2),
}
# Merged tensors against mergekit 0.1.5 (torch CPU) on the same YAML, relative to each tensor's largest
# magnitude (issue 18): fp32 sums in another order; slerp looser since acos near 1 amplifies fp32 rounding
# (mergekit's own fp32 slerp is 6e-6 from an fp64 one); bf16 outputs within one bf16 ulp of the largest entry.
MERGEKIT_FP32 = 2e-6
MERGEKIT_SLERP = 1e-5
MERGEKIT_BF16_ULPS = 1
# Blockwise (online-softmax) attention against the dense reference (issue 16), forward and q/k/v gradients:
# fp32 sums in another order (brief: 1e-5). bf16: both round the probabilities / tiles to bf16 at different
# points (dense: the normalised probabilities; blockwise: the unnormalised tile), so outputs differ by a few
# bf16 ulps of values ~1: 2e-2.
ATTENTION_FP32 = dict(atol=1e-5, rtol=1e-5)
ATTENTION_BF16 = dict(atol=2e-2, rtol=2e-2)
