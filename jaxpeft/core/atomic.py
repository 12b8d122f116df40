"""Atomic writes: files and folders appear whole under their final name or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from jaxpeft.core.write_errors import writing


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _make_shareable(root: Path) -> None:
    """Gives files the permissions a plain `open` would (0666 & ~umask): mkstemp and some writers
    (safetensors) create them private, but saved models and adapters are ordinary shared data."""
    mode = 0o666 & ~_umask()
    paths = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
    for p in paths:
        os.chmod(p, mode)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary sibling folder; on success it is renamed to `final`.

    On an exception the temporary folder is removed and `final` is untouched. With `overwrite`, an
    existing `final` is replaced only after the new content is complete. A write that finds no room
    (disk full, quota, file-size limit) raises one `WriteFailedError` naming `final`.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists; pass overwrite=True to replace it")
    with writing(f"{final}/", final.parent):
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; saved models and adapters are ordinary shared data
        try:
            yield tmp
            _make_shareable(tmp)
            if final.exists():
                old = final.with_name(f".{final.name}.old-{os.getpid()}")
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


@contextlib.contextmanager
def atomic_file(final: str | os.PathLike, mode: str = "w") -> Iterator:
    """Opens a temporary sibling file for writing; renames it to `final` when the block succeeds. A write
    that finds no room raises one `WriteFailedError` naming `final`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    with writing(str(final), final.parent):
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
        try:
            with os.fdopen(fd, mode) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            _make_shareable(Path(tmp))
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
