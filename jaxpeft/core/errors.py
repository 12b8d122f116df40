"""Error types. Every message says what was expected, what was found, and how to fix it."""

from __future__ import annotations


class JaxPeftError(Exception):
    """Base class of every error jaxpeft raises on purpose. The entry points print its message as one
    `error: ...` line and exit with its `exit_code`."""

    exit_code = 2


class ConfigError(JaxPeftError, ValueError):
    """A configuration (model config, method config, flags) that jaxpeft cannot honour."""


class UnsupportedModelError(ConfigError):
    """A model architecture or config feature jaxpeft does not implement."""


class CheckpointError(JaxPeftError, OSError):
    """A checkpoint, weights file or adapter folder that is missing, truncated or inconsistent."""


class WriteFailedError(JaxPeftError, OSError):
    """A write that found no room: disk full (ENOSPC), quota (EDQUOT) or a file-size limit (EFBIG).
    Exit code 74 (EX_IOERR of sysexits.h)."""

    exit_code = 74


class RunStopped(JaxPeftError):
    """A run stopped on a signal (SIGTERM, SIGINT) after saving what it had; exit code 128 + the signal
    number (143 for SIGTERM, 130 for SIGINT), as a shell reports a process the signal ended."""

    def __init__(self, message: str, *, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class DataError(JaxPeftError, ValueError):
    """A dataset that is missing, empty, or lacks the fields a task needs."""


class MissingDependencyError(JaxPeftError, ImportError):
    """An optional package that this feature needs is not installed."""


def bullet_list(items) -> str:
    """Formats offenders one per line, so an error lists all of them at once."""
    return "\n".join(f"  - {item}" for item in items)
