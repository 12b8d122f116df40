"""Numerical tolerances, in one place. Any loosening carries its reason."""

# fp32 logits against transformers (torch CPU) on the same weights (DESIGN.md: within 1e-4).
LOGITS_FP32 = dict(atol=1e-4, rtol=0.0)
# Tree closeness for exact round trips (export/import, split/combine): bit-for-bit after dtype casts.
EXACT = dict(atol=0.0, rtol=0.0)
# Gradients and optimizer updates compared across implementations in fp32.
GRAD_FP32 = dict(atol=1e-5, rtol=1e-5)
