"""Streaming, sharded safetensors writing: a model's tensors go to disk one at a time.

A `Tensors` is a lazy state dict: every tensor's name, shape and dtype is known ahead (the safetensors
header, which holds every tensor's offsets, comes first in the file), and the values are made on demand,
one group at a time (a group is e.g. one module's weight and bias, built by merging an adapter into it).
`save_shards` writes them as transformers' `save_pretrained` lays a checkpoint out: one
`model.safetensors`, or past `max_shard_size` bytes several `model-00001-of-00003.safetensors` plus
`model.safetensors.index.json`. Each tensor is written as soon as it is made and dropped before the next
one is asked for, so at most one group (plus I/O buffers) is ever held.

The file format (safetensors' spec): an 8-byte little-endian header length N, then N bytes of JSON
(`{"__metadata__": {...}, name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, ...}`,
compact, padded with spaces to a multiple of 8), then the tensors' raw little-endian bytes back to back.
The safetensors library orders the tensors by dtype (its dtype enumeration, descending: U64, I64, F64,
F32, U32, I32, BF16, F16, U16, I16, I8, U8, BOOL), then by name, in the header and the data alike; this
writer uses the same order, so a single file is byte-identical to `safetensors.numpy.save_file`'s
(tests/test_shards.py checks it against the library). Sharding follows transformers 5.24 (huggingface_hub's
`split_state_dict_into_shards_factory`): tensors are taken in the given order; one that would tip the
current shard over the limit starts a new shard; one bigger than the limit gets a shard of its own.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from jaxpeft.core.atomic import atomic_file

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
# The Hub's long-standing shard size (transformers 4.x's `save_pretrained` default): a 7B bf16 model is 3
# files. transformers 5.24 raised its own default to "50GB" (one file up to 50 GB); it loads both.
DEFAULT_MAX_SHARD_SIZE = "5GB"
_SIZE_UNITS = {"TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3}  # huggingface_hub's: decimal units

# numpy dtype name -> safetensors code, in the safetensors dtype enumeration's order (ascending).
SAFETENSORS_CODES = {"bool": "BOOL", "uint8": "U8", "int8": "I8", "int16": "I16", "uint16": "U16",
                     "float16": "F16", "bfloat16": "BF16", "int32": "I32", "uint32": "U32", "float32": "F32",
                     "float64": "F64", "int64": "I64", "uint64": "U64"}
_RANK = {name: i for i, name in enumerate(SAFETENSORS_CODES)}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """A tensor's name, shape and dtype, known before its values are made."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        object.__setattr__(self, "dtype", np.dtype(self.dtype))
        if self.dtype.name not in SAFETENSORS_CODES:
            raise ValueError(f"tensor {self.name}: dtype {self.dtype.name} has no safetensors code; "
                             f"supported: {sorted(SAFETENSORS_CODES)}")

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


Group = tuple[Sequence[TensorSpec], Callable[[], Mapping[str, Any]]]


class Tensors:
    """A lazy state dict: `specs` (in shard-assignment order) and `get(name)`, which makes values on demand.

    Built from groups `(specs, build)`: `build()` returns the group's arrays by name. `get` builds the
    group of the tensor asked for and keeps the group's other tensors until they are taken (or another
    group is built), so a module's weight and bias come from one merge. Nothing is made ahead.
    """

    def __init__(self, groups: Iterable[Group]) -> None:
        self._groups: list[Group] = []
        self._group_of: dict[str, int] = {}
        specs: list[TensorSpec] = []
        for specs_i, build in groups:
            specs_i = list(specs_i)
            for s in specs_i:
                if s.name in self._group_of:
                    raise ValueError(f"tensor {s.name} is declared twice")
                self._group_of[s.name] = len(self._groups)
            self._groups.append((specs_i, build))
            specs += specs_i
        self.specs: tuple[TensorSpec, ...] = tuple(specs)
        self._cache: dict[str, Any] = {}
        self._cached_group: int | None = None

    @classmethod
    def from_mapping(cls, state: Mapping[str, Any]) -> Tensors:
        """Each value of an (eager) state dict as its own group; shapes and dtypes read from the values."""
        return cls(([TensorSpec(k, np.shape(v), _dtype_of(v))], lambda k=k: {k: state[k]}) for k, v in state.items())

    @classmethod
    def concat(cls, parts: Iterable[Tensors]) -> Tensors:
        """The tensors of every part, in the parts' order."""
        parts = list(parts)
        return cls(g for p in parts for g in p._groups)._with_specs([s for p in parts for s in p.specs])

    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    def reordered(self, key: Callable[[TensorSpec], Any]) -> Tensors:
        """The same tensors with `specs` sorted by `key` (the order shards are filled in; files keep theirs)."""
        return Tensors(self._groups)._with_specs(sorted(self.specs, key=key))

    def without(self, names: Iterable[str]) -> Tensors:
        """The same tensors minus `names`, in the same order (a dropped tensor's group is still built when a
        kept tensor shares it)."""
        drop = set(names)
        return Tensors(self._groups)._with_specs([s for s in self.specs if s.name not in drop])

    def _with_specs(self, specs: Iterable[TensorSpec]) -> Tensors:
        self.specs = tuple(specs)
        return self

    def get(self, name: str) -> np.ndarray:
        """The array of tensor `name` (numpy), built now if its group is not the one held."""
        index = self._group_of[name]
        if self._cached_group != index or name not in self._cache:
            self._cache, self._cached_group = {}, None  # drop the held group before building the next one
            self._cache = dict(self._groups[index][1]())
            self._cached_group = index
            if name not in self._cache:
                raise ValueError(f"tensor {name}: its group made only {sorted(self._cache)} (a bug in the producer)")
        value = self._cache.pop(name)
        if not self._cache:
            self._cached_group = None
        return np.asarray(value)

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        """(name, array) in spec order: for callers that want the whole dict (`dict(t.items())`)."""
        for s in self.specs:
            yield s.name, self.get(s.name)


def _dtype_of(value: Any) -> np.dtype:
    dtype = getattr(value, "dtype", None)  # jax and numpy arrays: no conversion needed to know it
    return np.dtype(dtype if dtype is not None else np.asarray(value).dtype)


def as_tensors(state: Mapping[str, Any] | Tensors) -> Tensors:
    return state if isinstance(state, Tensors) else Tensors.from_mapping(state)


def parse_size(size: int | str) -> int:
    """Bytes of a size given as an int or as huggingface_hub writes it ("50GB", "20KB": decimal units)."""
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        value = int(size)
    else:
        text = str(size).strip()
        unit = text[-2:].upper()
        try:
            value = int(float(text[:-2]) * _SIZE_UNITS[unit])
        except (KeyError, ValueError):
            raise ValueError(f"max_shard_size {size!r}: expected bytes (an int) or a number with one of the units "
                             f"{list(_SIZE_UNITS)}, e.g. '5GB'") from None
    if value <= 0:
        raise ValueError(f"max_shard_size {size!r} must be positive")
    return value


def file_order(specs: Sequence[TensorSpec]) -> list[TensorSpec]:
    """The order safetensors stores tensors in: dtype (its enumeration, descending), then name."""
    return sorted(specs, key=lambda s: (-_RANK[s.dtype.name], s.name))


def plan_shards(specs: Sequence[TensorSpec], max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE
                ) -> list[list[TensorSpec]]:
    """Splits `specs` (in order) into shards of at most `max_shard_size` bytes, as transformers does."""
    limit = parse_size(max_shard_size)
    shards: list[list[TensorSpec]] = []
    current: list[TensorSpec] = []
    size = 0
    for s in specs:
        if s.nbytes > limit:  # alone in its own shard; the current shard stays open
            shards.append([s])
            continue
        if size + s.nbytes > limit and current:
            shards.append(current)
            current, size = [], 0
        current.append(s)
        size += s.nbytes
    if current or not shards:
        shards.append(current)
    return shards


def shard_file_names(count: int, weights_name: str = WEIGHTS_NAME) -> list[str]:
    """transformers' shard names: `model.safetensors` alone, else `model-00001-of-0000N.safetensors`."""
    if count == 1:
        return [weights_name]
    stem, ext = os.path.splitext(weights_name)
    return [f"{stem}-{i + 1:05d}-of-{count:05d}{ext}" for i in range(count)]


def header_bytes(specs: Sequence[TensorSpec], metadata: Mapping[str, str] | None = None) -> bytes:
    """The length prefix and padded JSON header of a safetensors file holding `specs` (in file order)."""
    header: dict[str, Any] = {}
    if metadata is not None:
        header["__metadata__"] = {str(k): str(metadata[k]) for k in sorted(metadata)}
    offset = 0
    for s in specs:
        header[s.name] = {"dtype": SAFETENSORS_CODES[s.dtype.name], "shape": list(s.shape),
                          "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, Any] | Tensors, *,
                      names: Sequence[str] | None = None, metadata: Mapping[str, str] | None = None) -> int:
    """Writes `names` (default all) of `tensors` as one safetensors file, atomically; returns its size.

    Tensors are asked for one at a time in file order, each written and dropped before the next is made.
    A produced array must match its declared shape and dtype (a mismatch is a producer bug, raised).
    """
    tensors = as_tensors(tensors)
    by_name = {s.name: s for s in tensors.specs}
    specs = file_order([by_name[n] for n in names] if names is not None else tensors.specs)
    head = header_bytes(specs, metadata)
    with atomic_file(path, "wb") as f:
        f.write(head)
        f.flush()
        for s in specs:
            array = tensors.get(s.name)
            if array.shape != s.shape or array.dtype != s.dtype:
                raise ValueError(f"tensor {s.name}: made as {array.dtype.name}{list(array.shape)}, declared "
                                 f"{s.dtype.name}{list(s.shape)} (a bug in the tensors' producer)")
            if array.dtype.byteorder == ">" or (array.dtype.byteorder == "=" and sys.byteorder == "big"):
                array = array.byteswap().view(array.dtype.newbyteorder("<"))
            f.write(memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8)))
            f.flush()  # the bytes leave this process before the next tensor is made
            del array
    return len(head) + sum(s.nbytes for s in specs)


def save_shards(folder: str | os.PathLike, tensors: Mapping[str, Any] | Tensors, *,
                max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, weights_name: str = WEIGHTS_NAME,
                metadata: Mapping[str, str] | None = None, total_parameters: int | None = None) -> list[str]:
    """Writes `tensors` into `folder` as one file or shards plus an index (transformers' layout and names).

    `metadata` goes into every file's header (default `{"format": "pt"}`, as transformers writes);
    the index's metadata holds `total_size` (bytes of tensor data) and `total_parameters` (default: the
    element count of every tensor). Returns the names of the files written, the index last.
    """
    tensors = as_tensors(tensors)
    metadata = {"format": "pt"} if metadata is None else metadata
    shards = plan_shards(tensors.specs, max_shard_size)
    files = shard_file_names(len(shards), weights_name)
    folder = Path(folder)
    for file, shard in zip(files, shards):
        write_safetensors(folder / file, tensors, names=[s.name for s in shard], metadata=metadata)
    if len(shards) == 1:
        return files
    if total_parameters is None:
        total_parameters = sum(int(np.prod(s.shape, dtype=np.int64)) for s in tensors.specs)
    index = {"metadata": {"total_parameters": int(total_parameters),
                          "total_size": sum(s.nbytes for s in tensors.specs)},
             "weight_map": {s.name: file for file, shard in zip(files, shards) for s in shard}}
    index_name = weights_name.replace(".safetensors", ".safetensors.index.json")
    with atomic_file(folder / index_name) as f:
        f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return files + [index_name]
