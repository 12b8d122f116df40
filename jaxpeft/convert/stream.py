"""Reading a checkpoint one tensor at a time, straight into its final form and place.

`Checkpoint` is a lazy, read-only mapping over an HF folder's safetensors files (one file, or shards with
their index): the headers are parsed up front (names, shapes, dtypes; no tensor data), and each
`checkpoint[name]` reads one tensor through a fresh `safe_open` handle that is closed right after. What the
OS counts matters at 7B: one handle kept open over a 2 GB shard leaves every page read so far resident
until it closes (measured: 2.03 GB RSS to iterate a 2 GB bf16 shard), a fresh handle per tensor keeps the
peak near one tensor (0.43 GB). `read_slice` reads only part of a tensor (safetensors' `get_slice`), so a
process of a sharded run reads only the slices its own devices hold; `requested` counts the bytes asked for.

`load_params` turns such a mapping into the canonical parameter tree: each tensor is transposed where
needed, cast to the stored dtype, quantized to 4 bits if it is a targeted linear (the full-precision
weight then never exists beyond that one tensor), and placed on one device or on the mesh with its final
sharding (`jax.make_array_from_callback`, reading per device only its slice), with a progress bar in
tensors and GB.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import struct
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
from absl import logging

from jaxpeft.convert.shards import SAFETENSORS_CODES
from jaxpeft.core.dtypes import SAFETENSORS_FLOATS, majority_float, numpy_dtype
from jaxpeft.core.errors import CheckpointError
from jaxpeft.core.tree import unflatten_params
from jaxpeft.quant import nf4

_NUMPY_NAMES = {code: name for name, code in SAFETENSORS_CODES.items()}  # safetensors code -> numpy dtype name
_MAX_HEADER = 100 * 1024 * 1024


def read_header(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """{name: {"dtype", "shape", "data_offsets"}} of one safetensors file, from its JSON header only."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise ValueError("the file is shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER:
                raise ValueError(f"its header claims {n} bytes")
            header = json.loads(f.read(n))
        size = path.stat().st_size
    except (OSError, ValueError) as e:
        raise CheckpointError(f"could not read {path}: {e}. The file is truncated or not a safetensors file; "
                              "download or export it again.") from e
    header.pop("__metadata__", None)
    end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{path} is truncated: its header describes {8 + n + end} bytes but the file has "
                              f"{size}; download or export it again.")
    return header


def _np_dtype(code: str) -> np.dtype:
    if code not in _NUMPY_NAMES:
        raise CheckpointError(f"safetensors dtype {code} is not supported here")
    name = _NUMPY_NAMES[code]
    return numpy_dtype(name) if name == "bfloat16" else np.dtype(name)


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: str  # the safetensors code: "BF16", "F32", ...

    @property
    def np_dtype(self) -> np.dtype:
        """The numpy dtype of the stored tensor (ml_dtypes' for bfloat16)."""
        return _np_dtype(self.dtype)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.np_dtype.itemsize


class Checkpoint(Mapping[str, np.ndarray]):
    """The tensors of safetensors `files`, read lazily one at a time (see the module docstring)."""

    def __init__(self, files: list[str | os.PathLike]) -> None:
        self.files = [Path(f) for f in files]
        self.info: dict[str, TensorInfo] = {}
        for path in self.files:
            for name, h in read_header(path).items():
                self.info[name] = TensorInfo(path, tuple(int(d) for d in h["shape"]), h["dtype"])
        self.requested = 0  # bytes of tensor data asked for (whole tensors and slices)
        self.requests: list[tuple[str, tuple, int]] = []  # (name, index, bytes) of every read_slice
        self.source: dict[str, str] = {}  # name -> its name in the file, where `renamed` changed it

    def renamed(self, names: Mapping[str, str | None]) -> "Checkpoint":
        """The same files seen under new names: `names[old]` is the new name, None leaves the tensor out
        (e.g. a vision tower); a name not in `names` keeps its own."""
        view = copy.copy(self)
        view.info, view.source = {}, {}
        for old, info in self.info.items():
            new = names.get(old, old)
            if new is not None:
                view.info[new], view.source[new] = info, self.source.get(old, old)
        return view

    def __getitem__(self, name: str) -> np.ndarray:
        info = self.info[name]
        with self._open(info.file) as f:
            array = f.get_tensor(self.source.get(name, name))
        self.requested += array.nbytes
        return array

    def read_slice(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """`checkpoint[name][index]`, reading only those elements."""
        info = self.info[name]
        with self._open(info.file) as f:
            stored = self.source.get(name, name)
            array = f.get_slice(stored)[index] if index else f.get_tensor(stored)
        array = np.asarray(array)
        self.requested += array.nbytes
        self.requests.append((name, index, array.nbytes))
        return array

    def _open(self, path: Path):
        from safetensors import safe_open

        try:
            return safe_open(str(path), framework="numpy")
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise CheckpointError(f"could not read {path}: {e}. The file is truncated or not a safetensors file; "
                                  "download or export it again.") from e

    def __contains__(self, name: object) -> bool:
        return name in self.info  # the headers only (Mapping's `in` would read the tensor)

    def __iter__(self) -> Iterator[str]:
        return iter(self.info)

    def __len__(self) -> int:
        return len(self.info)

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.info.values())

    def float_dtype(self) -> str | None:
        """The most common float dtype of the tensors (by count), e.g. "bfloat16"; None if there are none."""
        return majority_float(SAFETENSORS_FLOATS.get(i.dtype, "") for i in self.info.values())


# ---------------------------------------------------------------------------------------------- loading


@dataclasses.dataclass(frozen=True)
class QuantizeSpec:
    """Which linear modules to quantize as they are read, and how (bitsandbytes' 4-bit settings)."""

    modules: frozenset[tuple[str, ...]]
    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True


class _Progress:
    """A tqdm bar over bytes (GB, GB/s) with the tensor count; a summary log line at the end."""

    def __init__(self, total_bytes: int, total_tensors: int, desc: str, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.start, self.tensors, self.total_tensors = time.perf_counter(), 0, total_tensors
        self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1000, desc=desc,
                        disable=not enabled, dynamic_ncols=True, mininterval=0.5)
        self.desc, self.total = desc, total_bytes

    def update(self, nbytes: int) -> None:
        self.tensors += 1
        self.bar.update(nbytes)
        self.bar.set_postfix_str(f"{self.tensors}/{self.total_tensors} tensors", refresh=False)

    def close(self) -> float:
        self.bar.close()
        seconds = time.perf_counter() - self.start
        logging.info("%s: %d tensors, %.2f GB in %.1f s (%.2f GB/s)", self.desc, self.tensors, self.total / 1e9,
                     seconds, self.total / 1e9 / max(seconds, 1e-9))
        return seconds


class Placement:
    """Where `load_params` puts each leaf (the protocol; `train.sharding.MeshPlacement` is the mesh's).

    `sharding(path, abstract)` is the final sharding of the dense leaf at `path` (a ShapeDtypeStruct), or
    None to `put` it whole; `put(path, leaf)` places a leaf held by this process (a quantized kernel)."""

    def sharding(self, path: tuple[str, ...], abstract: Any) -> Any:
        return None

    def put(self, path: tuple[str, ...], leaf: Any) -> Any:
        import jax

        return jax.device_put(leaf)


def load_params(
    source: Mapping[str, np.ndarray],
    names: Mapping[str, tuple[tuple[str, ...], str]],
    *,
    param_dtype: Any,
    quantize: QuantizeSpec | None = None,
    placement: Placement | None = None,
    progress: bool = False,
    desc: str = "load",
) -> dict:
    """The parameter tree of `names` ({HF tensor name: (module path, leaf)}) read from `source` one tensor
    at a time. `param_dtype` (a numpy/jax dtype) is the stored dtype of float tensors; a kernel of a module
    in `quantize.modules` becomes a 4-bit `qkernel`; `placement` (default: the default device) gives each
    leaf its final place, each device's part read on its own where `source` can read slices."""
    target = np.dtype(param_dtype)
    placement = placement or Placement()
    sizes = _tensor_bytes(source, names)
    bar = _Progress(sum(sizes.values()), len(names), desc, progress)
    flat: dict[tuple[str, ...], Any] = {}
    for name in sorted(names):
        module, leaf = names[name]
        if quantize is not None and leaf == "kernel" and module in quantize.modules:
            path = module + ("qkernel",)
            flat[path] = placement.put(path, _quantized(source[name], target, quantize))
        else:
            path = module + (leaf,)
            flat[path] = _dense_leaf(source, name, path, leaf == "kernel", target, placement)
        bar.update(sizes[name])
    bar.close()
    return unflatten_params(flat)


def _tensor_bytes(source: Mapping, names: Mapping) -> dict[str, int]:
    info = getattr(source, "info", None)
    if info is not None:
        return {n: info[n].nbytes for n in names}
    return {n: int(np.asarray(source[n]).nbytes) for n in names}


def _cast(array: np.ndarray, target: np.dtype) -> np.ndarray:
    """Float tensors to the stored dtype; integer tensors as they are."""
    if array.dtype.kind == "f" or array.dtype == numpy_dtype("bfloat16"):
        return array.astype(target, copy=False)
    return array


def transposed(array: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of a 2-D array's transpose, copied in tiles (1.5x numpy's plain strided copy on
    an 11008 x 4096 bf16 weight here, as the tiles stay in cache)."""
    if array.ndim != 2 or array.size < 1 << 20:
        return np.ascontiguousarray(array.T)
    rows, cols = array.shape
    out = np.empty((cols, rows), array.dtype)
    tile_r, tile_c = 16, 128
    for i in range(0, rows, tile_r):
        block = array[i:i + tile_r]
        for j in range(0, cols, tile_c):
            out[j:j + tile_c, i:i + tile_r] = block[:, j:j + tile_c].T
    return out


def _dense_leaf(source: Mapping, name: str, path: tuple[str, ...], transpose: bool, target: np.dtype,
                placement: Placement) -> Any:
    import jax

    info = getattr(source, "info", {}).get(name)
    shape = None if info is None else (info.shape[::-1] if transpose else info.shape)
    dtype = target if info is None or info.dtype in SAFETENSORS_FLOATS else _np_dtype(info.dtype)
    sharding = None if shape is None else placement.sharding(path, jax.ShapeDtypeStruct(tuple(shape), dtype))
    if sharding is None or not hasattr(source, "read_slice"):
        array = _cast(np.asarray(source[name]), target)
        return placement.put(path, transposed(array) if transpose else np.ascontiguousarray(array))

    def read(index):
        index = tuple(index)
        part = _cast(source.read_slice(name, index[::-1] if transpose else index), target)
        return transposed(part) if transpose else np.ascontiguousarray(part)

    return jax.make_array_from_callback(tuple(shape), sharding, read)


def _quantized(weight_OxI: np.ndarray, target: np.dtype, spec: QuantizeSpec) -> Any:
    """A torch-layout [O, I] weight quantized as bitsandbytes does (row-major blocks of the [O, I] bytes),
    held as the (I, O) kernel it is in the tree."""
    import jax.numpy as jnp

    q = nf4.quantize_4bit(jnp.asarray(_cast(np.asarray(weight_OxI), target)), quant_type=spec.quant_type,
                          blocksize=spec.blocksize, double_quant=spec.double_quant)
    return dataclasses.replace(q, shape=tuple(q.shape[::-1]), transposed=True)
