"""What orbax prints when a checkpoint save fails, kept to the one error jaxpeft raises instead.

A save that finds no room fails in every one of orbax's writer threads at once, and each says so: an
ERROR log with its traceback per thread and operation, asyncio's "Task exception was never retrieved"
for each abandoned write, and "Event loop is closed" from every tensorstore write that finishes after
orbax closed the event loop waiting for it (a real SmolLM2 run printed 446 tracebacks). All of them
repeat the one failure `Checkpointer.save` reports as a `WriteFailedError`.

`held_during_save()` holds orbax's own warnings and errors during a save and logs them afterwards unless
the save failed for lack of room (then they are dropped). The echoes that arrive later, from other
threads or at garbage collection, are dropped by narrow hooks installed at the first save for the rest
of the process: asyncio log records whose exception is a no-room failure or a closed event loop, and
`RuntimeError("Event loop is closed")` reaching `sys.excepthook` or `sys.unraisablehook`; after a failed
save (`after_failure`), also the "coroutine ... was never awaited" warnings of its abandoned writes.
Everything else passes through unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from typing import Iterator

from jaxpeft.core.write_errors import no_room


class Held(logging.Filter):
    """Holds back orbax's warnings and errors; `drop()` forgets the ones held so far."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING and f"{os.sep}orbax{os.sep}" in record.pathname:
            self.records.append(record)
            return False
        return True

    def drop(self) -> None:
        self.records = []


@contextlib.contextmanager
def held_during_save() -> Iterator[Held]:
    """Holds orbax's warnings and errors (on the root and absl handlers) for the block; logs them after it
    unless `drop()`ped."""
    _install_echo_hooks()
    held = Held()
    handlers = [h for lg in (logging.getLogger(), logging.getLogger("absl")) for h in lg.handlers]
    for h in handlers:
        h.addFilter(held)
    try:
        yield held
    finally:
        for h in handlers:
            h.removeFilter(held)
        for record in held.records:
            logging.getLogger(record.name).handle(record)


def _closed_loop(exc: BaseException | None) -> bool:
    return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


class _AsyncioEchoes(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return exc is None or not (_closed_loop(exc) or no_room(exc) is not None)


def _install_echo_hooks() -> None:
    if getattr(sys.unraisablehook, "_jaxpeft_echoes", False):
        return
    logging.getLogger("asyncio").addFilter(_AsyncioEchoes())
    previous_unraisable, previous_except = sys.unraisablehook, sys.excepthook

    def unraisable(info) -> None:
        if not _closed_loop(info.exc_value):
            previous_unraisable(info)

    def excepthook(kind, value, tb) -> None:
        if not _closed_loop(value):
            previous_except(kind, value, tb)

    unraisable._jaxpeft_echoes = True
    sys.unraisablehook, sys.excepthook = unraisable, excepthook


def after_failure() -> None:
    """After a failed save: its abandoned write coroutines are never awaited; Python would warn at exit."""
    warnings.filterwarnings("ignore", message=r"coroutine .* was never awaited", category=RuntimeWarning)
