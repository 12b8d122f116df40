"""MoE expert tensors between checkpoint files and the fused tree (`models/moe.py`).

Files (the Hub's, and what transformers 5.24's `save_pretrained` writes) name every expert on its own, in torch
layout: Mixtral `block_sparse_moe.experts.<e>.w1` (gate, (I, H)), `w3` (up), `w2` (down, (H, I)) and
`block_sparse_moe.gate`; Qwen3-MoE `mlp.experts.<e>.{gate,up,down}_proj` and `mlp.gate`. transformers' in-memory
model (what `from_transformers` reads) holds them fused: `mlp.experts.gate_up_proj` (E, 2I, H) = the experts' gate
rows then up rows, stacked, and `mlp.experts.down_proj` (E, H, I). The tree holds the fused form under
`mlp.experts.<param>.weight`.

`fused_view(state, config)` shows any of those sources under the tree's names (each fused tensor stacked when it
is looked up, one expert at a time read); `file_tensors(tensors, config)` turns a writer's fused tensors back into
the files' per-expert names, each built when its group is asked for.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import numpy as np

from jaxpeft.convert.shards import TensorSpec, Tensors
from jaxpeft.convert.stream import TensorInfo
from jaxpeft.core.errors import CheckpointError
from jaxpeft.models.families import family_of


def _parts(config: Any):
    """(family, [(layer prefix, our experts prefix)]) over the sparse layers."""
    family = family_of(config.model_type)
    layers = [i for i in range(config.num_hidden_layers) if config.is_sparse_layer(i)]
    return family, [(family.layer_prefix(i), f"{family.layer_prefix(i)}.{family.experts.experts}") for i in layers]


class FusedView(Mapping[str, np.ndarray]):
    """A checkpoint (lazy or eager) under the tree's names: fused expert stacks and the router at `mlp.gate`."""

    def __init__(self, state: Mapping[str, np.ndarray], config: Any) -> None:
        self._state = state
        family, layers = _parts(config)
        ex = family.experts
        self._build: dict[str, Any] = {}  # our name -> () -> array
        self._shape: dict[str, tuple[int, ...]] = {}
        hidden = set(state)
        e, i, h = config.num_experts, config.moe_intermediate_size, config.hidden_size
        for layer, ours in layers:
            router_file = f"{layer}.{ex.file_router}.weight"
            router_ours = f"{layer}.{ex.router.name}.weight"
            if router_file != router_ours and router_file in hidden:
                self._alias(router_ours, router_file)
                hidden.discard(router_file)
            for param, parts in (("gate_up_proj", ("gate", "up")), ("down_proj", ("down",))):
                name = f"{ours}.{param}.weight"
                fused = f"{ours}.{param}"  # transformers' in-memory name
                per_expert = [[f"{layer}.{ex.file_experts[p].format(e=k)}.weight" for p in parts] for k in range(e)]
                flat = [n for names in per_expert for n in names]
                if fused in hidden:
                    self._alias(name, fused)
                    hidden.discard(fused)
                elif all(n in hidden for n in flat):
                    self._build[name] = lambda per_expert=per_expert: np.stack(
                        [np.concatenate([np.asarray(state[n]) for n in names], axis=0) for names in per_expert])
                    hidden -= set(flat)
                else:
                    continue  # left missing: hf_to_params names it
                self._shape[name] = (e, 2 * i, h) if param == "gate_up_proj" else (e, h, i)
        self._plain = hidden
        info = getattr(state, "info", None)
        if info is not None:  # a lazy checkpoint's header: shapes and dtypes without reading
            dtype_of = {n: info[n].dtype for n in info}
            self.info = {n: info[n] for n in hidden}
            for name, shape in self._shape.items():
                src = next(iter(info.values()))
                self.info[name] = TensorInfo(src.file, shape, dtype_of.get(self._source(name), src.dtype))

    def _alias(self, ours: str, theirs: str) -> None:
        self._build[ours] = lambda: self._state[theirs]
        self._build[ours].source = theirs  # type: ignore[attr-defined]
        info = getattr(self._state, "info", None)
        self._shape[ours] = tuple(info[theirs].shape) if info is not None else tuple(np.shape(self._state[theirs]))

    def _source(self, name: str) -> str:
        return getattr(self._build[name], "source", "")

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self._build:
            return self._build[name]()
        if name in self._plain:
            return self._state[name]
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        yield from self._plain
        yield from self._build

    def __len__(self) -> int:
        return len(self._plain) + len(self._build)


def fused_view(state: Mapping[str, np.ndarray], config: Any) -> Mapping[str, np.ndarray]:
    """`state` under the tree's names when `config` is an MoE family's; `state` itself otherwise."""
    if family_of(config.model_type).experts is None:
        return state
    return FusedView(state, config)


def file_tensors(tensors: Tensors, config: Any) -> Tensors:
    """A writer's tensors with every fused expert stack (`...mlp.experts.<param>.weight`) replaced by the files'
    per-expert tensors and the router renamed to the files' name (module docstring)."""
    family = family_of(config.model_type)
    if family.experts is None:
        return tensors
    ex = family.experts
    rename: dict[str, str] = {}
    splits: dict[str, list[tuple[str, int, slice]]] = {}  # fused name -> [(file name, expert, rows)]
    i = config.moe_intermediate_size
    _, layers = _parts(config)
    for layer, ours in layers:
        rename[f"{layer}.{ex.router.name}.weight"] = f"{layer}.{ex.file_router}.weight"
        for k in range(config.num_experts):
            name = lambda part: f"{layer}.{ex.file_experts[part].format(e=k)}.weight"  # noqa: E731
            splits.setdefault(f"{ours}.gate_up_proj.weight", []).extend(
                [(name("gate"), k, slice(0, i)), (name("up"), k, slice(i, 2 * i))])
            splits.setdefault(f"{ours}.down_proj.weight", []).append((name("down"), k, slice(None)))
    groups = []
    missing = sorted(set(splits) - set(tensors.names()))
    if missing:
        raise CheckpointError(f"the tree lacks expert stacks {missing[:4]}; an MoE export needs every sparse layer's")
    for spec in tensors.specs:
        if spec.name in splits:
            parts = splits[spec.name]
            specs = [TensorSpec(n, spec.shape[1:] if s == slice(None) else (s.stop - s.start, spec.shape[2]),
                                spec.dtype) for n, _, s in parts]

            def build(fused=spec.name, parts=parts):
                stack = tensors.get(fused)
                return {n: np.ascontiguousarray(stack[k][s]) for n, k, s in parts}

            groups.append((specs, build))
        else:
            new = rename.get(spec.name, spec.name)
            groups.append(([TensorSpec(new, spec.shape, spec.dtype)],
                           lambda old=spec.name, new=new: {new: tensors.get(old)}))
    return Tensors(groups)
