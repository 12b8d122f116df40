"""Multi-device training: one Mesh with ("data", "fsdp", "tensor", "expert") axes, logical axis rules for every
parameter, a jitted train step with explicit in/out shardings, and pmap data parallelism.

Shape legend: A accumulation micro-steps, B rows, S sequence, D hidden, V vocab, I/O a kernel's in/out
features, R LoRA rank, N weights of a 4-bit kernel, K its blocks.

Logical axes (what a dimension means) map to mesh axes (where it lives) through `RULES`:

    batch -> (data, fsdp, expert)   the rows of every batch (expert devices are data-parallel outside the MoE block)
    experts -> expert        the E axis of an MoE expert stack and of its LoRA factors (expert parallelism)
    embed -> fsdp            the hidden axis D of every weight (ZeRO-3 style: gathered where used)
    heads, kv_heads, mlp -> tensor   Megatron-style splits of q/k/v/o by head and gate/up/down by I
    vocab -> tensor          the embedding's and lm_head's V, when the tensor size divides it
    blocks -> (fsdp, tensor) the blocks of a 4-bit kernel's flat codes

Parameters (the canonical tree of models/llama.py; each family's linears and their axes are in
`models.families`):

    embed_tokens/embedding (V, D): (vocab, embed)      lm_head/kernel (D, V): (embed, vocab)
    q_proj (D, H*E): (embed, heads)   k_proj, v_proj (D, K*E): (embed, kv_heads)   o_proj: (heads, embed)
    gate_proj, up_proj (D, F): (embed, mlp)             down_proj (F, D): (mlp, embed)
    norms (D,), lora_scale (): replicated               bias (O,): like the kernel's O
    lora_a (I, R): (kernel's I, None)   lora_b (R, O): (None, kernel's O)   lora_magnitude (O,): kernel's O
    self_attn/prefix_{key,value} (P, K*E): (None, kv_heads)   prompt/embeddings (P, D): (None, embed)
    mlp/experts/{gate_up_proj,down_proj}/{weight (E, 2I, D) | (E, D, I), lora_a (E, R, I), lora_b (E, O, R)}:
        (experts, None, None): each expert device holds E / expert whole experts, replicated over the other axes;
        the MoE block sends tokens to them (`kernels.moe.expert_parallel`), so no expert weight is gathered.
        Without an expert axis the stacks are replicated.

A quantized kernel (`qkernel`, any `QuantizedKernel`) shards itself along its storage units over
fsdp x tensor, or over one of them, whichever divides their count (the first that does, in that order);
when none does, the kernel is replicated and a log line says so. A 4-bit kernel splits its packed codes
((N + 1) // 2, 1) and per-block absmax (K,) in contiguous runs of whole blocks; the nested absmax and
offset of double quantization are a few bytes and stay replicated. Leaves the rules do not know (another method's adapter) are replicated and
logged. A tensor-parallel dimension that the tensor axis does not divide (heads, kv heads, the MLP
width), or a hidden size that fsdp does not divide, is a ConfigError; the vocabulary alone falls back
to replication.

`--parallel=pmap` replicates the state on every local device, splits each micro-batch's rows over them
and sums the gradients with `psum` (each device's loss is already divided by the global target count,
so this is the single-device gradient; with equal counts per device it is the pmean of the per-device
means).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Mapping

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxpeft.convert.stream import Placement
from jaxpeft.core.errors import ConfigError, bullet_list
from jaxpeft.core.tree import Path, flatten_params, unflatten_params
from jaxpeft.kernels.moe.expert_parallel import EXPERT_AXIS, TOKEN_AXES
from jaxpeft.models.families import kernel_axes
from jaxpeft.quant.protocol import QuantizedKernel

AXES = ("data", "fsdp", "tensor", EXPERT_AXIS)
BATCH_AXES = TOKEN_AXES  # ("data", "fsdp", "expert")
PARALLEL_MODES = ("jit", "pmap")
RULES: dict[str, tuple[str, ...]] = {
    "batch": BATCH_AXES, "embed": ("fsdp",), "vocab": ("tensor",), "heads": ("tensor",),
    "kv_heads": ("tensor",), "mlp": ("tensor",), "blocks": ("fsdp", "tensor"),
    "experts": (EXPERT_AXIS,),
}
EXPERT_STACKS = ("gate_up_proj", "down_proj")
KERNEL_AXES = kernel_axes()  # {linear module name: (I, O) logical axes}, from the family table
_BLOCK_AXES_CHOICES = (("fsdp", "tensor"), ("fsdp",), ("tensor",))


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """How a run uses its devices: `mesh` like "data:2,fsdp:2,tensor:2" (None: every device on data;
    an axis left out has size 1, except data, which takes the devices the others leave), `parallel`
    "jit" (the mesh) or "pmap" (data parallelism over the local devices; `mesh` must be None)."""

    mesh: str | None = None
    parallel: str = "jit"

    def __post_init__(self) -> None:
        if self.parallel not in PARALLEL_MODES:
            raise ConfigError(f"--parallel={self.parallel!r}: expected one of {list(PARALLEL_MODES)}")
        if self.parallel == "pmap" and self.mesh:
            raise ConfigError(f"--parallel=pmap splits the batch over every local device and takes no --mesh "
                              f"(got --mesh={self.mesh}); drop --mesh, or use --parallel=jit for a mesh.")


def resolve_parallel(mesh: str | None, parallel: str = "jit") -> ParallelConfig | None:
    """The run's ParallelConfig, or None for the plain single-device path (one device, no --mesh, jit)."""
    cfg = ParallelConfig(mesh=mesh or None, parallel=parallel)
    if cfg.mesh is None and cfg.parallel == "jit" and jax.device_count() == 1:
        return None
    return cfg


def parse_mesh(text: str | None, num_devices: int) -> dict[str, int]:
    """{"data": d, "fsdp": f, "tensor": t, "expert": x} from "data:2,fsdp:2,tensor:2" (or "expert:4", ...);
    d * f * t * x == num_devices."""
    sizes: dict[str, int] = {}
    problems = []
    for part in [p.strip() for p in (text or "").split(",") if p.strip()]:
        m = re.fullmatch(r"(\w+):(\d+)", part)
        if not m:
            problems.append(f"{part!r}: expected <axis>:<size>, e.g. fsdp:2")
        elif m.group(1) not in AXES:
            problems.append(f"{part!r}: unknown axis {m.group(1)!r} (axes: {', '.join(AXES)})")
        elif m.group(1) in sizes:
            problems.append(f"{part!r}: axis {m.group(1)} given twice")
        elif int(m.group(2)) < 1:
            problems.append(f"{part!r}: an axis size must be at least 1")
        else:
            sizes[m.group(1)] = int(m.group(2))
    if problems:
        raise ConfigError(f"--mesh={text}:\n" + bullet_list(problems))
    others = math.prod(sizes.get(a, 1) for a in AXES if a != "data")
    if "data" not in sizes:
        if num_devices % others:
            named = " x ".join(f"{a}:{sizes[a]}" for a in AXES if a in sizes)
            raise ConfigError(f"--mesh={text}: {named} = {others} devices does not divide the {num_devices} "
                              "devices, so data cannot take the rest; choose sizes whose product divides "
                              f"{num_devices}.")
        sizes["data"] = num_devices // others
    total = sizes["data"] * others
    if total != num_devices:
        named = " x ".join(f"{a}:{sizes.get(a, 1)}" for a in AXES if a != EXPERT_AXIS or a in sizes)
        raise ConfigError(f"--mesh={text}: {named} = {total} devices, but there are {num_devices}; "
                          f"the axis sizes must multiply to {num_devices} (leave data out to let it take the rest).")
    return {a: sizes.get(a, 1) for a in AXES}


def make_mesh(text: str | None = None, devices: list | None = None) -> Mesh:
    """The ("data", "fsdp", "tensor", "expert") Mesh over `devices` (default: every device of every process).

    Built with `Mesh(...)`, whose axes are Auto (`jax.make_mesh` makes Explicit axes on JAX 0.10).
    Devices are laid out in `jax.devices()` order (process-major), so data is the axis that spans hosts.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh(text, len(devices))
    return Mesh(np.array(devices, dtype=object).reshape([sizes[a] for a in AXES]), AXES)


def mesh_sizes(mesh: Mesh) -> dict[str, int]:
    return {a: int(mesh.shape[a]) for a in AXES}


def check_model_fits(sizes: Mapping[str, int], config: Any, *, micro_rows: int | None = None) -> None:
    """Raises one ConfigError naming every mesh axis that does not divide the model dimension it splits."""
    t, f, x = sizes.get("tensor", 1), sizes.get("fsdp", 1), sizes.get(EXPERT_AXIS, 1)
    dims = [("tensor", t, "num_attention_heads", "attention heads (q_proj/o_proj are split by head)"),
            ("tensor", t, "num_key_value_heads", "kv heads (k_proj/v_proj are split by kv head)"),
            ("tensor", t, "intermediate_size", "MLP width (gate/up/down are split along it)"),
            ("fsdp", f, "hidden_size", "hidden size (every weight's D axis is sharded over fsdp)"),
            ("expert", x, "num_experts", "experts (each expert device holds experts / expert of them)")]
    problems = [f"{axis}:{size} does not divide the {getattr(config, name)} {what}"
                for axis, size, name, what in dims
                if getattr(config, name, None) is not None and getattr(config, name) % size]
    rows = sizes.get("data", 1) * f * x
    if micro_rows is not None and micro_rows % rows:
        names, counts = ("data x fsdp x expert", f"{sizes.get('data', 1)} x {f} x {x}") if x > 1 else (
            "data x fsdp", f"{sizes.get('data', 1)} x {f}")
        problems.append(f"{names} = {counts} = {rows} devices share each micro-batch, "
                        f"which has {micro_rows} rows (batch_size / grad_accum); use a multiple of {rows}")
    if problems:
        mesh = ",".join(f"{a}:{sizes.get(a, 1)}" for a in AXES)
        raise ConfigError(f"the mesh {mesh} does not fit this model or batch:\n" + bullet_list(problems)
                          + "\nChoose axis sizes that divide these dimensions.")


# ---- logical axes and shardings ----------------------------------------------------------------------

def _leaf_logical(path: Path) -> tuple | None:
    """Logical axes of an array leaf from its path; None when the rules do not know the leaf."""
    leaf, module = path[-1], path[-2] if len(path) > 1 else ""
    if leaf == "embedding" and module == "embed_tokens":
        return ("vocab", "embed")
    if leaf == "weight" and module.endswith("norm"):
        return (None,)
    if leaf == "lora_scale":
        return ()
    if leaf in ("prefix_key", "prefix_value") and module == "self_attn":  # prefix tuning (P, K*E)
        return (None, "kv_heads")
    if leaf == "embeddings" and module == "prompt":  # prompt tuning (P, D)
        return (None, "embed")
    if leaf in ("weight", "lora_a", "lora_b") and module in EXPERT_STACKS and len(path) > 2 and path[-3] == "experts":
        return ("experts", None, None)
    kernel = KERNEL_AXES.get(module)
    if kernel is None:
        return None
    i, o = kernel
    return {"kernel": (i, o), "bias": (o,), "lora_a": (i, None), "lora_b": (None, o),
            "lora_magnitude": (o,)}.get(leaf)


def _spec(logical: tuple, shape: tuple[int, ...], sizes: Mapping[str, int]) -> tuple[P, bool]:
    """(PartitionSpec, every named dimension was divisible); an indivisible dimension is replicated."""
    out, ok = [], True
    for name, dim in zip(logical, shape):
        axes = tuple(a for a in RULES.get(name, ()) if sizes.get(a, 1) > 1) if name else ()
        if axes and dim % math.prod(sizes[a] for a in axes):
            axes, ok = (), False
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out), ok


def param_specs(params: Mapping, sizes: Mapping[str, int], *, log: bool = True) -> dict:
    """A tree of PartitionSpecs (for a quantized kernel, its own structure of specs) for `params` (arrays or
    ShapeDtypeStructs) on a mesh of `sizes`."""
    flat, unknown, replicated_q, replicated_vocab = {}, [], [], []
    for path, leaf in flatten_params(params).items():
        if isinstance(leaf, QuantizedKernel):
            flat[path], ok = leaf.partition_specs(sizes, _BLOCK_AXES_CHOICES)
            if not ok and sizes.get("fsdp", 1) * sizes.get("tensor", 1) > 1:
                replicated_q.append("/".join(path))
            continue
        logical = _leaf_logical(path)
        if logical is None or len(logical) != len(leaf.shape):
            unknown.append("/".join(path))
            flat[path] = P()
            continue
        flat[path], ok = _spec(logical, tuple(leaf.shape), sizes)
        if not ok:
            if "vocab" not in logical:
                raise ConfigError(f"{'/'.join(path)} {tuple(leaf.shape)}: its axes {logical} map to mesh axes "
                                  f"that do not divide them on the mesh {dict(sizes)}; choose other axis sizes.")
            replicated_vocab.append("/".join(path))
    if log:
        if replicated_q:
            logging.info("4-bit kernels replicated (their block count is divisible by neither fsdp x tensor, fsdp "
                         "nor tensor): %d, e.g. %s", len(replicated_q), replicated_q[0])
        if replicated_vocab:
            logging.info("vocabulary not divisible by tensor:%d, replicated: %s", sizes.get("tensor", 1),
                         ", ".join(replicated_vocab))
        if unknown:
            logging.info("leaves without a sharding rule, replicated: %d, e.g. %s", len(unknown), unknown[0])
    return unflatten_params(flat)


def to_shardings(specs: Any, mesh: Mesh) -> Any:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def param_shardings(params: Mapping, mesh: Mesh, *, log: bool = True) -> dict:
    """NamedShardings for every leaf of `params` on `mesh` (see the module docstring for the rules)."""
    return to_shardings(param_specs(params, mesh_sizes(mesh), log=log), mesh)


def state_shardings(abstract_state: Any, trainable_shardings: Mapping, mesh: Mesh) -> Any:
    """Shardings of a train state {params, opt_state, step, rng}: every leaf whose key path ends with a
    trainable leaf's path and has its shape (Adam's mu and nu) is sharded like it; the rest replicated."""
    by_path = {p: s for p, s in flatten_params(trainable_shardings).items()}
    replicated = NamedSharding(mesh, P())

    def pick(keypath, leaf):
        keys = tuple(str(k.key) for k in keypath if isinstance(k, jax.tree_util.DictKey))
        for start in range(len(keys)):
            if keys[start:] in by_path:
                return by_path[keys[start:]]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, abstract_state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Micro-batches (A, B, S): rows over data x fsdp x expert."""
    return NamedSharding(mesh, P(None, BATCH_AXES))


def place(tree: Any, shardings: Any) -> Any:
    """`tree` on `shardings`, one shard per device (a host array never lands whole on one device).
    Works across processes: every process passes the same values."""

    def put(sharding, x):
        if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
            return x  # already in place (e.g. loaded onto its shards): no copy
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return jax.jit(lambda v: v, out_shardings=sharding)(x)
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree.map(put, shardings, tree)


class MeshPlacement(Placement):
    """Where the loader (`convert.stream.load_params`) puts each weight on `mesh`: its final sharding by the
    rules above, so a sharded run never holds a whole base weight on one device, and a process reads only
    the slices its own devices hold."""

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh

    def _shardings(self, path: Path, leaf: Any) -> Any:
        one = param_shardings(unflatten_params({path: leaf}), self.mesh, log=False)
        for key in path:
            one = one[key]
        return one

    def sharding(self, path: Path, abstract: Any) -> Any:
        return self._shardings(path, abstract)

    def put(self, path: Path, leaf: Any) -> Any:
        return place(leaf, self._shardings(path, leaf))


def init_params(init_fn: Callable[[jax.Array], Mapping], key: jax.Array, mesh: Mesh) -> dict:
    """Random parameters created sharded: shapes from `jax.eval_shape`, then `init_fn` jitted with the
    rules' out_shardings, so no device ever holds the whole model. `init_fn(key)` returns the params,
    e.g. `lambda k: model.init(k, jnp.zeros((1, 8), jnp.int32))["params"]`."""
    abstract = jax.eval_shape(init_fn, key)
    return jax.jit(init_fn, out_shardings=param_shardings(abstract, mesh))(key)
