"""What every PEFT adapter folder shares: file names, the tensor-name prefix, reading the config and
tensors (safetensors; pickles only on request, through torch's weights-only loader), writing atomically.

A folder holds `adapter_config.json` (sorted keys, indent 2, a trailing newline) and
`adapter_model.safetensors` (metadata {"format": "pt"}).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from jaxpeft.convert.hf import read_safetensors
from jaxpeft.core.atomic import atomic_dir
from jaxpeft.core.errors import CheckpointError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."


def read_config_json(folder: Path, name: str = CONFIG_NAME, *,
                     expect: str = "a PEFT adapter folder (a second adapter saved alongside sits in "
                                   "<folder>/<adapter name>/)") -> dict:
    """The JSON object in `folder/name`; a missing folder/file or bad JSON is a CheckpointError saying what
    was found and what to pass instead (`expect`)."""
    if not folder.is_dir():
        raise CheckpointError(f"adapter folder {folder} does not exist; pass the folder that holds {name}.")
    path = folder / name
    if not path.exists():
        found = sorted(p.name for p in folder.iterdir())
        raise CheckpointError(f"{folder} has no {name} (found {found or 'nothing'}); pass {expect}.")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); export the adapter again.") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} holds a {type(raw).__name__}, not an object; export the adapter again.")
    return raw


def read_tensors(folder: Path, allow_pickle: bool, *, weights_name: str = WEIGHTS_NAME,
                 pickle_name: str = PICKLE_NAME, config_name: str = CONFIG_NAME,
                 pickle_advice: str = " that can run code when loaded. Convert it to safetensors, or pass "
                                      "allow_pickle=True if you trust its source.") -> dict[str, np.ndarray]:
    """The folder's tensors from `weights_name`, or from the pickle `pickle_name` only with `allow_pickle`."""
    if (folder / weights_name).exists():
        return read_safetensors(folder / weights_name)
    if (folder / pickle_name).exists():
        if not allow_pickle:
            raise CheckpointError(f"{folder} holds only {pickle_name}, a pickle file{pickle_advice}")
        import torch

        state = torch.load(folder / pickle_name, map_location="cpu", weights_only=True)
        return {k: v.float().numpy() for k, v in state.items()}
    raise CheckpointError(f"{folder} has {config_name} but no {weights_name} (or {pickle_name}); "
                          "copy the complete adapter folder.")


def write_folder(out_dir: str | os.PathLike, config: Mapping[str, Any], tensors: Mapping[str, np.ndarray], *,
                 overwrite: bool = False, config_name: str = CONFIG_NAME, weights_name: str = WEIGHTS_NAME,
                 newline: bool = True, extra_json: Mapping[str, Mapping[str, Any]] | None = None) -> Path:
    """Writes the config (sorted keys, indent 2), any `extra_json` files ({file name: contents}, written the same
    way) and the tensors ({"format": "pt"}) atomically: the folder appears whole or not at all."""
    from safetensors.numpy import save_file

    end = "\n" if newline else ""
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        for name, contents in {config_name: config, **(extra_json or {})}.items():
            (tmp / name).write_text(json.dumps(dict(contents), indent=2, sort_keys=True) + end)
        save_file(dict(tensors), str(tmp / weights_name), metadata={"format": "pt"})
    return Path(out_dir)


def f32(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)
