"""mergekit's YAML configuration: parsing, the methods' parameters, and their resolution per tensor.

What is read (mergekit 0.1.5's `MergeConfiguration` as its users write it): `merge_method`, `models`
(each `model` with `parameters`) or `slices` (each with `sources`: `model`, `layer_range`, `parameters`;
and slice-level `parameters`), `base_model`, top-level `parameters`, `dtype`, `out_dtype`,
`tokenizer_source` (`base` or a model). A model is a folder or `folder+lora_folder` (a PEFT LoRA applied
first). Anything else (`modules`, `tokenizer`, `chat_template`, `tokenizer_source: union`, a slice's
`base_model` or `residual_weight`, a parameter the method does not declare) is refused by name; mergekit
ignores undeclared parameters silently, here they are errors.

A parameter's value is a scalar, a gradient (a list interpolated over the layers of each slice:
t = layer / (layers - 1) within the slice, the embedding, final norm and head at t = 0), or a list of
`{filter, value}` entries matched as substrings of the tensor's name, the first match winning and an
entry without a filter (or `*`) matching all. Precedence: the model's own (in its slice source), the
slice's, the top level's, the method's default. Per-model parameters match the input's tensor name,
shared ones the output's (as mergekit's resolver does).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxpeft.core.errors import ConfigError, bullet_list

REQUIRED = object()


@dataclasses.dataclass(frozen=True)
class Param:
    name: str
    kind: type  # float or bool
    scope: str  # "shared", "non_base" (every input but the base) or "input" (every input)
    default: Any = REQUIRED


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    params: tuple[Param, ...]
    base: str = "ignored"  # "required", "optional", "ignored"
    min_inputs: int = 1
    max_inputs: int | None = None
    min_non_base: int | None = None
    max_non_base: int | None = None
    sparsifier: str | None = None  # task-vector family only
    consensus: str | None = None
    task_vector: bool = False

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


def _gta(name, consensus, sparsifier, normalize, rescale) -> Method:
    params = [Param("int8_mask", bool, "shared", False), Param("normalize", bool, "shared", normalize),
              Param("rescale", bool, "shared", rescale), Param("lambda", float, "shared", 1.0),
              Param("weight", float, "non_base"), Param("density", float, "non_base", 1.0)]
    if sparsifier == "magnitude_outliers":
        params.append(Param("gamma", float, "non_base", 0.01))
    if sparsifier == "della_magprune":
        params.append(Param("epsilon", float, "non_base", 0.15))
    return Method(name, tuple(params), base="required", sparsifier=sparsifier, consensus=consensus, task_vector=True)


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("linear", (Param("weight", float, "input"), Param("normalize", bool, "shared", True))),
    Method("slerp", (Param("t", float, "shared"),), base="required", min_inputs=2, max_inputs=2),
    Method("nuslerp", (Param("weight", float, "non_base"), Param("nuslerp_row_wise", bool, "shared", False),
                       Param("nuslerp_flatten", bool, "shared", True)), base="optional", min_non_base=2,
           max_non_base=2),
    Method("model_stock", (Param("filter_wise", bool, "shared", False),), base="required", min_inputs=3),
    Method("passthrough", (Param("scale", float, "input", None),), max_inputs=1),
    _gta("task_arithmetic", None, None, False, False),
    _gta("ties", "sum", "magnitude", True, False),
    _gta("dare_ties", "sum", "random", False, True),
    _gta("dare_linear", None, "random", False, True),
    _gta("breadcrumbs", None, "magnitude_outliers", False, False),
    _gta("breadcrumbs_ties", "sum", "magnitude_outliers", False, False),
    _gta("della", "sum", "della_magprune", True, True),
    _gta("della_linear", None, "della_magprune", False, True),
]}

TOP_KEYS = {"merge_method", "models", "slices", "base_model", "parameters", "dtype", "out_dtype", "tokenizer_source"}
REFUSED_KEYS = {"modules": "per-module merges", "tokenizer": "vocabulary merging (tokenizer:)",
                "chat_template": "chat template replacement"}
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


@dataclasses.dataclass(frozen=True)
class Source:
    """One input of a slice: a model (optionally with a LoRA applied) over layers [start, stop)."""

    model: str  # the reference as written (folder or folder+lora)
    layer_range: tuple[int, int] | None
    parameters: dict


@dataclasses.dataclass(frozen=True)
class Slice:
    sources: tuple[Source, ...]
    parameters: dict


@dataclasses.dataclass(frozen=True)
class MergeConfig:
    method: Method
    slices: tuple[Slice, ...]  # `models:` is one slice whose sources span every layer (layer_range None)
    from_models: bool
    base_model: str | None
    parameters: dict
    dtype: str | None
    out_dtype: str | None
    tokenizer_source: str | None
    text: str  # the YAML as given, for the model card


def split_reference(ref: str) -> tuple[str, str | None]:
    """"folder+lora" -> (folder, lora); "folder" -> (folder, None)."""
    model, _, lora = ref.partition("+")
    return model, (lora or None)


def _check_params(where: str, params: Any, method: Method, problems: list[str]) -> dict:
    if params is None:
        return {}
    if not isinstance(params, dict):
        problems.append(f"{where}: parameters must be a mapping, found {params!r}")
        return {}
    for name, value in params.items():
        if method.param(name) is None:
            problems.append(f"{where}: parameter {name!r} is not one of {method.name}'s "
                            f"({', '.join(p.name for p in method.params)})")
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for v in value:
                extra = set(v) - {"filter", "value"}
                if extra or "value" not in v:
                    problems.append(f"{where}: {name} entry {v!r}: use {{filter: ..., value: ...}}")
    return dict(params)


def parse_config(data: Any, text: str = "") -> MergeConfig:
    """A `MergeConfig` from the loaded YAML, every problem in one `ConfigError` (nothing is read from disk)."""
    if not isinstance(data, dict):
        raise ConfigError(f"a merge configuration is a YAML mapping; found {type(data).__name__}")
    problems = []
    for key in data:
        if key in REFUSED_KEYS:
            problems.append(f"{key}: {REFUSED_KEYS[key]} is not supported; remove it")
        elif key not in TOP_KEYS:
            problems.append(f"{key}: unknown option (supported: {', '.join(sorted(TOP_KEYS))})")
    name = data.get("merge_method")
    method = METHODS.get(name)
    if method is None:
        raise ConfigError("cannot read the merge configuration:\n" + bullet_list(
            problems + [f"merge_method: {name!r} is not supported; use one of {', '.join(METHODS)}"]))
    for key in ("dtype", "out_dtype"):
        if data.get(key) is not None and data[key] not in DTYPES:
            problems.append(f"{key}: {data[key]!r} is not one of {', '.join(DTYPES)}")
    tok = data.get("tokenizer_source")
    if tok is not None and not isinstance(tok, str):
        problems.append(f"tokenizer_source: {tok!r}: use 'base' or a model folder")
    elif tok == "union":
        problems.append("tokenizer_source: 'union' (vocabulary merging) is not supported; use 'base' or a model")
    top = _check_params("parameters", data.get("parameters"), method, problems)
    models, slices = data.get("models"), data.get("slices")
    out_slices: list[Slice] = []
    if bool(models) == bool(slices):
        problems.append("give exactly one of 'models' and 'slices'")
    elif models:
        sources = []
        for i, m in enumerate(models):
            if not isinstance(m, dict) or "model" not in m or set(m) - {"model", "parameters"}:
                problems.append(f"models[{i}]: use {{model: FOLDER, parameters: {{...}}}}, found {m!r}")
                continue
            sources.append(Source(str(m["model"]), None,
                                  _check_params(f"models[{i}] ({m['model']})", m.get("parameters"), method, problems)))
        out_slices.append(Slice(tuple(sources), {}))
    else:
        for i, s in enumerate(slices):
            if not isinstance(s, dict) or "sources" not in s:
                problems.append(f"slices[{i}]: use {{sources: [...]}}, found {s!r}")
                continue
            for key in set(s) - {"sources", "parameters"}:
                problems.append(f"slices[{i}]: {key} is not supported; remove it")
            sources = []
            for j, src in enumerate(s["sources"]):
                lr = src.get("layer_range") if isinstance(src, dict) else None
                if not isinstance(src, dict) or "model" not in src or set(src) - {"model", "layer_range", "parameters"}:
                    problems.append(f"slices[{i}].sources[{j}]: use {{model, layer_range, parameters}}, found {src!r}")
                    continue
                if not (isinstance(lr, (list, tuple)) and len(lr) == 2 and all(isinstance(v, int) for v in lr)
                        and 0 <= lr[0] < lr[1]):
                    problems.append(f"slices[{i}].sources[{j}] ({src['model']}): layer_range {lr!r} must be "
                                    "[start, stop) with 0 <= start < stop")
                    continue
                sources.append(Source(str(src["model"]), (lr[0], lr[1]), _check_params(
                    f"slices[{i}].sources[{j}] ({src['model']})", src.get("parameters"), method, problems)))
            lengths = {b - a for a, b in (x.layer_range for x in sources)}
            if len(lengths) > 1:
                problems.append(f"slices[{i}]: every source must span the same number of layers, found "
                                f"{sorted(lengths)}")
            out_slices.append(Slice(tuple(sources), _check_params(f"slices[{i}]", s.get("parameters"), method,
                                                                  problems)))
    base = data.get("base_model")
    if method.base == "required" and not base:
        problems.append(f"base_model: {method.name} needs a base model")
    if problems:
        raise ConfigError("cannot use the merge configuration:\n" + bullet_list(problems))
    return MergeConfig(method, tuple(out_slices), bool(models), str(base) if base else None, top,
                       DTYPES.get(data.get("dtype")), DTYPES.get(data.get("out_dtype")), tok, text)


def evaluate(setting: Any, tensor_name: str, t: float, kind: type) -> Any:
    """One setting's value for `tensor_name` at layer position t in [0, 1] (mergekit's evaluate_setting)."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return _cast(setting, kind)
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(e, (bool, int, float, str)) for e in setting):
            values = [_cast(e, kind) for e in setting]
            if kind is bool:
                return values[int(t * (len(values) - 1))]
            scaled = t * (len(values) - 1)
            i0 = int(scaled)
            i1 = min(len(values) - 1, i0 + 1)
            frac = scaled - i0
            return float((1 - frac) * values[i0] + frac * values[i1])
        for cond in setting:
            f = cond.get("filter")
            if f is None or f == "*" or (tensor_name and f in tensor_name):
                return evaluate(cond["value"], tensor_name, t, kind)
        return None
    raise ConfigError(f"unexpected parameter value {setting!r}")


def _cast(value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, str):
            return value.lower() in ("true", "1", "yes")
        return bool(value)
    return None if value is None else float(value)


def resolve(param: Param, scopes: list[dict | None], tensor_name: str, t: float) -> Any:
    """The first scope's value that is not None, else the default; REQUIRED when there is none."""
    for scope in scopes:
        if scope and param.name in scope:
            value = evaluate(scope[param.name], tensor_name, t, param.kind)
            if value is not None:
                return value
    return param.default
