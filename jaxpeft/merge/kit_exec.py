"""Executing a merge plan (jaxpeft.merge.kit_run): one output tensor at a time, read, merged, written.

`merge_config_file(path, out)` is the whole job of `python -m experiments.merge_models`: parse the YAML,
plan (every check before any output), then stream tensors into a sharded HF folder written atomically.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np

from jaxpeft.convert.shards import Tensors, TensorSpec, save_shards
from jaxpeft.core.atomic import atomic_dir
from jaxpeft.core.errors import ConfigError
from jaxpeft.merge import kit
from jaxpeft.merge.kit_config import parse_config
from jaxpeft.merge.kit_run import TOKENIZER_FILES, Plan, PlannedTensor, lora_delta, plan_merge


@dataclasses.dataclass(frozen=True)
class MergeOptions:
    """How the merged folder is written: shard size, seed of the random methods, overwrite, progress bar."""

    max_shard_size: int | str = "5GB"
    seed: int = 0
    overwrite: bool = False
    progress: bool = True
    chunk_bytes: int = kit.DEFAULT_CHUNK_BYTES  # fp32 bytes of one input's row chunk


def read_input(plan: Plan, ref: str, name: str, dtype: str | None, rows: tuple[int, int] | None = None) -> np.ndarray:
    """One input tensor (a fresh safetensors handle), or its rows start..stop (`rows`) seen as rows x cols
    (kit.RowChunks), with its LoRA delta added, cast to `dtype` if given."""
    model = plan.models[ref]
    shape = model.weights.info[name].shape
    if rows is None or len(shape) < 2:
        array = model.weights[name]
    else:
        array = model.weights.read_slice(name, (slice(*rows),))
    delta = lora_delta(model, name, rows if len(shape) >= 2 else None)
    if delta is not None:
        array = (array.astype(np.float32) + delta).astype(array.dtype)
    if dtype is not None and _is_float(array) and array.dtype.name != dtype:
        array = array.astype(_dt(dtype))
    if rows is not None:
        array = array.reshape(1, -1) if len(shape) < 2 else array.reshape(rows[1] - rows[0], -1)
    return array


def _is_float(array: np.ndarray) -> bool:
    return np.issubdtype(array.dtype, np.floating) or array.dtype.name == "bfloat16"


def merge_tensor(plan: Plan, pt: PlannedTensor, key, budget: int = kit.DEFAULT_CHUNK_BYTES) -> np.ndarray:
    """The merged value of one planned tensor (numpy, in its output dtype). Its inputs are read in row chunks
    of at most `budget` fp32 bytes each (all but nuslerp and model_stock, which read whole tensors)."""
    method = plan.config.method
    first_ref, first_name = pt.inputs[0]
    info = plan.models[first_ref].weights.info[first_name]
    dtype = _dt(plan.config.dtype) if plan.config.dtype else info.np_dtype
    if not _is_float(np.empty(0, dtype)):
        out = read_input(plan, first_ref, first_name, None)  # integer buffers: the first input's as it is
    else:
        def read(i: int, start: int, stop: int) -> np.ndarray:
            ref, name = pt.inputs[i]
            return read_input(plan, ref, name, plan.config.dtype, (start, stop))

        def whole() -> list[np.ndarray]:
            return [read_input(plan, ref, name, plan.config.dtype) for ref, name in pt.inputs]

        sh, per, n = pt.shared, pt.per_input, len(pt.inputs)
        nb = per[1:] if pt.base_index == 0 else per
        if method.task_vector:
            out = kit.task_vector_chunks(
                read, n - 1, pt.shape, dtype, key, sparsifier=method.sparsifier, consensus=method.consensus,
                weights=tuple(p["weight"] for p in nb), densities=tuple(p["density"] for p in nb),
                gammas=tuple(p.get("gamma", 0.0) for p in nb), epsilons=tuple(p.get("epsilon", 0.0) for p in nb),
                normalize=bool(sh["normalize"]), rescale=bool(sh["rescale"]), lam=float(sh["lambda"]), budget=budget)
        elif method.name == "linear":
            out = kit.linear_chunks(read, n, pt.shape, dtype, weights=tuple(p["weight"] for p in per),
                                    normalize=bool(sh["normalize"]), budget=budget)
        elif method.name == "slerp":
            out = kit.slerp_chunks(read, pt.shape, dtype, t=float(sh["t"]), budget=budget)
        elif method.name == "nuslerp":
            xs = whole()
            base, others = (xs[0], xs[1:]) if pt.base_index == 0 else (None, xs)
            out = kit.nuslerp(base, others[0], others[1], weights=tuple(p["weight"] for p in nb),
                              row_wise=bool(sh["nuslerp_row_wise"]), flatten=bool(sh["nuslerp_flatten"]))
        elif method.name == "model_stock":
            xs = whole()
            out = kit.model_stock(xs[0], np.stack(xs[1:]), filter_wise=bool(sh["filter_wise"]))
        elif method.name == "passthrough":
            out = kit.passthrough(read_input(plan, first_ref, first_name, plan.config.dtype), scale=per[0]["scale"])
        else:  # the METHODS table and this dispatch are kept in step by tests/test_merge_models.py
            raise ConfigError(f"merge method {method.name} has no implementation")
        out = np.asarray(out)
    return out.astype(_dt(pt.dtype)) if out.dtype.name != pt.dtype else out


def model_card(plan: Plan) -> str:
    cfg = plan.config
    sources = sorted({ref for pt in plan.tensors for ref, _ in pt.inputs})
    lines = ["---", "library_name: transformers", "tags:", "- mergekit", "- merge", "- jaxpeft", "---",
             "# merged model", "", f"Merged with jaxpeft (`python -m experiments.merge_models`) using the "
             f"`{cfg.method.name}` method, from a mergekit configuration.", "", "## Models merged", ""]
    lines += [f"* {ref}" + (" (base)" if ref == cfg.base_model else "") for ref in sources]
    lines += ["", "## Configuration", "", "```yaml", cfg.text.strip(), "```", ""]
    return "\n".join(lines)


def run_merge(plan: Plan, out: str | Path, options: MergeOptions = MergeOptions()) -> dict:
    """Writes the merged model folder `out` (atomically); returns a summary (tensors, bytes, seconds)."""
    import jax

    out = Path(out)
    if out.exists() and not options.overwrite:
        raise ConfigError(f"--out {out} already exists; pass --overwrite to replace it")
    start = time.perf_counter()
    total = sum(int(np.prod(pt.shape, dtype=np.int64)) * np.dtype(_dt(pt.dtype)).itemsize for pt in plan.tensors)
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="B", unit_scale=True, desc="merge", disable=not options.progress, mininterval=0.5)
    root = jax.random.key(options.seed)

    def build(i: int, pt: PlannedTensor):
        def make():
            value = merge_tensor(plan, pt, jax.random.fold_in(root, i), options.chunk_bytes)
            bar.update(value.nbytes)
            bar.set_postfix_str(f"{i + 1}/{len(plan.tensors)} tensors", refresh=False)
            return {pt.name: value}
        return [TensorSpec(pt.name, pt.shape, _dt(pt.dtype))], make

    tensors = Tensors(build(i, pt) for i, pt in enumerate(plan.tensors))
    with atomic_dir(out, overwrite=options.overwrite) as tmp:
        files = save_shards(tmp, tensors, max_shard_size=options.max_shard_size)
        (tmp / "config.json").write_text(json.dumps(plan.out_config, indent=2, sort_keys=True) + "\n")
        if plan.tokenizer_folder is not None:
            for name in TOKENIZER_FILES:
                if (plan.tokenizer_folder / name).exists():
                    shutil.copy2(plan.tokenizer_folder / name, tmp / name)
        (tmp / "mergekit_config.yml").write_text(plan.config.text)
        (tmp / "README.md").write_text(model_card(plan))
    bar.close()
    return {"tensors": len(plan.tensors), "bytes": total, "seconds": time.perf_counter() - start, "files": files}


def _dt(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def merge_config_file(config_path: str | Path, out: str | Path, options: MergeOptions = MergeOptions()) -> dict:
    """Parse, plan (every check first) and run the merge of a mergekit YAML file into the folder `out`."""
    import yaml

    text = Path(config_path).read_text()
    cfg = parse_config(yaml.safe_load(text), text)
    out = Path(out)
    if out.exists() and not options.overwrite:
        raise ConfigError(f"--out {out} already exists; pass --overwrite to replace it")
    return run_merge(plan_merge(cfg), out, options)
