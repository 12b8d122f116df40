"""What the Trainer runs its step on: one runner, `MeshRunner`, for every layout. One device is a mesh of
one; `--parallel=pmap` (plain data parallelism: the state replicated on every device, each micro-batch's
rows split over them, the gradients summed) is the mesh with every device on `data`, which computes the
same step as `jax.pmap` did. The step is compiled ahead of its first run, once per batch shape, and the
compiler's freed memory goes back to the OS before the step allocates its buffers.

The runner holds the placed frozen base (`frozen`) and the first train state (`initial_state`), and places
a restored state (`import_state`). Shardings and meshes themselves are `jaxpeft.train.sharding`'s.

Shape legend: A accumulation micro-steps, B rows, S sequence.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxpeft.core.errors import ConfigError
from jaxpeft.kernels.moe.expert_parallel import EXPERT_AXIS, expert_parallel
from jaxpeft.train.sharding import (ParallelConfig, batch_sharding, check_model_fits, make_mesh, mesh_sizes,
                                    param_shardings, place, state_shardings)


def release_freed_memory() -> None:
    """Returns memory freed inside the process to the OS (glibc's malloc_trim; a no-op elsewhere).

    XLA's compiler and a fp32 load before quantization free hundreds of MB that glibc otherwise keeps
    mapped; without this they add to the process peak of the steps that follow."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        trim = getattr(libc, "malloc_trim", None)
    except OSError:
        trim = None
    if trim is not None:
        trim(0)


class AheadOfTime:
    """A jitted step(state, frozen, batch), compiled ahead of its first run for each batch shape.

    Compiling apart from running lets the compiler's freed working memory go back to the OS before the
    step allocates its buffers, so the two peaks do not stack (SmolLM2 QLoRA: the process peak during
    steps fell from 2.59 to 2.28 GB, `/tmp`-probe figures in BUILD_NOTES.md)."""

    def __init__(self, fn: Any) -> None:
        self._fn = fn
        self._compiled: dict[tuple, Callable] = {}
        self._ran: set[tuple] = set()

    @staticmethod
    def _key(batch: Mapping[str, Any]) -> tuple:
        return tuple((k, v.shape, str(v.dtype)) for k, v in sorted(batch.items()))

    def compile(self, state: Any, frozen: Any, batch: Mapping[str, Any]) -> Any:
        """The compiled step for this batch shape (compiled once, then cached); its `memory_analysis()` is
        the step's plan, known before anything runs."""
        return self._compiled_for(self._key(batch), state, frozen, batch)

    def _compiled_for(self, key: tuple, state: Any, frozen: Any, batch: Mapping[str, Any]) -> Any:
        if key not in self._compiled:
            self._compiled[key] = self._fn.lower(state, frozen, batch).compile()
            release_freed_memory()
        return self._compiled[key]

    def __call__(self, state: Any, frozen: Any, batch: Mapping[str, Any]) -> tuple[Any, dict]:
        key = self._key(batch)
        compiled = self._compiled_for(key, state, frozen, batch)
        if key not in self._ran:
            # Trimmed again before a shape's first run: part of the compiler's memory is freed only after
            # compile() returns, and glibc keeps it mapped until asked (SmolLM2 LoRA at 2k tokens: the RSS
            # after compiling fell from 2.61 to 1.83 GB at this second trim).
            self._ran.add(key)
            release_freed_memory()
        return compiled(state, frozen, batch)


class MeshRunner:
    """The state and frozen base as global arrays on `mesh`; the step jitted with explicit shardings."""

    def __init__(self, mesh: Mesh, step_fn: Callable, tx: Any, trainable: Mapping, frozen: Mapping,
                 seed: int) -> None:
        self.mesh = mesh
        frozen_sh = param_shardings(frozen, mesh)
        trainable_sh = param_shardings(trainable, mesh)
        self.frozen = place(frozen, frozen_sh)

        def init(params):
            return {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0),
                    "rng": jax.random.PRNGKey(seed)}

        self.state_sh = state_shardings(jax.eval_shape(init, trainable), trainable_sh, mesh)
        # A jitted init: the optimizer state is created sharded and the params are fresh (donatable) buffers.
        self.initial_state = jax.jit(init, out_shardings=self.state_sh)(place(trainable, trainable_sh))
        self._batch_sh = batch_sharding(mesh)
        replicated = NamedSharding(mesh, P())
        if int(mesh.shape.get(EXPERT_AXIS, 1)) > 1:
            step_fn = _expert_parallel_step(step_fn, mesh)
        self._step = AheadOfTime(jax.jit(step_fn, donate_argnums=(0,),
                                         in_shardings=(self.state_sh, frozen_sh, self._batch_sh),
                                         out_shardings=(self.state_sh, replicated)))

    def step(self, state, frozen, micro):
        """One optimizer step on the micro-batches `micro` (A, B, S), every process passing the same rows."""
        batch = {k: place(np.asarray(v), self._batch_sh) for k, v in micro.items()}
        return self._step(state, frozen, batch)

    def compile(self, state, frozen, micro):
        """The compiled step for micro-batches of this shape (`AheadOfTime.compile`), without running it."""
        batch = {k: place(np.asarray(v), self._batch_sh) for k, v in micro.items()}
        return self._step.compile(state, frozen, batch)

    def import_state(self, state):
        """`state` (e.g. restored from a checkpoint saved on any mesh) placed on this runner's shardings."""
        return place(state, self.state_sh)


def _expert_parallel_step(step_fn: Callable, mesh: Mesh) -> Callable:
    """`step_fn` traced with the MoE blocks expert-parallel on `mesh` (`kernels.moe.expert_parallel`)."""

    def step(*args):
        with expert_parallel(mesh):
            return step_fn(*args)

    return step


def run_mesh(cfg: ParallelConfig | None) -> Mesh:
    """The mesh a run of `cfg` uses: None is a mesh of one, this process's first device (the default
    device); pmap is every device on data; otherwise `cfg.mesh`. Made before the base is loaded, so the
    loader can put each weight straight onto its shards."""
    if cfg is None:
        return make_mesh(None, devices=jax.local_devices()[:1])
    if cfg.parallel == "pmap":
        return make_mesh(f"data:{jax.device_count()}")
    return make_mesh(cfg.mesh)


def make_runner(cfg: ParallelConfig | None, *, model_config: Any, micro_rows: int, step_fn: Callable, tx: Any,
                trainable: Mapping, frozen: Mapping, seed: int, mesh: Mesh | None = None) -> MeshRunner:
    """The runner for `cfg` on `mesh` (default `run_mesh(cfg)`), after checking that the mesh fits the model
    and the batch."""
    mesh = run_mesh(cfg) if mesh is None else mesh
    if cfg is None:
        return MeshRunner(mesh, step_fn, tx, trainable, frozen, seed)
    if cfg.parallel == "pmap":
        n = jax.device_count()
        if micro_rows % n:
            raise ConfigError(f"--parallel=pmap splits each micro-batch's {micro_rows} rows over {n} devices; "
                              f"use a batch_size / grad_accum that is a multiple of {n}.")
        logging.info("pmap data parallelism over %d devices (%d local): the mesh data:%d", n,
                     jax.local_device_count(), n)
    else:
        check_model_fits(mesh_sizes(mesh), model_config, micro_rows=micro_rows)
        logging.info("mesh %s over %d devices (%d processes)", mesh_sizes(mesh), mesh.size, jax.process_count())
    return MeshRunner(mesh, step_fn, tx, trainable, frozen, seed)
