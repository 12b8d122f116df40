"""orbax checkpoints of the train state (trainable params, optimizer state, step, RNG) plus the data
position and the run's maths-defining settings. orbax writes each step to a temporary folder and
renames it, so a killed run keeps its last complete checkpoint.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax

from jaxpeft.core.errors import CheckpointError


class Checkpointer:
    def __init__(self, directory: str | os.PathLike, *, keep: int = 2) -> None:
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=max(keep, 1), create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Mapping, meta: Mapping[str, Any]) -> None:
        ocp = self._ocp
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(dict(meta))), force=True)
        self.manager.wait_until_finished()

    def restore(self, like_state: Mapping, step: int | None = None) -> tuple[dict, dict]:
        """(state, meta) of `step` (default: the latest), shaped like `like_state`."""
        ocp = self._ocp
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}; start without --resume")
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like_state)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                     meta=ocp.args.JsonRestore()))
        except Exception as e:
            raise CheckpointError(f"could not restore step {step} from {self.directory}: {e}. The checkpoint does "
                                  "not match this run's parameters (different method, targets or rank?).") from e
        return out["state"], dict(out["meta"])

    def close(self) -> None:
        self.manager.close()
