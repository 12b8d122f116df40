"""Mixture-of-experts decoders (Mixtral, Qwen3-MoE): a Llama-family decoder whose MLP is, on its sparse layers, a
top-k router over E experts stored as transformers 5.24 holds them (fused 3-D parameters, not one Linear each).

Parameter tree of a sparse layer's MLP (the rest of the layer is `models/llama.py`'s):

    mlp/gate/kernel                    (H, E)       the router; HF mlp.gate.weight (E, H) transposed
    mlp/experts/gate_up_proj/weight    (E, 2I, H)   HF mlp.experts.gate_up_proj, torch layout kept: rows [0, I) gate
    mlp/experts/down_proj/weight       (E, H, I)    HF mlp.experts.down_proj

Each expert stack is a scope of its own holding one `weight`, so an adapter on it (LoRA in PEFT's
`target_parameters` form, `hooks.ParamAdapter`) sits beside it as `lora_a`/`lora_b`/`lora_scale`, like LoRA beside
a kernel. Checkpoint files name the experts one by one (`convert/experts.py` stacks and splits them).

Routing as transformers 5.24 (`MixtralTopKRouter` / `Qwen3MoeTopKRouter`): logits x W_r in the compute dtype,
softmax in fp32, top-k, renormalised over the k (Mixtral always, Qwen3-MoE when `norm_topk_prob`); Qwen3-MoE casts
the weights to the compute dtype, Mixtral keeps them fp32. The experts run through `kernels/moe` (grouped, capacity
free: the logits equal transformers'). Router logits are sown into the `intermediates` collection (one (N, E) entry
per sparse layer) for the load-balancing loss (`load_balancing_loss`, `train/router_loss.py`).

Shape legend: B batch, S length, N = B*S tokens, H hidden, I expert width, E experts, K experts per token.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxpeft.kernels.moe import expert_mlp, expert_parallel
from jaxpeft.models import hooks, llama
from jaxpeft.models.layers import Linear

EXPERT_PARAMS = ("gate_up_proj", "down_proj")
ROUTER_LOGITS = "router_logits"


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoeFields:
    """The MoE fields shared by Mixtral's and Qwen3-MoE's configs (mixed into their Llama-family config class)."""

    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    router_weights_in_compute_dtype: bool = False  # Qwen3-MoE casts the top-k weights to the logits' dtype
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    router_aux_loss_coef: float = 0.001
    output_router_logits: bool = False  # as transformers: add coef * load-balancing loss to the training loss
    moe_implementation: str | None = None  # kernels/moe implementation (None: the platform default); not saved

    def is_sparse_layer(self, layer: int) -> bool:
        """transformers' rule: not in `mlp_only_layers`, and (layer + 1) a multiple of `decoder_sparse_step`."""
        return (layer not in self.mlp_only_layers and self.num_experts > 0
                and (layer + 1) % self.decoder_sparse_step == 0)

    def sparse_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_sparse_layer(i)]  # type: ignore[attr-defined]

    def moe_problems(self) -> list[str]:
        problems = []
        if self.num_experts < 1 or not 1 <= self.num_experts_per_tok <= self.num_experts:
            problems.append(f"num_experts={self.num_experts}, num_experts_per_tok={self.num_experts_per_tok} "
                            "(need 1 <= experts per token <= experts)")
        if self.decoder_sparse_step < 1:
            problems.append(f"decoder_sparse_step={self.decoder_sparse_step} (need >= 1)")
        return problems


def route(logits_NxE: jax.Array, k: int, normalize: bool, in_compute_dtype: bool) -> tuple[jax.Array, jax.Array]:
    """(experts (N, K) int32, weights (N, K)): softmax in fp32, top-k, optional renormalisation (transformers')."""
    probs = jax.nn.softmax(logits_NxE.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, k)
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    if in_compute_dtype:
        weights = weights.astype(logits_NxE.dtype)
    return experts.astype(jnp.int32), weights


def load_balancing_loss(router_logits: list[jax.Array], num_experts: int, top_k: int,
                        attention_mask_BxS: jax.Array | None = None) -> jax.Array:
    """transformers' `load_balancing_loss_func` (Switch Transformer eqs. 4-6): E * sum_e f_e * P_e over every sparse
    layer's tokens, f_e the share of (token, slot) picks of expert e per token, P_e its mean router probability;
    padded tokens (mask 0) are left out."""
    counts_E = jnp.zeros((num_experts,), jnp.float32)
    probs_E = jnp.zeros((num_experts,), jnp.float32)
    rows = jnp.float32(0.0)
    for logits_NxE in router_logits:
        probs = jax.nn.softmax(logits_NxE.astype(jnp.float32), axis=-1)
        _, chosen_NxK = jax.lax.top_k(probs, top_k)
        mask_N = (jnp.ones(probs.shape[:1], jnp.float32) if attention_mask_BxS is None
                  else attention_mask_BxS.reshape(-1).astype(jnp.float32))
        counts_E = counts_E + jnp.sum(jax.nn.one_hot(chosen_NxK, num_experts) * mask_N[:, None, None], axis=(0, 1))
        probs_E = probs_E + jnp.sum(probs * mask_N[:, None], axis=0)
        rows = rows + jnp.sum(mask_N)
    return jnp.sum((counts_E / rows) * (probs_E / rows)) * num_experts


class ExpertWeight(nn.Module):
    """One fused expert stack: a scope with its `weight`, read through the registered param adapters."""

    shape: tuple[int, ...]
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self) -> jax.Array:
        if self.is_initializing():
            self.param("weight", nn.initializers.normal(0.02), self.shape, self.param_dtype)
        return hooks.adapted_param(self.variables["params"], self.dtype)


class SparseMoeBlock(nn.Module):
    """Router + experts (transformers' `*SparseMoeBlock`)."""

    config: Any
    dtype: Any
    param_dtype: Any
    dropout_rate: float
    deterministic: bool

    @nn.compact
    def __call__(self, x_BxSxH):
        c = self.config
        b, s, h = x_BxSxH.shape
        e, i = c.num_experts, c.moe_intermediate_size
        hooks.check_known("mlp", list(self.variables.get("params", {})), ("gate", "experts"))
        logits = Linear(e, False, self.dtype, self.param_dtype, self.dropout_rate, self.deterministic,
                        name="gate")(x_BxSxH).reshape(b * s, e)
        self.sow("intermediates", ROUTER_LOGITS, logits)
        experts_NxK, weights_NxK = route(logits, c.num_experts_per_tok, c.norm_topk_prob,
                                         c.router_weights_in_compute_dtype)
        experts = Experts(e, h, i, self.dtype, self.param_dtype, name="experts")
        gate_up, down = experts()
        mesh = expert_parallel.current_mesh()
        if mesh is not None:  # the train runner's expert axis: tokens to the devices holding their experts
            out = expert_parallel.expert_mlp_expert_parallel(x_BxSxH.reshape(b * s, h), gate_up, down, experts_NxK,
                                                             weights_NxK, self.dtype, mesh)
        else:
            out = expert_mlp(x_BxSxH.reshape(b * s, h), gate_up, down, experts_NxK, weights_NxK, self.dtype,
                             implementation=c.moe_implementation)
        return out.reshape(b, s, h)


class Experts(nn.Module):
    """The expert stacks (E, 2I, H) and (E, H, I) as the model uses them (adapters applied)."""

    num_experts: int
    hidden: int
    width: int
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array]:
        hooks.check_known("experts", list(self.variables.get("params", {})), EXPERT_PARAMS)
        e, h, i = self.num_experts, self.hidden, self.width
        gate_up = ExpertWeight((e, 2 * i, h), self.dtype, self.param_dtype, name="gate_up_proj")()
        down = ExpertWeight((e, h, i), self.dtype, self.param_dtype, name="down_proj")()
        return gate_up, down


class MoeDecoderLayer(llama.DecoderLayer):
    """Llama's layer; its MLP is the sparse block on the config's sparse layers, Llama's dense MLP elsewhere."""

    @property
    def mlp_cls(self):  # type: ignore[override]
        return SparseMoeBlock if self.config.is_sparse_layer(int(self.name)) else llama.MLP


class MoeStack(llama.DecoderStack):
    layer_cls = MoeDecoderLayer


class MoeModel(llama.LlamaModel):
    stack_cls = MoeStack


class MoeForCausalLM(llama.LlamaForCausalLM):
    """Mixtral / Qwen3-MoE (the config says which routing and which layers are sparse)."""

    model_cls = MoeModel


def router_logits_of(intermediates: Any) -> list[jax.Array]:
    """The sown (N, E) router logits of every sparse layer, in layer order, from `apply(..., mutable=
    ["intermediates"])`'s returned state."""
    layers = intermediates.get("intermediates", intermediates)["model"]["layers"]
    return [layers[k]["mlp"][ROUTER_LOGITS][0] for k in sorted(layers, key=int) if "mlp" in layers[k]
            and ROUTER_LOGITS in layers[k]["mlp"]]
