"""Error types. Every message says what was expected, what was found, and how to fix it."""

from __future__ import annotations


class JaxPeftError(Exception):
    """Base class of every error jaxpeft raises on purpose."""


class ConfigError(JaxPeftError, ValueError):
    """A configuration (model config, method config, flags) that jaxpeft cannot honour."""


class UnsupportedModelError(ConfigError):
    """A model architecture or config feature jaxpeft does not implement."""


class CheckpointError(JaxPeftError, OSError):
    """A checkpoint, weights file or adapter folder that is missing, truncated or inconsistent."""


class DataError(JaxPeftError, ValueError):
    """A dataset that is missing, empty, or lacks the fields a task needs."""


class MissingDependencyError(JaxPeftError, ImportError):
    """An optional package that this feature needs is not installed."""


def bullet_list(items) -> str:
    """Formats offenders one per line, so an error lists all of them at once."""
    return "\n".join(f"  - {item}" for item in items)
