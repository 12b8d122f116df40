"""NF4 matmul speed: the fused Pallas kernel vs XLA's dequantize-then-matmul vs a dense matmul.

Weights are Llama-3-8B/70B-like MLP projections, 8192 x 28672 (up) and 28672 x 8192 (down), NF4 with
blocksize 64 and double quantization; rows M = 1, 8, 16, 64 (decode) and 2048 (training / prefill).

    python -m bench.nf4_matmul                                   # GPU: full size, all three paths
    python -m bench.nf4_matmul --sweep                           # GPU: also try a few Pallas tile sets
    python bench/nf4_matmul.py --scale 8 --ms 1,8,16,64,512      # CPU: every weight dim / 8

Variants: `pallas` (GPU only: compiled Triton kernel), `xla` (`implementation="xla"`, dequantize +
matmul fused by XLA), `dense` (x @ W with W already dense in the compute dtype: the peer to beat). On
the CPU the compute dtype runs in bf16 and fp32 both (this CPU has no bf16 units), and the Pallas
kernel only runs in interpret mode, at one tiny shape, labelled: that is an emulation, not a speed.

Timing: each variant runs `--inner` times inside one jitted `fori_loop` (every iteration feeds a zero
multiple of its output back into x, and a no-op that XLA cannot prove to be one into the quantized
weight, so no dequantization is hoisted out of the loop and per-call dispatch is not measured),
repeated `--rounds` times; the median per call is reported. Bandwidth is the compulsory bytes (4-bit
codes + absmax statistics, or the dense weight, plus x and y) over that time; the 4-bit paths count
the same bytes, so their GB/s compare directly with each other and with the dense path's.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:  # `python bench/nf4_matmul.py` puts bench/ first on the path, not the repo
    sys.path.insert(0, _REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

from jaxpeft.kernels.nf4_matmul.pallas import Tiles, forward_tiles  # noqa: E402
from jaxpeft.quant import QuantizedKernel, nf4_matmul, quantize_kernel  # noqa: E402

WEIGHTS = ((8192, 28672), (28672, 8192))  # (I, O)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=int, default=None, help="divide both weight dims by this (default: 1 on a "
                   "GPU, 8 elsewhere)")
    p.add_argument("--ms", default="1,8,16,64,2048", help="comma-separated row counts M")
    p.add_argument("--blocksize", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5, help="timed repetitions of the inner loop")
    p.add_argument("--inner", type=int, default=None, help="calls per timed loop (default: ~0.2 s of work, "
                   "at most 500)")
    p.add_argument("--sweep", action="store_true", help="GPU: also time a small grid of Pallas tiles")
    return p.parse_args(argv)


def _perturb(q, flag, codes: bool):
    """q with a loop-dependent no-op applied, so XLA cannot hoist its dequantization out of the loop.

    `flag` is 0 (a NaN test on x), but XLA cannot know that. The offset (a scalar) feeds the absmax
    reconstruction every path pays per call; for the XLA path the codes are xor-ed too (the xor fuses
    into its dequantization); the Pallas kernel reads the codes itself, so they stay untouched there.
    """
    offset = q.offset + flag.astype(jnp.float32) if q.offset is not None else None
    absmax = q.absmax if q.offset is not None else q.absmax + flag.astype(jnp.float32)
    packed = q.packed ^ flag.astype(jnp.uint8) if codes else q.packed
    return dataclasses.replace(q, packed=packed, absmax=absmax, offset=offset)


def _time_per_call(f, x, w, inner: int | None, rounds: int, codes: bool = False) -> tuple[float, int]:
    """Median seconds per call of f(x, w) -> y, run `inner` times in one jitted loop."""
    once = jax.jit(f)
    jax.block_until_ready(once(x, w))
    t0 = time.perf_counter()
    jax.block_until_ready(once(x, w))
    single = time.perf_counter() - t0
    n = inner or int(min(500, max(1, 0.2 / max(single, 1e-7))))

    def loop(x, w):
        def body(_, x):
            flag = x[0, 0] != x[0, 0]
            y = f(x, _perturb(w, flag, codes) if isinstance(w, QuantizedKernel) else w)
            return x + (y[:, :1] * 0).astype(x.dtype)  # a real dependency: no hoisting, sequential
        return lax.fori_loop(0, n, body, x)

    looped = jax.jit(loop)
    jax.block_until_ready(looped(x, w))
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        jax.block_until_ready(looped(x, w))
        times.append((time.perf_counter() - t0) / n)
    return statistics.median(times), n


def _nf4_bytes(q) -> int:
    return q.nbytes  # codes + (double-quantized) absmax + nested statistics


def _row(shape, m, name, seconds, nbytes, flops, dense_s, xla_s, inner):
    gbs = nbytes / seconds / 1e9
    tfs = flops / seconds / 1e12
    vs_dense = f"{dense_s / seconds:6.2f}x" if dense_s else "      -"
    vs_xla = f"{xla_s / seconds:6.2f}x" if xla_s else "      -"
    print(f"{shape[0]:>6}x{shape[1]:<6} {m:>5} {name:<26} {seconds * 1e6:>11.1f} {gbs:>9.1f} {tfs:>8.3f} "
          f"{vs_dense} {vs_xla} {inner:>6}", flush=True)


def _header():
    print(f"{'I x O':<13} {'M':>5} {'variant':<26} {'us/call':>11} {'GB/s':>9} {'TFLOP/s':>8} "
          f"{'vsdense':>7} {'vs xla':>7} {'inner':>6}")


def bench_weight(i: int, o: int, ms: list[int], args, on_gpu: bool) -> None:
    key = jax.random.PRNGKey(i * 31 + o)
    w32 = jax.random.normal(key, (i, o), jnp.float32) * 0.02
    q = jax.block_until_ready(quantize_kernel(w32, blocksize=args.blocksize))
    dtypes = ("bfloat16",) if on_gpu else ("bfloat16", "float32")
    for m in ms:
        for dt in dtypes:
            x = jax.random.normal(jax.random.PRNGKey(m), (m, i), jnp.float32).astype(dt)
            w = w32.astype(dt)
            itemsize = jnp.dtype(dt).itemsize
            act = (m * i + m * o) * itemsize
            flops = 2 * m * i * o
            dense_s, dense_n = _time_per_call(lambda x, w: x @ w, x, w, args.inner, args.rounds)
            xla_s, xla_n = _time_per_call(lambda x, q: nf4_matmul(x, q, dtype=dt, implementation="xla"), x, q,
                                          args.inner, args.rounds, codes=True)
            _row((i, o), m, f"dense {dt}", dense_s, i * o * itemsize + act, flops, dense_s, None, dense_n)
            _row((i, o), m, f"xla nf4 {dt}", xla_s, _nf4_bytes(q) + act, flops, dense_s, None, xla_n)
            if not on_gpu:
                continue
            tile_sets = [forward_tiles(m, i, o)]
            if args.sweep:
                tile_sets += [Tiles(tile_sets[0].block_m, bn, bk, nw, 3)
                              for bn in (32, 64, 128) for bk in (128, 256, 512) for nw in (4, 8)
                              if o % bn == 0 and i % bk == 0]
            for tiles in dict.fromkeys(tile_sets):
                f = lambda x, q, t=tiles: nf4_matmul(x, q, dtype=dt, implementation="pallas", interpret=False, tiles=t)
                try:
                    s, n = _time_per_call(f, x, q, args.inner, args.rounds)
                except Exception as e:  # a tile set Triton rejects: report it, keep going
                    print(f"   pallas {tiles}: FAILED {type(e).__name__}: {str(e)[:200]}")
                    continue
                label = f"pallas {tiles.block_m}/{tiles.block_n}/{tiles.block_k}/w{tiles.num_warps}"
                _row((i, o), m, label, s, _nf4_bytes(q) + act, flops, dense_s, xla_s, n)
            got = nf4_matmul(x, q, dtype=dt, implementation="pallas", interpret=False)
            ref = nf4_matmul(x, q, dtype=dt, implementation="xla")
            err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - ref.astype(jnp.float32))))
            print(f"   check: max |pallas - xla| = {err:.3g} (max |y| = {float(jnp.max(jnp.abs(ref))):.3g})")


def bench_interpret_tiny() -> None:
    """The Pallas kernel in interpret mode on the CPU, one tiny shape: an emulation, not a speed."""
    i, o, m = 512, 256, 1
    q = quantize_kernel(np.random.default_rng(0).standard_normal((i, o)).astype(np.float32))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((m, i)), jnp.float32)
    f = jax.jit(lambda x, q: nf4_matmul(x, q, dtype="float32", implementation="pallas", interpret=True))
    jax.block_until_ready(f(x, q))
    t0 = time.perf_counter()
    for _ in range(3):
        y = jax.block_until_ready(f(x, q))
    per = (time.perf_counter() - t0) / 3
    ref = nf4_matmul(x, q, dtype="float32", implementation="xla")
    print(f"\npallas INTERPRET (CPU emulation, correctness only, not a speed): {i}x{o}, M={m}: "
          f"{per * 1e3:.1f} ms/call; max |pallas - xla| = {float(jnp.max(jnp.abs(y - ref))):.3g}")


def main(argv=None) -> None:
    args = parse_args(argv)
    on_gpu = jax.default_backend() == "gpu"
    scale = args.scale or (1 if on_gpu else 8)
    ms = [int(v) for v in args.ms.split(",")]
    print(f"jax {jax.__version__}, device {jax.devices()[0].device_kind} ({jax.default_backend()}), "
          f"scale 1/{scale}, blocksize {args.blocksize}, double quant, load average {os.getloadavg()[0]:.1f}")
    _header()
    for i, o in WEIGHTS:
        bench_weight(i // scale, o // scale, ms, args, on_gpu)
    if not on_gpu:
        bench_interpret_tiny()


if __name__ == "__main__":
    main()
