"""Running the entry points: as a user does (`python -m <module> ...` from the repository root, `run_module`),
or in this process through the module's `run(argv)` (`run_entry`), which parses into its own FlagValues.

Both return a `subprocess.CompletedProcess` (returncode, stdout, stderr), so a test reads the same either
way. The in-process run skips the interpreter start and the imports (most of a tiny run's cost); each entry
point keeps one subprocess test, the end-to-end check of its command line.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_module(*args: str, check: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
    """`python -m args...` in the repository root; with `check`, a non-zero exit fails with its stderr."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@contextlib.contextmanager
def _absl_stream_kept():
    """The entry points point absl's log handler at the (captured) stderr; put it back afterwards."""
    from absl import logging

    handler = logging.get_absl_handler().python_handler
    stream, verbosity = handler.stream, logging.get_verbosity()
    try:
        yield
    finally:
        handler.stream = stream
        logging.set_verbosity(verbosity)


def run_entry(module: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`module.run([module, *args])` in this process, stdout and stderr captured, as `run_module` reports it.

    With `check`, a non-zero exit fails with its stderr. An unexpected exception propagates (on the command
    line it would be a traceback and exit code 1).
    """
    entry = importlib.import_module(module)
    out, err = io.StringIO(), io.StringIO()
    with _absl_stream_kept(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = entry.run([module, *args])
    proc = subprocess.CompletedProcess([module, *args], rc, out.getvalue(), err.getvalue())
    if check and rc != 0:
        raise AssertionError(f"{args} failed ({rc}):\n{proc.stderr[-3000:]}")
    return proc
