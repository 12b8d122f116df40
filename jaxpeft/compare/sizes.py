"""The article's LoRA adapter-size table for a 7B Llama, computed from shapes and checked against its figures."""

from __future__ import annotations

from typing import Any, Sequence


# The article's adapter sizes for a 7B Llama (REFERENCE.md, "Numbers from the seed article"): LoRA on
# q, k, v, o of 32 layers, hidden 4096, fp16, in MB.
REFERENCE_7B_MB: dict[int, float] = {4: 8, 8: 16, 16: 33, 32: 67, 64: 134}


def lora_adapter_size(rank: int, *, layers: int = 32, hidden: int = 4096, matrices: int = 4,
                      bytes_per_param: int = 2) -> tuple[int, int]:
    """(parameters, bytes) of LoRA at `rank` on `matrices` square hidden x hidden projections per layer:
    A is (hidden, r) and B (r, hidden), so 2 * hidden * r parameters a matrix."""
    params = layers * matrices * 2 * hidden * rank
    return params, params * bytes_per_param


def adapter_size_table(ranks: Sequence[int] = tuple(REFERENCE_7B_MB)) -> list[dict[str, Any]]:
    """The 7B table from shapes, each row beside the article's figure (MB = 10^6 bytes)."""
    rows = []
    for r in ranks:
        params, nbytes = lora_adapter_size(r)
        ref = REFERENCE_7B_MB.get(r)
        mb = nbytes / 1e6
        rows.append({"rank": r, "parameters": params, "bytes": nbytes, "MB": mb, "MiB": nbytes / 2**20,
                     "reference_MB": ref,
                     # The article rounds down ("~8 MB" for 8.39): agree when within 5 % of it.
                     "agrees": ref is not None and abs(mb - ref) / ref < 0.05})
    return rows
