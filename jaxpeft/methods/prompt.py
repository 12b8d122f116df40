"""Prompt tuning (Lester et al. 2021) as PEFT's PROMPT_TUNING: P trained input embeddings before every sequence.

`init` adds one leaf at the top of the tree,
    prompt/embeddings  (P, D)
initialised as PEFT does: `random` N(0, 1) (torch's Embedding init), `vocab` the embeddings of P token ids
drawn uniformly from the vocabulary, or `text` the embeddings of the tokenized init text, repeated and cut
to P tokens. The text becomes ids in `prepare` (it needs the tokenizer); a text longer than P tokens is an
error (PEFT trims it silently). The model runs the virtual tokens through every layer (they attend only to
each other, so one pass serves every row), keeps their keys and values in the first P cache slots, and
returns outputs for the real tokens only, whose positions start at P.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft.convert.peft import prompt_learning
from jaxpeft.core.errors import ConfigError, bullet_list
from jaxpeft.core.tree import Path
from jaxpeft.methods import virtual_tokens as vt
from jaxpeft.methods.base import Method
from jaxpeft.models import hooks

INITS = ("random", "text", "vocab")
_PEFT_INIT = {"random": "RANDOM", "text": "TEXT", "vocab": "SAMPLE_VOCAB"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptConfig:
    """Prompt-tuning hyper-parameters (PEFT's PromptTuningConfig: prompt_tuning_init{,_text})."""

    num_virtual_tokens: int = 20
    init: str = "random"  # "random" | "text" | "vocab"
    init_text: str | None = None  # init="text": the text whose token embeddings start the prompt
    init_ids: tuple[int, ...] | None = None  # init="text": its token ids (set by `prepare`, or given directly)

    def __post_init__(self) -> None:
        problems = vt.check_count(self.num_virtual_tokens, "prompt tuning")
        if self.init not in INITS:
            problems.append(f"init={self.init!r}: use one of {list(INITS)}")
        if self.init == "text":
            if not (self.init_text or "").strip() and self.init_ids is None:
                problems.append("init='text' needs init_text (the text whose embeddings start the prompt)")
            if self.init_ids is not None and not self.init_ids:
                problems.append("init_ids is empty: the init text gave no tokens")
            if self.init_ids is not None and isinstance(self.num_virtual_tokens, int) \
                    and len(self.init_ids) > self.num_virtual_tokens:
                problems.append(f"the init text is {len(self.init_ids)} tokens, longer than the "
                                f"{self.num_virtual_tokens} virtual tokens; shorten it or use at least "
                                f"{len(self.init_ids)} virtual tokens")
        elif self.init_text is not None or self.init_ids is not None:
            problems.append(f"init_text/init_ids only mean something with init='text' (init={self.init!r})")
        if problems:
            raise ConfigError("invalid prompt-tuning config:\n" + bullet_list(problems))


class Prompt(Method):
    name = "prompt"
    config_cls = PromptConfig
    identity_at_init = False  # the virtual tokens are there from the start; disabling them gives the base
    peft_type = "PROMPT_TUNING"

    def prepare(self, config: PromptConfig, *, model_config: Any, tokenizer: Any = None) -> PromptConfig:
        """Checks the prompt fits the context; turns the init text into token ids (PEFT: `tokenizer(text)`)."""
        vt.check_fits_context(config.num_virtual_tokens, model_config)
        if config.init != "text" or config.init_ids is not None:
            return config
        if tokenizer is None:
            raise ConfigError("init='text' needs the model's tokenizer to turn init_text into token ids; "
                              "pass tokenizer= (or give init_ids)")
        ids = tuple(int(i) for i in tokenizer(config.init_text)["input_ids"])
        return dataclasses.replace(config, init_ids=ids)  # __post_init__ refuses a text longer than P

    def init(self, key: jax.Array, params: Mapping, config: PromptConfig) -> dict:
        vt.refuse_virtual(params)
        shapes = vt.base_shapes(params)
        p, d, vocab = config.num_virtual_tokens, shapes["hidden"], shapes["vocab"]
        table = params["model"]["embed_tokens"]["embedding"]
        if config.init == "random":
            embeddings = jax.random.normal(key, (p, d), jnp.float32)
        else:
            if config.init == "vocab":
                ids = jax.random.randint(key, (p,), 0, vocab)
            else:
                if config.init_ids is None:
                    raise ConfigError("init='text' has no token ids yet; run Prompt().prepare(config, "
                                      "model_config=..., tokenizer=...) first, or give init_ids")
                bad = sorted({i for i in config.init_ids if not 0 <= i < vocab})
                if bad:
                    raise ConfigError(f"init_ids {bad} are outside the model's vocabulary of {vocab}; "
                                      "tokenize the init text with the model's own tokenizer")
                reps = -(-p // len(config.init_ids))
                ids = jnp.asarray((list(config.init_ids) * reps)[:p], jnp.int32)
            embeddings = jnp.take(jnp.asarray(table), ids, axis=0).astype(jnp.float32)
        return {**params, "prompt": {"embeddings": embeddings}}

    def is_adapter(self, path: Path, config: Any) -> bool:
        return path[0] == "prompt"

    def save(self, path: Any, params: Mapping, config: PromptConfig, *, model_config: Any,
             base_model_name_or_path: str, tokenizer: Any = None, overwrite: bool = False) -> None:
        """A PEFT PROMPT_TUNING folder: `prompt_embeddings` (P, D) and the init PEFT would record."""
        emb = params.get("prompt", {}).get("embeddings")
        if emb is None:
            raise ConfigError("the parameters carry no prompt/embeddings; pass the full tree with the adapter, "
                              "e.g. Prompt().combine(adapter, base), or run Prompt().init first")
        want = (config.num_virtual_tokens, model_config.hidden_size)
        if tuple(emb.shape) != want:
            raise ConfigError(f"prompt/embeddings has shape {tuple(emb.shape)} but the config and model need {want}; "
                              "pass the PromptConfig the adapter was created with")
        cfg = prompt_learning.peft_common(model_config, peft_type=self.peft_type, num_virtual_tokens=config.num_virtual_tokens,
                             token_dim=model_config.hidden_size, heads=model_config.num_attention_heads,
                             base_model_name_or_path=base_model_name_or_path)
        # PEFT rebuilds a TEXT init from tokenizer_name_or_path only when it trains the adapter further, but its
        # config refuses TEXT without both; ids given without their text are recorded as RANDOM (the init is
        # history once trained).
        text = config.init == "text" and bool(config.init_text) and bool(base_model_name_or_path)
        init = config.init if text or config.init != "text" else "random"
        cfg.update(prompt_tuning_init=_PEFT_INIT[init], modules_to_save=None,
                   prompt_tuning_init_text=config.init_text if text else None,
                   tokenizer_name_or_path=base_model_name_or_path if text else None)
        prompt_learning.write_folder(path, cfg, np.asarray(emb, np.float32), overwrite=overwrite)

    def load(self, path: Any, model: Any, params: Mapping) -> tuple[Any, dict, PromptConfig]:
        """Reads a PEFT PROMPT_TUNING folder (ours or PEFT's) onto `params`."""
        raw, emb = prompt_learning.read_folder(path, self.peft_type)
        c = model.config
        prompt_learning.check_fits_model(path, {
            "token_dim (hidden size)": (raw.get("token_dim"), c.hidden_size),
            "prompt_embeddings shape": (tuple(emb.shape), (raw.get("num_virtual_tokens", emb.shape[0]),
                                                            c.hidden_size)),
        })
        init = {v: k for k, v in _PEFT_INIT.items()}.get(raw.get("prompt_tuning_init"), "random")
        text = raw.get("prompt_tuning_init_text") if init == "text" else None
        if init == "text" and not text:  # the init is history once trained; keep the config valid
            init = "random"
        # A text longer than P is fine here: PEFT trimmed it when it made the adapter.
        config = PromptConfig(num_virtual_tokens=int(emb.shape[0]), init=init, init_text=text)
        vt.check_fits_context(config.num_virtual_tokens, c)
        vt.refuse_virtual(params)
        return model, {**params, "prompt": {"embeddings": jnp.asarray(emb)}}, config



def _count(params: Mapping) -> int:
    return int(params["prompt"]["embeddings"].shape[0]) if "prompt" in params else 0


def _layer_kv(params: Mapping, config: Any, run_embeddings: Any) -> list[hooks.LayerKV]:
    """The virtual tokens attend only to each other, so one pass over them alone (positions 0..P-1) gives
    their keys and values for every row."""
    del config
    return run_embeddings(params["prompt"]["embeddings"])


VIRTUAL_SOURCE = hooks.VirtualTokenSource(name="prompt", description="prompt tuning (prompt/embeddings)",
                                          count=_count, layer_kv=_layer_kv, top_keys=("prompt",))
