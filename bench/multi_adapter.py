"""Multi-tenant serving: 16 LoRA adapters in one batch (per-row adapters) against running them one after another.

    python -m bench.multi_adapter                           # tiny config, then a SmolLM2-sized random config
    python -m bench.multi_adapter --configs tiny --adapters 16 --rows_per_adapter 4 --new_tokens 16
    python bench/multi_adapter.py --configs smollm2 --reps 3 --json /tmp/multi.json

Same work on both sides: N adapters (LoRA rank --rank on q,k,v,o, random non-zero B), each with
--rows_per_adapter prompts of --prompt_len random tokens, greedy decoding of --new_tokens tokens with
a KV cache, no stop tokens (every row generates all its tokens).
* sequential: for each adapter, `models.generate.generate` on base + that adapter with its rows (the
  adapter's leaves are jit arguments, so the 16 calls share one compilation);
* batched: one `multi.per_example_generate` call, all rows in one batch, row b gathering its own
  adapter (no merged weights);
* base batch (reference): the same batch through the base model without adapters, the ceiling for
  the batched side.
Each side compiles once (reported apart), then runs --reps times; the median counts. tokens/s =
rows x new_tokens / time. The sides must produce the same tokens row by row (checked and printed).
Random weights: the work per token is the real model's; the text is meaningless. The SmolLM2-sized
config is SmolLM2-135M's shapes (30 layers, 576 wide, vocab 49152, tied), randomly initialised, so the
bench needs no download.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:  # `python bench/multi_adapter.py` puts bench/ first on the path, not the repo
    sys.path.insert(0, _REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxpeft.core import partition  # noqa: E402
from jaxpeft.core.tree import flatten_params, unflatten_params  # noqa: E402
from jaxpeft.methods.lora import Lora, LoraConfig  # noqa: E402
from jaxpeft.models.config import LlamaConfig  # noqa: E402
from jaxpeft.models.generate import generate  # noqa: E402
from jaxpeft.models.llama import LlamaForCausalLM  # noqa: E402
from jaxpeft.multi import per_example_generate, stack  # noqa: E402


def configs():
    return {
        "tiny": LlamaConfig(vocab_size=61, hidden_size=40, intermediate_size=52, num_hidden_layers=2,
                            num_attention_heads=5, num_key_value_heads=1, head_dim=8, max_position_embeddings=256),
        "smollm2": LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                               num_attention_heads=9, num_key_value_heads=3, head_dim=64, rope_theta=100000.0,
                               tie_word_embeddings=True, max_position_embeddings=8192),
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="tiny,smollm2", help="comma-separated: tiny, smollm2")
    p.add_argument("--adapters", type=int, default=16)
    p.add_argument("--rows_per_adapter", type=int, default=1)
    p.add_argument("--prompt_len", type=int, default=16)
    p.add_argument("--new_tokens", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results to this file")
    return p.parse_args(argv)


def _timed(fn, reps: int) -> tuple[float, list[float], object]:
    start = time.perf_counter()
    out = fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return first, times, out


def run_config(name: str, config, args) -> dict:
    model = LlamaForCausalLM(config)
    start = time.perf_counter()
    base = jax.jit(model.init)(jax.random.key(args.seed), jnp.ones((1, 8), jnp.int32))["params"]
    lora = Lora()
    cfg = LoraConfig(r=args.rank, lora_alpha=2.0 * args.rank, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
    adapters = {}
    for i in range(args.adapters):
        flat = flatten_params(lora.init(jax.random.key(100 + i), base, cfg))
        for j, p in enumerate(sorted(p for p in flat if p[-1] == "lora_b")):
            flat[p] = 0.5 * jax.random.normal(jax.random.key(10_000 * (i + 1) + j), flat[p].shape)
        adapters[f"t{i}"] = lora.split(unflatten_params(flat), cfg)[0]
    setup_s = time.perf_counter() - start
    rng = np.random.default_rng(args.seed)
    names = [n for n in adapters for _ in range(args.rows_per_adapter)]
    prompts = [rng.integers(3, config.vocab_size, args.prompt_len).tolist() for _ in names]
    kw = dict(max_new_tokens=args.new_tokens, min_prompt_len=args.prompt_len)
    stacked = stack(adapters)
    params = {n: partition.combine(base, a) for n, a in adapters.items()}

    def sequential():
        out = []
        for n in adapters:
            out += generate(model, params[n], [p for p, m in zip(prompts, names) if m == n], **kw)
        return out

    results = {}
    for side, fn in (("sequential", sequential),
                     ("batched", lambda: per_example_generate(model, base, stacked, prompts, names, **kw)),
                     ("base batch", lambda: generate(model, base, prompts, **kw))):
        first, times, out = _timed(fn, args.reps)
        median = statistics.median(times)
        results[side] = {"first_s": first, "median_s": median, "min_s": min(times),
                         "tokens_per_s": len(prompts) * args.new_tokens / median, "tokens": out}
    agree = results["sequential"]["tokens"] == results["batched"]["tokens"]
    for r in results.values():
        del r["tokens"]
    return {"config": name, "adapters": args.adapters, "rows": len(prompts), "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens, "rank": args.rank, "setup_s": setup_s, "sides": results,
            "ratio_batched_vs_sequential": results["sequential"]["median_s"] / results["batched"]["median_s"],
            "tokens_agree": agree}


def main(argv=None) -> int:
    args = parse_args(argv)
    table = configs()
    unknown = [c for c in args.configs.split(",") if c not in table]
    if unknown:
        raise SystemExit(f"unknown configs {unknown}; choose from {sorted(table)}")
    all_results = []
    for name in args.configs.split(","):
        res = run_config(name, table[name], args)
        all_results.append(res)
        print(f"\n{name}: {res['adapters']} adapters (rank {res['rank']}, q,k,v,o), {res['rows']} rows x "
              f"{res['prompt_len']} prompt tokens, {res['new_tokens']} new tokens each; load "
              f"{os.getloadavg()[0]:.1f}")
        print("| side | first call (compile) | median | min | new tokens/s |\n|---|---|---|---|---|")
        for side, r in res["sides"].items():
            print(f"| {side} | {r['first_s']:.2f} s | {r['median_s'] * 1e3:.0f} ms | {r['min_s'] * 1e3:.0f} ms | "
                  f"{r['tokens_per_s']:.1f} |")
        print(f"batched / sequential throughput: {res['ratio_batched_vs_sequential']:.1f}x; "
              f"tokens agree row by row: {res['tokens_agree']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(all_results, f, indent=2)
    return 0 if all(r["tokens_agree"] for r in all_results) else 1


if __name__ == "__main__":
    sys.exit(main())
