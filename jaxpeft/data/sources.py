"""Where records come from: local files (.json, .jsonl, .parquet, .csv), folders written by
`datasets.save_to_disk`, and Hugging Face Hub datasets (from the local cache when offline).

`read(spec, split=, config=)` returns the raw records (a list of dicts) and a name for messages. Nothing
here unpickles: JSON, CSV, parquet and arrow only.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from jaxpeft.core.errors import DataError, MissingDependencyError
from jaxpeft.data.formats import EXPECTED

LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")
_SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_EXPECTED_FILE = f"Expected a .json, .jsonl, .parquet or .csv file (or a datasets.save_to_disk folder) of {EXPECTED}."


def is_saved_dataset(path: Path) -> bool:
    """Whether `path` is a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    return path.is_dir() and any((path / m).is_file() for m in _SAVED_MARKERS)


def _read_parquet(path: Path) -> list[Any]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise MissingDependencyError("Reading .parquet needs: pip install pyarrow") from e
    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a corrupt file.
        raise DataError(f"Could not read parquet file {path} ({e}). {_EXPECTED_FILE}") from e


def _read_json(path: Path, text: str, suffix: str) -> list[Any]:
    if suffix == ".json" and text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} is not valid JSON: {e}. {_EXPECTED_FILE}") from None
    # JSON lines (also accepted in .json files: datasets' to_json writes them).
    records = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {n} is not valid JSON ({e.msg}). Expected a JSON list "
                            "of records or one JSON record per line.") from None  # fmt: skip
    return records


def read_local(path: Path, split: str = "train") -> list[Any]:
    """Records of a local file or `save_to_disk` folder (`split` picks one of a DatasetDict's splits)."""
    if is_saved_dataset(path):
        return _read_saved(path, split)
    if not path.is_file():
        what = "is a directory without a saved dataset in it" if path.is_dir() else "does not exist"
        raise DataError(f"Data file {path} {what}. {_EXPECTED_FILE} Check the path (cwd-relative).")
    suffix = path.suffix.lower()
    if suffix not in LOCAL_SUFFIXES:
        raise DataError(f"Data file {path} has suffix {suffix!r}. {_EXPECTED_FILE} Convert it, e.g. "
                        "with datasets.Dataset.to_json(path).")  # fmt: skip
    if suffix == ".parquet" and path.stat().st_size:
        return _read_parquet(path)
    text = "" if suffix == ".parquet" else path.read_text(encoding="utf-8")
    if not text.strip():
        raise DataError(f"Data file {path} is empty. {_EXPECTED_FILE}")
    if suffix == ".csv":
        return [dict(row) for row in csv.DictReader(text.splitlines())]
    return _read_json(path, text, suffix)


def _read_saved(path: Path, split: str) -> list[Any]:
    import datasets  # Imported here: heavy, and only needed for saved datasets and the Hub.

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DataError(f"Could not read the saved dataset {path} ({type(e).__name__}: {e}). Write it again "
                        "with datasets.Dataset.save_to_disk.") from e
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"Saved dataset {path} has splits {sorted(ds)}; asked for {split!r}. Pass one of "
                            "those with --dataset_split.")
        ds = ds[split]
    return ds.to_list()


def read_hub(name: str, split: str, config: str | None = None) -> list[Any]:
    """Records of one split of a Hub dataset (`config`: its configuration / subset name)."""
    import datasets  # Imported here: heavy, and only needed for hub datasets.

    try:
        ds = datasets.load_dataset(name, config) if config else datasets.load_dataset(name)
    except Exception as e:  # Offline, unknown name, gated dataset...: all mean "not available".
        raise DataError(
            f"{name!r} is not a local file, and the dataset could not be fetched from the Hugging "
            f"Face Hub ({type(e).__name__}: {e}). To train on your own data, pass a path to a "
            f".json, .jsonl, .parquet or .csv file of {EXPECTED}; or use builtin:dates."
        ) from e
    if split not in ds:
        raise DataError(
            f"Hub dataset {name!r} has splits {sorted(ds)}; asked for {split!r}. Pass one of those."
        )
    return ds[split].to_list()


def is_local(spec: str) -> bool:
    """Whether `spec` names a local file or folder (rather than a Hub dataset)."""
    path = Path(spec).expanduser()
    return path.exists() or path.suffix.lower() in LOCAL_SUFFIXES or spec.startswith((".", "/", "~"))


def read(spec: str, split: str = "train", config: str | None = None) -> tuple[list[Any], str]:
    """(raw records, source name) of one dataset: a local file or folder, or a Hub dataset."""
    path = Path(spec).expanduser()
    if is_local(spec):
        return read_local(path, split), str(path)
    return read_hub(spec, split, config), f"hub dataset {spec!r} split {split!r}"
