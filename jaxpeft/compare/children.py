"""Child processes of the method comparison: run one command, and read that command's own peak memory.

Linux folds the peak of the address space a child is forked (or vforked) from into the child's
ru_maxrss, so the command is forked from a fresh ~10 MB interpreter, not from the launcher, and that
wrapper reports the command's exit status and ru_maxrss from `os.wait4`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Mapping, Sequence


@dataclasses.dataclass(frozen=True)
class ChildRun:
    returncode: int
    # The child's own peak resident set (ru_maxrss from wait4 in a lean intermediate process: Linux folds
    # the peak of the address space a child is forked or vforked from into its ru_maxrss, so the child is
    # forked from a ~10 MB wrapper, not from the launcher).
    peak_rss_bytes: int
    wall_s: float
    launcher_peak_rss_bytes: int  # the launcher's own peak (VmHWM) when it started the child, for the record


# Forks and execs the command from a fresh, small interpreter and writes its exit status and ru_maxrss.
_PEAK_WRAPPER = r"""
import json, os, sys
out, argv = sys.argv[1], sys.argv[2:]
pid = os.fork()
if pid == 0:
    try:
        os.execvp(argv[0], argv)
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
with open(out, "w") as f:
    json.dump({"status": status, "maxrss_kib": usage.ru_maxrss}, f)
"""


def run_child(argv: Sequence[str], *, log_path: str | os.PathLike, env: Mapping[str, str] | None = None,
              cwd: str | os.PathLike | None = None) -> ChildRun:
    """Runs `argv` with stdout+stderr to `log_path`; returns its exit code, its own peak RSS and wall time."""
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    launcher = own_peak_rss_bytes()
    start = time.perf_counter()
    with open(log_path, "w") as log, tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "child.json"
        proc = subprocess.run([sys.executable, "-c", _PEAK_WRAPPER, str(report), *argv], stdout=log,
                              stderr=subprocess.STDOUT, env=dict(env or os.environ), cwd=cwd, check=False)
        if proc.returncode != 0 or not report.exists():
            raise RuntimeError(f"the peak-memory wrapper failed (rc {proc.returncode}) running {list(argv)}; "
                               f"see {log_path}")
        child = json.loads(report.read_text())
    wall = time.perf_counter() - start
    return ChildRun(os.waitstatus_to_exitcode(child["status"]), int(child["maxrss_kib"]) * 1024, wall, launcher)


def own_peak_rss_bytes() -> int:
    """This process's address-space peak (VmHWM). Unlike ru_maxrss it leaves out whatever process this one
    was forked from, and it is what a child forked now inherits."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB
