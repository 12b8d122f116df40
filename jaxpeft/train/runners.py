"""What the Trainer runs its step on: a mesh (`MeshRunner`; one device is a mesh of one) or pmap
(`PmapRunner`, `--parallel=pmap`). Both compile the step ahead of its first run, once per batch shape,
and hand the compiler's freed memory back to the OS before the step allocates its buffers.

A runner holds the placed frozen base (`frozen`) and the first train state (`initial_state`), and maps
the Trainer's state to and from the one-copy form checkpoints hold (`export_state` / `import_state`).
Shardings and meshes themselves are `jaxpeft.train.sharding`'s.

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
from jaxpeft.train.sharding import (ParallelConfig, batch_sharding, check_model_fits, make_mesh, mesh_sizes,
                                    param_shardings, place, state_shardings)
from jaxpeft.train.step import init_state


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
    """A jitted or pmapped step(state, frozen, batch), compiled ahead of its first run for each batch shape.

    Compiling apart from running lets the compiler's freed working memory go back to the OS before the
    step allocates its buffers, so the two peaks do not stack (SmolLM2 QLoRA: the process peak during
    steps fell from 2.59 to 2.28 GB, `/tmp`-probe figures in BUILD_NOTES.md)."""

    def __init__(self, fn: Any) -> None:
        self._fn = fn
        self._compiled: dict[tuple, Callable] = {}

    def __call__(self, state: Any, frozen: Any, batch: Mapping[str, Any]) -> tuple[Any, dict]:
        key = tuple((k, v.shape, str(v.dtype)) for k, v in sorted(batch.items()))
        if key not in self._compiled:
            self._compiled[key] = self._fn.lower(state, frozen, batch).compile()
            release_freed_memory()
        return self._compiled[key](state, frozen, batch)


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
        self._step = AheadOfTime(jax.jit(step_fn, donate_argnums=(0,),
                                         in_shardings=(self.state_sh, frozen_sh, self._batch_sh),
                                         out_shardings=(self.state_sh, replicated)))

    def step(self, state, frozen, micro):
        """One optimizer step on the micro-batches `micro` (A, B, S), every process passing the same rows."""
        batch = {k: place(np.asarray(v), self._batch_sh) for k, v in micro.items()}
        return self._step(state, frozen, batch)

    def export_state(self, state):
        return state

    def import_state(self, state):
        return place(state, self.state_sh)

    def export_frozen(self, frozen):
        return frozen


class PmapRunner:
    """Data parallelism with pmap: state and frozen base replicated (leading device axis) on the local
    devices, each micro-batch's rows split over them; this process takes its share of the rows."""

    AXIS = "batch"

    def __init__(self, step_fn: Callable, tx: Any, trainable: Mapping, frozen: Mapping, seed: int) -> None:
        self.n = jax.local_device_count()
        self.frozen = self._replicate(frozen)
        self.initial_state = self._replicate(init_state(trainable, tx, seed))
        self._step = AheadOfTime(jax.pmap(step_fn, axis_name=self.AXIS, donate_argnums=(0,)))

    def _replicate(self, tree):
        return jax.pmap(lambda _, t: t, in_axes=(0, None))(np.arange(self.n), tree)

    def step(self, state, frozen, micro):
        """One optimizer step on the micro-batches `micro` (A, B, S); the rows are split over the devices."""
        procs, me = jax.process_count(), jax.process_index()

        def split(v):
            v = np.asarray(v)
            a, b = v.shape[:2]
            local = v.reshape(a, procs, b // procs, *v.shape[2:])[:, me]
            return local.reshape(a, self.n, b // (procs * self.n), *v.shape[2:]).swapaxes(0, 1)

        state, metrics = self._step(state, frozen, {k: split(v) for k, v in micro.items()})
        return state, {k: v[0] for k, v in metrics.items()}

    def export_state(self, state):
        return jax.tree.map(lambda x: x[0], state)

    def import_state(self, state):
        return self._replicate(state)

    def export_frozen(self, frozen):
        return jax.tree.map(lambda x: x[0], frozen)


def make_runner(cfg: ParallelConfig | None, *, model_config: Any, micro_rows: int, step_fn: Callable,
                pmap_step_fn: Callable, tx: Any, trainable: Mapping, frozen: Mapping,
                seed: int) -> MeshRunner | PmapRunner:
    """The runner for `cfg`, after checking that the mesh fits the model and the batch.

    `cfg` None: a mesh of one, this process's first device (the default device)."""
    if cfg is None:
        return MeshRunner(make_mesh(None, devices=jax.local_devices()[:1]), step_fn, tx, trainable, frozen, seed)
    if cfg.parallel == "pmap":
        n = jax.local_device_count() * jax.process_count()
        if micro_rows % n:
            raise ConfigError(f"--parallel=pmap splits each micro-batch's {micro_rows} rows over {n} devices; "
                              f"use a batch_size / grad_accum that is a multiple of {n}.")
        logging.info("pmap data parallelism over %d devices (%d local)", n, jax.local_device_count())
        return PmapRunner(pmap_step_fn, tx, trainable, frozen, seed)
    mesh = make_mesh(cfg.mesh)
    check_model_fits(mesh_sizes(mesh), model_config, micro_rows=micro_rows)
    logging.info("mesh %s over %d devices (%d processes)", mesh_sizes(mesh), mesh.size, jax.process_count())
    return MeshRunner(mesh, step_fn, tx, trainable, frozen, seed)
