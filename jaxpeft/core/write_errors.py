"""Writes that find no room (disk full, quota, file-size limit), told apart from other failures and
described in one line: what was being written, why it failed, what it needed and what there is.

The errors come as `OSError` with an errno from Python's own writes, and as plain text from libraries
that write in C++ or Rust (tensorstore under orbax, safetensors), so both are recognised.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import resource
import shutil
from pathlib import Path
from typing import Iterator

from jaxpeft.core.errors import JaxPeftError, WriteFailedError

NO_ROOM_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_TEXTS = {os.strerror(n): n for n in NO_ROOM_ERRNOS}
_HINTS = {errno.ENOSPC: "free space on that disk (or write --out elsewhere)",
          errno.EDQUOT: "free space within your quota (or write --out elsewhere)",
          errno.EFBIG: "raise the file-size limit (ulimit -f) or write --out to a filesystem that takes larger files"}


def no_room(exc: BaseException | None) -> int | None:
    """The errno (ENOSPC, EDQUOT or EFBIG) when `exc` or an exception in its chain is a write that found
    no room; otherwise None."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in NO_ROOM_ERRNOS:
            return exc.errno
        text = str(exc)
        for known, number in _TEXTS.items():
            if known in text:
                return number
        exc = exc.__cause__ or exc.__context__
    return None


def size_text(n: int) -> str:
    """Bytes as people read them (GB = 10^9)."""
    if n < 10**6:
        return f"{n:,} bytes"
    return f"{n / 10**9:.2f} GB" if n >= 10**9 else f"{n / 10**6:.1f} MB"


def describe(what: str, exc: BaseException, where: str | os.PathLike, *, needed: int | None = None) -> str:
    """One line: `what` could not be written because of `exc` (a `no_room` failure), with the file the
    library names, the bytes it needed where known, the limit or free space of `where`, and the fix."""
    number = no_room(exc) or errno.ENOSPC
    text = " ".join(str(exc).split())
    parts = []
    path = getattr(exc, "filename", None) or _quoted_path(text)
    if path:
        parts.append(f"writing {path}")
    chunk = re.search(r"[Ff]ailed to write (\d+) bytes", text)
    if chunk:
        parts.append(f"a write of {int(chunk.group(1)):,} bytes failed")
    if needed:
        parts.append(f"it needs about {size_text(needed)}")
    if number == errno.EFBIG:
        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        parts.append(f"the file-size limit (ulimit -f) is {size_text(soft)}" if soft != resource.RLIM_INFINITY
                     else "a file grew past the largest the filesystem takes")
    free = _free_bytes(Path(where))
    if free is not None:
        parts.append(f"{size_text(free)} free there")
    return f"could not write {what}: {os.strerror(number)} ({'; '.join(parts)}); {_HINTS[number]}."


@contextlib.contextmanager
def writing(what: str, where: str | os.PathLike, *, needed: int | None = None) -> Iterator[None]:
    """Turns a no-room failure inside the block into one `WriteFailedError` about `what`; any other
    exception (jaxpeft's own included: they already say what went wrong) passes unchanged."""
    try:
        yield
    except JaxPeftError:
        raise
    except Exception as e:
        if no_room(e) is None:
            raise
        raise WriteFailedError(describe(what, e, where, needed=needed)) from e


def _quoted_path(text: str) -> str | None:
    """The last absolute path a C++ library quoted in its message (tensorstore: `Failed writing: "/..."`)."""
    found = re.findall(r'"(/[^"]+)"', text)
    return found[-1] if found else None


def _free_bytes(path: Path) -> int | None:
    for p in (path, *path.parents):
        if p.exists():
            try:
                return shutil.disk_usage(p).free
            except OSError:
                return None
    return None
