"""orbax checkpoints of the train state (trainable params, optimizer state, step, RNG) plus the data
position and the run's maths-defining settings.

orbax writes each step to a temporary folder (`<step>.orbax-checkpoint-tmp...`) and renames it to
`<step>` when complete, so a killed run keeps its last complete checkpoint and a temporary folder is
never listed as a step (`committed_steps`, `latest_step`). A save that finds no room (disk full, quota,
file-size limit) raises one `WriteFailedError` instead of orbax's per-thread tracebacks (orbax_noise.py),
and its partial folder is removed to give the space back (a write still in flight can leave a part of
it: like the leftovers of a killed save, orbax removes it when the folder is next opened). Saves are
synchronous: the run waits for each anyway, and a failure then surfaces in the step that caused it.
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import threading
from pathlib import Path
from typing import Any, Mapping

import jax

from jaxpeft.core.errors import CheckpointError, WriteFailedError
from jaxpeft.core.write_errors import describe, no_room
from jaxpeft.train import orbax_noise


_JOIN_S = 60.0  # how long a failed save waits for each of orbax's writer threads


def committed_steps(directory: str | os.PathLike) -> list[int]:
    """The steps with a complete checkpoint in `directory`, ascending: orbax's committed folders are named
    by the bare step number (what `CheckpointManager.all_steps` lists), temporary ones never are."""
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and p.is_dir())


class Checkpointer:
    def __init__(self, directory: str | os.PathLike, *, keep: int = 2) -> None:
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=max(keep, 1), create=True, cleanup_tmp_directories=True,
                                               enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._closed = False

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Mapping, meta: Mapping[str, Any]) -> None:
        """Writes `step` and waits until it is committed. A step already committed is left as it is (the
        state of a step is the same however often it is reached, e.g. by a resumed run)."""
        if step in self.manager.all_steps():
            return
        ocp = self._ocp
        needed = sum(getattr(x, "nbytes", 0) for x in jax.tree_util.tree_leaves(state))
        with orbax_noise.held_during_save() as held:
            try:
                self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                                meta=ocp.args.JsonSave(dict(meta))), force=True)
                self.manager.wait_until_finished()
            except Exception as e:
                if no_room(e) is None:
                    raise
                self._abandon(step)
                held.drop()  # the error below says it once
                raise WriteFailedError(describe(f"checkpoint step {step} in {self.directory}", e, self.directory,
                                                needed=needed)) from e

    def _abandon(self, step: int) -> None:
        """After a failed save: waits for orbax's writer threads (the first failure ends the save while the
        others still write, and each reports the same failure again, which is dropped), closes the manager
        and removes the partial folder of `step`, giving its space back."""
        for t in threading.enumerate():
            if t is not threading.current_thread() and type(t).__module__.startswith("orbax."):
                with contextlib.suppress(Exception):  # orbax's threads re-raise their failure from join()
                    t.join(timeout=_JOIN_S)
        with contextlib.suppress(Exception):
            self.manager.close()
        self._closed = True
        orbax_noise.after_failure()
        gc.collect()  # abandoned asyncio tasks report now, while their logs are held
        if jax.process_index() == 0:
            for p in Path(self.directory).glob(f"{step}.orbax-checkpoint-tmp*"):
                shutil.rmtree(p, ignore_errors=True)

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
        if not self._closed:
            self.manager.close()
            self._closed = True
