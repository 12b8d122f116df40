"""A run that stops without losing work: on a signal, and when a write finds no room (`RunGuard`, around
`run_finetune`).

Signals: SIGTERM (what SLURM, Kubernetes and spot instances send before they kill) and SIGINT (Ctrl-C).

  - While training, the current step finishes, its checkpoint is written through the run's Checkpointer
    (train state and data position), the metrics so far are closed, and the run raises `RunStopped`: the
    entry points print one line saying how to resume and exit 128 + the signal number (143 for SIGTERM,
    130 for SIGINT). A second signal aborts at once (its default action): orbax commits a checkpoint by
    renaming its temporary folder, so a save cut short is never listed as a step.
  - Before the first step of the run has finished (loading, compiling), or after the final checkpoint
    (evaluation, adapter, merged/), there is nothing more to save: the run stops at once with the same
    exit code. Those files are written atomically, and --resume redoes them from the final checkpoint.
  - With several processes every step ends with a tiny allgather of "stop requested" (one int32 per
    process; only when process_count() > 1), so all of them stop after the same step even when only one
    got the signal. (JAX's own preemption sync point only knows SIGTERM, through a handler this one
    replaces for the run.)

The handlers (and SIGXFSZ ignored, so a file-size limit fails the write with EFBIG instead of killing the
process; CPython ignores it already) exist only inside the `with` block, in the main thread; the previous
ones come back after it.

Writes that find no room (disk full, quota, file-size limit) anywhere in the run end it with one
`WriteFailedError` (exit code 74) naming what was written and the newest intact checkpoint to --resume
from.

Test hook (tests only, not an interface): JAXPEFT_TEST_SIGNAL_AFTER_STEP="STEP:SIGNAME[:PROCESS]" makes
the process with index PROCESS (default: every process) send SIGNAME to itself when step STEP has
finished, so a test can interrupt a run at an exact step.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Callable

import numpy as np
from absl import logging

from jaxpeft.core.errors import RunStopped, WriteFailedError
from jaxpeft.core.write_errors import describe, no_room
from jaxpeft.train.checkpoint import committed_steps

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
TEST_HOOK = "JAXPEFT_TEST_SIGNAL_AFTER_STEP"
_RESUME = "run the same command with --resume (and without --overwrite)"


class RunGuard:
    """Signals and failed writes of one run whose checkpoints go to `checkpoints` (see the module doc).

    `should_stop(step)` after every step tells the loop to stop; `stop_after_final_save(step, close)` after
    the final checkpoint raises `RunStopped` if a stop was requested, then lets later signals stop the
    run at once.
    """

    def __init__(self, checkpoints: str | os.PathLike, *, total_steps: int) -> None:
        self.checkpoints, self.total_steps = Path(checkpoints), total_steps
        self.phase = "prepare"  # "prepare": no step finished yet; "train"; "finish": final checkpoint written
        self.signum: int | None = None  # the signal this process received
        self._agreed = 0  # the signal every process agreed to stop on (0: none yet)
        self._previous: dict[int, object] = {}
        self._hook = _parse_hook(os.environ.get(TEST_HOOK))

    def __enter__(self) -> "RunGuard":
        if threading.current_thread() is threading.main_thread():
            for s in (*STOP_SIGNALS, signal.SIGXFSZ):
                self._previous[s] = signal.getsignal(s)
            for s in STOP_SIGNALS:
                signal.signal(s, self._on_signal)
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        for s, handler in self._previous.items():
            # None: a handler installed outside Python (e.g. JAX's preemption notifier); Python cannot
            # put that back, so the signal gets its default action.
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        self._previous = {}
        if exc is None or isinstance(exc, RunStopped) or no_room(exc) is None:
            return False
        what = str(exc) if isinstance(exc, WriteFailedError) else describe(
            getattr(exc, "filename", None) or f"a file of {self.checkpoints.parent}", exc, self.checkpoints.parent)
        raise WriteFailedError(f"{what} {self._intact()}") from exc

    def should_stop(self, step: int) -> bool:
        """After step `step` has finished: True when this or (with several processes) any process got a
        stop signal; the same answer in every process."""
        self.phase = "train" if self.phase == "prepare" else self.phase
        if self._hook and self._hook[0] == step and self._hook[2] in (None, _process_index()):
            signum, self._hook = self._hook[1], None
            os.kill(os.getpid(), signum)  # its handler runs before os.kill returns
        if not self._agreed:
            self._agreed = _agree(self.signum or 0)
        return bool(self._agreed)

    def stop_after_final_save(self, step: int, close: Callable[[], None]) -> None:
        """After the final checkpoint: `close()` and raise `RunStopped` if a stop was requested; from here on
        a signal stops the run at once (nothing is left to save)."""
        if self.should_stop(step):
            close()
            raise self._stopped(step)
        self.phase = "finish"

    def _on_signal(self, signum: int, frame) -> None:
        del frame
        self.signum = signum
        if self.phase != "train":
            raise self._stopped(None, signum=signum)
        for s in STOP_SIGNALS:  # a second signal aborts at once
            signal.signal(s, signal.SIG_DFL)
        logging.warning("%s received: the run stops after the current step, once its checkpoint is saved; "
                        "send it again to abort at once (the newest committed checkpoint stays)",
                        signal.Signals(signum).name)

    def _stopped(self, step: int | None, *, signum: int | None = None) -> RunStopped:
        signum = signum or self.signum or self._agreed
        name = signal.Signals(signum).name
        by = f"by {name}" if self.signum else f"because another process received {name}"
        if self.phase == "finish":
            return RunStopped(f"stopped {by} after training finished; the final checkpoint is in "
                              f"{self.checkpoints}; {_RESUME} to write the evaluation and the adapter.",
                              signum=signum)
        if step is None:
            return RunStopped(f"stopped {by} before the first step of this run finished: nothing new to save. "
                              f"{self._intact(start_over='run the same command again to start')}", signum=signum)
        return RunStopped(f"stopped {by} after step {step} of {self.total_steps}; its checkpoint is saved in "
                          f"{self.checkpoints}; {_RESUME} to continue.", signum=signum)

    def _intact(self, start_over: str = "make room and run the same command again") -> str:
        steps = committed_steps(self.checkpoints)
        if not steps:
            return f"No checkpoint was completed, so there is nothing to resume: {start_over}."
        return (f"The newest intact checkpoint is step {steps[-1]} ({self.checkpoints / str(steps[-1])}); "
                f"{_RESUME} to continue from it.")


def _parse_hook(text: str | None) -> tuple[int, int, int | None] | None:
    if not text:
        return None
    try:
        step, name, *process = text.split(":")
        return int(step), int(getattr(signal, name)), (int(process[0]) if process else None)
    except (ValueError, AttributeError, IndexError) as e:
        raise ValueError(f"{TEST_HOOK}={text!r}: expected STEP:SIGNAME[:PROCESS], e.g. 3:SIGTERM") from e


def _process_index() -> int:
    import jax

    return jax.process_index()


def _agree(signum: int) -> int:
    """The largest stop signal number over all processes (0: none), from one allgather when there are
    several processes."""
    import jax

    if jax.process_count() == 1:
        return signum
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.int32(signum))))
