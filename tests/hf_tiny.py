"""Tiny random transformers models built locally (odd, distinct sizes so transpositions cannot hide)."""

from __future__ import annotations

import numpy as np

VOCAB = 61

# One shared tiny config per family beyond Llama's own (tests/conftest.py `family_base`), with the family's
# features on; tests/test_families.py runs parity, generation, export and PEFT folders over this table.
FAMILY_CASES = {
    "qwen3": dict(model_type="qwen3", tied=True, sliding_window=5),
    "gemma2": dict(model_type="gemma2", tied=True, sliding_window=5),
    "gemma3_text": dict(model_type="gemma3_text", tied=True, sliding_window=5),
    "phi3": dict(model_type="phi3", sliding_window=7),
    "mixtral": dict(model_type="mixtral", sliding_window=5),
    "qwen3_moe": dict(model_type="qwen3_moe", tied=True, sliding_window=5),
}
# Extra parity-only variants (the other side of each switch: untied, biases, no window).
FAMILY_VARIANTS = {
    "qwen3-untied-bias": dict(model_type="qwen3", bias=True),
    "gemma2-untied-bias": dict(model_type="gemma2", bias=True, sliding_window=4),
    "gemma3-untied-bias": dict(model_type="gemma3_text", bias=True, sliding_window=4),
    "phi3-tied-plain-rope": dict(model_type="phi3", tied=True, rope=dict(rope_type="default", rope_theta=500.0,
                                                                          partial_rotary_factor=1.0)),
}


def tiny_hf_config(model_type: str = "llama", *, tied: bool = False, bias: bool = False, rope: dict | None = None,
                   layers: int = 3, sliding_window: int | None = None):
    import transformers

    kw = dict(vocab_size=VOCAB, hidden_size=40, intermediate_size=52, num_hidden_layers=layers,
              num_attention_heads=5, num_key_value_heads=1, head_dim=8, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=tied,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if model_type == "llama":
        kw["attention_bias"] = bias
    if rope is not None:
        kw["rope_parameters"] = rope
    if model_type == "qwen3":
        # head_dim 12 != hidden 40 / 5 heads; layers from 1 on slide (window 5) when a window is given.
        kw.update(head_dim=12, attention_bias=bias, use_sliding_window=sliding_window is not None,
                  sliding_window=sliding_window, max_window_layers=1)
        return transformers.Qwen3Config(**kw)
    if model_type in ("gemma2", "gemma3_text"):
        # Caps small enough that the tiny model's scores (~0.02) and logits (~1) go past them.
        kw.update(head_dim=12, attention_bias=bias, sliding_window=sliding_window or 4096, query_pre_attn_scalar=10,
                  attn_logit_softcapping=0.01, final_logit_softcapping=0.5)
        if model_type == "gemma2":
            return transformers.Gemma2Config(**kw)
        kw.update(layer_types=["sliding_attention", "full_attention", "sliding_attention"][:layers],
                  rope_parameters=rope or {"full_attention": dict(rope_type="linear", rope_theta=1000.0, factor=2.0),
                                           "sliding_attention": dict(rope_type="default", rope_theta=10000.0)})
        return transformers.Gemma3TextConfig(**kw)
    if model_type == "phi3":
        # head_dim 12 (hidden 48 / 4 heads, as transformers derives it), half of it rotary; LongRoPE switching
        # at 20 positions.
        kw.update(hidden_size=48, num_attention_heads=4, sliding_window=sliding_window, max_position_embeddings=64,
                  original_max_position_embeddings=20)
        kw.pop("head_dim")
        half = 3  # rotary features 6 / 2
        if rope is None:
            rng = np.random.default_rng(7)
            rope = dict(rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=0.5,
                        short_factor=(1.0 + rng.random(half)).round(3).tolist(),
                        long_factor=(2.0 + 4 * rng.random(half)).round(3).tolist(),
                        original_max_position_embeddings=20)
        kw["rope_parameters"] = rope
        return transformers.Phi3Config(**kw)
    if model_type == "mixtral":
        # 7 experts of width 28, top 3 (several experts per token; 3 * 23 tokens reach every expert). Expert widths
        # are multiples of 4 floats: transformers' default grouped_mm experts need 16-byte strides.
        kw.update(intermediate_size=28, num_local_experts=7, num_experts_per_tok=3, sliding_window=sliding_window)
        return transformers.MixtralConfig(**kw)
    if model_type == "qwen3_moe":
        # 6 experts of width 20, top 3 without renormalising; layer 1 dense (mlp_only_layers), head_dim 12.
        kw.update(head_dim=12, attention_bias=bias, moe_intermediate_size=20, num_experts=6, num_experts_per_tok=3,
                  norm_topk_prob=False, mlp_only_layers=[1], use_sliding_window=sliding_window is not None,
                  sliding_window=sliding_window)
        return transformers.Qwen3MoeConfig(**kw)
    if model_type == "qwen2":
        kw.pop("head_dim")
        return transformers.Qwen2Config(**kw)
    if model_type == "mistral":
        kw["sliding_window"] = sliding_window
        return transformers.MistralConfig(**kw)
    return transformers.LlamaConfig(**kw)


def tiny_hf_model(config, seed: int = 0):
    import torch
    import transformers

    torch.manual_seed(seed)
    # MoE: transformers' eager expert loop (its default grouped_mm needs 16-byte strides, odd sizes have none).
    moe = {"experts_implementation": "eager"} if config.model_type in ("mixtral", "qwen3_moe") else {}
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager", **moe)
    # Random norms, so a missing or misplaced norm weight shows in the logits; MoE routers of std 1, so routing
    # spreads over every expert instead of near-uniform ties.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight") and moe:
                p.normal_(0.0, 1.0)
            elif name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model.eval()


def hf_logits(model, ids: np.ndarray, mask: np.ndarray | None = None, positions: np.ndarray | None = None):
    import torch

    kw = {}
    if mask is not None:
        kw["attention_mask"] = torch.tensor(mask)
    if positions is not None:
        kw["position_ids"] = torch.tensor(positions)
    with torch.no_grad():
        return model(torch.tensor(ids), **kw).logits.float().numpy()



def hf_greedy_left_padded(model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """transformers' greedy continuations of `prompts`, batched with left padding (pad id 0, no EOS stop)."""
    import torch

    width = max(map(len, prompts))
    ids = np.zeros((len(prompts), width), np.int64)
    mask = np.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    with torch.no_grad():
        out = model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[:, width:].tolist()

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_tokenizer(corpus, vocab_size: int = 293):
    """A byte-level BPE tokenizer trained locally on `corpus`, with a SmolLM2-like chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(list(corpus), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<pad>",
                                  bos_token="<|im_start|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_model_folder(path, *, layers: int = 2, seed: int = 0, family: str | None = None) -> str:
    """A tiny random Llama (or `FAMILY_CASES[family]`) + tokenizer saved as an HF folder: a `--model` for
    end-to-end runs."""
    from jaxpeft.data.tasks import get_task

    records = get_task("dates").make_split("train", 200, 0)
    tok = tiny_tokenizer([r["instruction"] + " " + r["input"] + " " + r["output"] for r in records])
    config = tiny_hf_config(layers=layers, **(FAMILY_CASES[family] if family else {}))
    config.vocab_size = len(tok)
    config.pad_token_id, config.bos_token_id, config.eos_token_id = 0, 1, 2
    model = tiny_hf_model(config, seed=seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
