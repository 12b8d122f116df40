"""Generation speed for the method comparison: base vs adapted vs merged, in one process.

Every variant decodes the same held-out prompts (B prompts, left padded to one width) for exactly N new
tokens (no stop tokens, so no variant stops early) with `jaxpeft.models.generate.generate`. Each
variant is compiled once (an untimed call), then timed in `rounds` rounds that alternate with the base,
so machine load drifts hit both sides alike; tokens/s = B * N / (best time), and the overhead ratio is
the variant's tokens/s over the base's from the same rounds (1.0 = as fast as the base, 0.8 = 20 %
slower). Variants: the fine-tuned model (full), the adapter on its base (the 4-bit base for QLoRA), and
for mergeable methods the merged weights (QLoRA's merge is dequantized to fp32, as its merged/ export).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from jaxpeft.convert.bnb import Bnb4bitConfig
from jaxpeft.convert.load import QuantizedBaseLoader, from_pretrained
from jaxpeft.data.encode import eval_prompts, pad_id_of
from jaxpeft.data.records import load_records
from jaxpeft.methods import get_method
from jaxpeft.models.generate import generate, left_pad
from jaxpeft.quant import dequantize_params


@dataclasses.dataclass(frozen=True, kw_only=True)
class SpeedConfig:
    prompts: int = 8
    new_tokens: int = 32
    rounds: int = 3


@dataclasses.dataclass(frozen=True, kw_only=True)
class Variant:
    """One trained run to time: `artifact` is its saved adapter/ (or model/) folder."""

    label: str
    method: str  # registry name
    artifact: str
    quantization: Mapping[str, Any] | None = None  # the run's settings.base_loader.quantization (QLoRA)


class _Timer:
    def __init__(self, prompts: Sequence[Sequence[int]], pad_id: int, cfg: SpeedConfig) -> None:
        self.prompts, self.pad_id, self.cfg = prompts, pad_id, cfg
        self.min_len = max(len(p) for p in prompts)

    def once(self, model: Any, params: Any) -> float:
        start = time.perf_counter()
        out = generate(model, params, self.prompts, max_new_tokens=self.cfg.new_tokens, stop_ids=(),
                       pad_id=self.pad_id, min_prompt_len=self.min_len)
        elapsed = time.perf_counter() - start
        if any(len(row) != self.cfg.new_tokens for row in out):
            raise RuntimeError("generation stopped early although no stop token was given")
        return elapsed

    def tokens_per_s(self, seconds: float) -> float:
        return len(self.prompts) * self.cfg.new_tokens / seconds

    def against_base(self, base: tuple[Any, Any], variant: tuple[Any, Any]) -> dict[str, float]:
        """Compiles `variant`, then alternates timed calls of base and variant."""
        self.once(*variant)  # compile
        base_times, times = [], []
        for _ in range(self.cfg.rounds):
            base_times.append(self.once(*base))
            times.append(self.once(*variant))
        base_tps, tps = self.tokens_per_s(min(base_times)), self.tokens_per_s(min(times))
        return {"tokens_per_s": tps, "base_tokens_per_s": base_tps, "relative_to_base": tps / base_tps}


def _max_logit_diff(a: tuple[Any, Any], b: tuple[Any, Any], ids: np.ndarray, mask: np.ndarray) -> float:
    """Largest |logit| difference of two variants on the padded prompts (merged vs adapted: ~0)."""
    la = np.asarray(a[0].apply({"params": a[1]}, ids, attention_mask_BxS=mask))
    lb = np.asarray(b[0].apply({"params": b[1]}, ids, attention_mask_BxS=mask))
    keep = mask.astype(bool)
    return float(np.abs(la[keep] - lb[keep]).max())


def _quantized(model_name: str | None, quantization: Mapping[str, Any], dtype: Any):
    q = dict(quantization)
    if isinstance(q.get("targets"), list):
        q["targets"] = tuple(q["targets"])
    model, params, _, _ = QuantizedBaseLoader(Bnb4bitConfig(**q))(model_name, dtype=dtype, load_tokenizer=False)
    return model, params


def measure_generation(model_name: str | None, variants: Sequence[Variant], *, cfg: SpeedConfig = SpeedConfig(),
                       on_event=None) -> dict[str, Any]:
    """Tokens/s of the base and of every variant (adapted, and merged where the method merges).

    Returns {"base": {"tokens_per_s"}, "settings": {...}, "variants": {label: {"adapted": {...},
    "merged": {...} | None, "merged_max_logit_diff": float | None} or {"error": str}}}.
    """
    model, params, tokenizer = from_pretrained(model_name, dtype=jnp.float32)
    _, eval_records = load_records("builtin:dates")
    prompts = [p for p, _ in eval_prompts(tokenizer, eval_records[: cfg.prompts])]
    pad_id = pad_id_of(tokenizer)
    timer = _Timer(prompts, pad_id, cfg)
    ids, mask = left_pad(prompts, pad_id)
    base = (model, params)
    timer.once(*base)  # compile the base once
    out: dict[str, Any] = {"settings": {**dataclasses.asdict(cfg), "prompt_len": int(ids.shape[1])}, "variants": {}}
    base_tps = []
    for v in variants:
        if on_event:
            on_event(f"generation speed: {v.label}")
        try:
            method = get_method(v.method)
            start_model, start_params = (_quantized(model_name, v.quantization, jnp.float32) if v.quantization
                                         else base)
            m, p, mcfg = method.load(v.artifact, start_model, start_params)
            row: dict[str, Any] = {"adapted": timer.against_base(base, (m, p)), "merged": None,
                                   "merged_max_logit_diff": None}
            base_tps.append(row["adapted"]["base_tokens_per_s"])
            if method.mergeable:
                merged = dequantize_params(method.merge(p, mcfg), jnp.float32)
                row["merged"] = timer.against_base(base, (model, merged))
                row["merged_max_logit_diff"] = _max_logit_diff((m, p), (model, merged), ids, mask)
                del merged
            del m, p
        except Exception as e:  # noqa: BLE001  (one broken artifact must not lose the other rows)
            row = {"error": f"{type(e).__name__}: {e}"}
        out["variants"][v.label] = row
    if not base_tps:  # no variant timed: time the base on its own
        base_tps = [timer.tokens_per_s(min(timer.once(*base) for _ in range(cfg.rounds)))]
    out["base"] = {"tokens_per_s": max(base_tps)}
    return out
