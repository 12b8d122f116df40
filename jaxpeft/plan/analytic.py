"""The analytic memory plan of one jaxpeft train step (`train/step.py`), from shapes alone.

Legend: B batch rows, S sequence length, T = B*S tokens, D hidden, Q = heads*head_dim, C = kv_heads*head_dim,
I intermediate, V vocab, H heads, L layers, K target slots (the train step gathers the target positions
before the vocabulary projection; default B*(S-1) rounded up to 8), c bytes of the compute dtype.

What is counted (GB = 1e9 bytes):
- weights: every leaf of the parameter tree as stored: the base in `param_dtype`, NF4 kernels (QLoRA) as
  `quant.nf4` holds them (packed codes (N+1)//2 bytes, absmax uint8 [K] with double quantization
  plus fp32 nested absmax [ceil(K/256)] and an fp32 offset, or fp32 absmax [K] without), LoRA A/B and
  the frozen fp32 `lora_scale` scalars.
- MoE models (Mixtral, Qwen3-MoE): each sparse layer's router is a linear (never 4-bit) and its expert stacks
  (E, 2I, H) and (E, H, I) are counted whole in the total parameters; the active parameters count K of the E
  experts. QLoRA quantizes each stack as one NF4 tensor blockwise over its flattened weights (as the linears).
- gradients: the trainable leaves only, in their own dtype (the step differentiates the trainable
  partition).
- optimizer: optax AdamW's mu and nu, which optax keeps in each trainable leaf's dtype (fp32 for LoRA
  adapters; the param dtype for full fine-tuning), plus its two int32 step counts.
- misc: the batch (input_ids, attention_mask, loss_mask: int32 [1, B, S]), the rng key and step.
- activations, per decoder layer, the tensors that stay alive from the forward to the backward. The
  list is what XLA keeps after fusion for our layer (read off its buffer assignment on the CPU, fp32):
    residual stream h after attention and after the MLP       2 T D c
    queries (projection, rotate-half, rotated) and k, v       3 T Q c + 2 T C c
    softmax: exp(scores) in fp32 (+ the probabilities in c)   B H S S 4 (+ B H S S c when c != 4)
    MLP: gate, up, sigmoid(gate), silu(gate)                  4 T I c
    the input of every trained linear (a LoRA target or a trainable kernel): the normed x of q/k/v
    (T D c), the attention output for o (T Q c), the normed x of gate/up (T D c), silu(gate)*up for
    down (T I c); LoRA's x A (T r c) per adapted module.
  With remat only each layer's input (T D c) is kept, and one layer's list is rebuilt while its
  backward runs.
- transients: the loss head (logits of the K targets in fp32, K V 4, plus K V c when c != 4, and the
  gathered hidden states and their cotangent, 2 K D c; with the chunked loss, train/chunked_loss.py, the
  logits are one chunk's, C rows instead of K); one layer's backward (the larger of the
  attention's dscores and dprobs in fp32, 2 B H S S 4, and the MLP's dgate and dup, 2 T I c, which run
  one after the other; dh and dx, 2 T D c; with an NF4 base, one dequantized kernel in c); the
  attention mask (B S S bool) and rope tables (2 B S head_dim c) once.

The peak: the static bytes (weights, optimizer, misc) plus the largest of the step's phases: the end
of the forward (all saved activations and the head), the backward of each layer l (saved activations
of layers < l, layer l's list, its backward transients, the gradients made so far), and the optimizer
update (all gradients).
"""

from __future__ import annotations

import dataclasses

from jaxpeft.core.errors import ConfigError, bullet_list
from jaxpeft.core.targets import Targets, name_matches
from jaxpeft.models.config import LlamaConfig
from jaxpeft.models.families import family_of
from jaxpeft.plan.shapes import ExpertShape, LinearShape, layer_experts, layer_linears
from jaxpeft.quant.nf4 import ALLOWED_BLOCKSIZES as QUANT_BLOCKSIZES, NESTED_BLOCKSIZE
from jaxpeft.train.chunked_loss import resolve_chunk

METHODS = ("full", "lora", "qlora")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GB = 1e9


@dataclasses.dataclass(frozen=True, kw_only=True)
class PlanConfig:
    """What to plan: the method, the batch shape and the dtypes.

    `dtype` is the compute dtype, `param_dtype` the stored dtype of the base weights (which full
    fine-tuning trains, so its gradients and Adam moments share it); LoRA adapters are fp32. QLoRA
    quantizes every linear but `lm_head` (NF4, `quant_blocksize`, `double_quant`) and puts LoRA on top.
    """

    method: str = "lora"
    batch_size: int = 1
    seq_len: int = 512
    remat: bool = False
    rank: int = 16
    targets: Targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    dtype: str = "bfloat16"
    param_dtype: str = "bfloat16"
    quant_blocksize: int = 64
    double_quant: bool = True
    max_targets: int | None = None
    loss_chunk: int | None = None  # as TrainConfig.loss_chunk: None auto, 0 off

    def __post_init__(self) -> None:
        problems = []
        if self.method not in METHODS:
            problems.append(f"method={self.method!r}: expected one of {list(METHODS)}")
        if self.batch_size < 1:
            problems.append(f"batch_size={self.batch_size}: must be at least 1")
        if self.seq_len < 2:
            problems.append(f"seq_len={self.seq_len}: must be at least 2 (a target needs a token before it)")
        if self.rank < 1:
            problems.append(f"rank={self.rank}: must be at least 1")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPE_BYTES:
                problems.append(f"{name}={getattr(self, name)!r}: expected one of {list(DTYPE_BYTES)}")
        if self.quant_blocksize not in QUANT_BLOCKSIZES:
            problems.append(f"quant_blocksize={self.quant_blocksize}: expected one of {list(QUANT_BLOCKSIZES)}")
        if self.max_targets is not None and self.max_targets < 1:
            problems.append(f"max_targets={self.max_targets}: must be at least 1")
        if problems:
            raise ConfigError("invalid memory plan config:\n" + bullet_list(problems))

    @property
    def targets_k(self) -> int:
        """K, the static number of target slots of the loss (as `micro_batch_targets` bounds it)."""
        if self.max_targets is not None:
            return self.max_targets
        return max(8, -(-self.batch_size * (self.seq_len - 1) // 8) * 8)


@dataclasses.dataclass(frozen=True)
class Item:
    """One line of a plan: a named amount of bytes."""

    name: str
    nbytes: int


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """A plan's breakdown; every figure is in bytes."""

    config: LlamaConfig
    plan: PlanConfig
    weights: tuple[Item, ...]
    trainable_params: int
    base_params: int
    active_params: int  # base_params less the experts a token does not run (MoE: E - K per sparse layer)
    gradients: int
    optimizer: int
    misc: int
    layer_saved: tuple[Item, ...]  # one layer's saved-for-backward list
    saved_per_layer: int  # what each layer keeps until its backward (its input only, with remat)
    head: int
    layer_backward: int
    shared: int
    phases: tuple[Item, ...]  # dynamic bytes of each phase (the largest backward phase only)

    @property
    def weight_bytes(self) -> int:
        return sum(i.nbytes for i in self.weights)

    @property
    def static(self) -> int:
        """Bytes that live through the whole step: the jitted step's arguments."""
        return self.weight_bytes + self.optimizer + self.misc

    @property
    def activations(self) -> int:
        """Saved activations of all layers (with remat: their inputs plus one rebuilt layer)."""
        n = self.config.num_hidden_layers
        rebuilt = sum(i.nbytes for i in self.layer_saved) if self.plan.remat else 0
        return n * self.saved_per_layer + rebuilt

    @property
    def peak_phase(self) -> Item:
        return max(self.phases, key=lambda i: i.nbytes)

    @property
    def peak(self) -> int:
        return self.static + self.peak_phase.nbytes


def nf4_bytes(n_weights: int, *, blocksize: int = 64, double_quant: bool = True) -> int:
    """Bytes a 4-bit kernel (`quant.nf4`) of `n_weights` weights holds (codes, absmax, nested absmax, offset)."""
    k = -(-n_weights // blocksize)
    packed = (n_weights + 1) // 2
    if not double_quant:
        return packed + 4 * k
    return packed + k + 4 * (-(-k // NESTED_BLOCKSIZE)) + 4


def _lora_targets(config: LlamaConfig, plan: PlanConfig) -> list[LinearShape]:
    linears = [m for layer in range(config.num_hidden_layers) for m in layer_linears(config, layer)]
    chosen = [m for m in linears if name_matches(m.name, plan.targets)]
    if not chosen:
        suffixes = sorted({m.name.split(".")[-1] for m in linears})
        raise ConfigError(f"targets {plan.targets!r} match no linear module of this model; linear modules end in "
                          f"{suffixes} (lm_head is never a LoRA target here). Use those suffixes, 'all-linear' or "
                          "a regex over full names.")
    too_big = [f"{m.name}: rank {plan.rank} > min({m.in_features}, {m.out_features})" for m in chosen
               if plan.rank > min(m.in_features, m.out_features)]
    if too_big:
        raise ConfigError("LoRA rank exceeds the layer's dimensions:\n" + bullet_list(too_big[:5])
                          + "\nLower --rank below both dimensions.")
    return chosen


def _experts(config: LlamaConfig) -> list[ExpertShape]:
    return [x for layer in range(config.num_hidden_layers) for x in layer_experts(config, layer)]


def active_params(config: LlamaConfig, base: int) -> int:
    """`base` less the expert weights a token does not run: (E - K) / E of every stack."""
    return base - sum(x.numel // x.experts * (x.experts - config.num_experts_per_tok) for x in _experts(config))


def _weights(config: LlamaConfig, plan: PlanConfig, adapted: list[LinearShape]) -> tuple[list[Item], int, int]:
    """(weight items, trainable parameter count, base parameter count)."""
    c, p = config, DTYPE_BYTES[plan.param_dtype]
    linears = [m for layer in range(c.num_hidden_layers) for m in layer_linears(c, layer)]
    experts = _experts(c)
    expert_params = sum(x.numel for x in experts)
    layer_norms = sum(int(getattr(c, n.features)) for n in family_of(c.model_type).norms)  # q/k norms: head_dim
    norms = layer_norms * c.num_hidden_layers + c.hidden_size
    embed = c.vocab_size * c.hidden_size
    head = 0 if c.tie_word_embeddings else c.hidden_size * c.vocab_size
    biases = sum(m.out_features for m in linears if m.bias)
    kernels = sum(m.in_features * m.out_features for m in linears)
    base = embed + head + norms + biases + kernels + expert_params
    lora = sum(plan.rank * (m.in_features + m.out_features) for m in adapted)
    if plan.method == "full":
        return [Item(f"base ({plan.param_dtype}, all trainable)", p * base)], base, base
    items = []
    if plan.method == "qlora":
        router = family_of(c.model_type).experts
        quantized = [m for m in linears if router is None or not m.name.endswith(f".{router.router.name}")]
        kernels = sum(m.in_features * m.out_features for m in quantized)  # the router stays in param_dtype
        nf4 = sum(nf4_bytes(m.in_features * m.out_features, blocksize=plan.quant_blocksize,
                            double_quant=plan.double_quant) for m in quantized)
        dq = "+double quant" if plan.double_quant else ""
        items.append(Item(f"base linears (NF4, blocksize {plan.quant_blocksize}{dq})", nf4))
        if experts:
            items.append(Item(f"expert stacks (NF4 over each flattened stack, {len(experts)} stacks)",
                              sum(nf4_bytes(x.numel, blocksize=plan.quant_blocksize, double_quant=plan.double_quant)
                                  for x in experts)))
        items.append(Item(f"embeddings, norms, lm_head, biases ({plan.param_dtype})",
                          p * (base - kernels - expert_params)))
    else:
        items.append(Item(f"base ({plan.param_dtype}, frozen)", p * base))
    items.append(Item(f"LoRA A/B (float32, trainable, r={plan.rank}, {len(adapted)} modules)", 4 * lora))
    items.append(Item("LoRA scales (float32 scalars, frozen)", 4 * len(adapted)))
    return items, lora, base


def _layer_saved(config: LlamaConfig, plan: PlanConfig, adapted: set[str]) -> list[Item]:
    """One layer's saved-for-backward tensors (no remat), see the module docstring."""
    c, b, s = config, plan.batch_size, plan.seq_len
    t, cb = b * s, DTYPE_BYTES[plan.dtype]
    d, q, kv, i = c.hidden_size, c.q_dim, c.kv_dim, c.intermediate_size
    scores = b * c.num_attention_heads * s * s
    names = {m.name.split(".")[-1] for m in layer_linears(c, 0)}
    trained = names if plan.method == "full" else {n for n in names if n in adapted}
    items = [
        Item("residual stream (after attention, after MLP)", 2 * t * d * cb),
        Item("queries (projection, rotate-half, rotated), keys, values", t * (3 * q + 2 * kv) * cb),
        Item("softmax exp(scores) (float32)", scores * 4),
    ]
    if cb != 4:
        items.append(Item(f"attention probabilities ({plan.dtype})", scores * cb))
    if layer_experts(c, 0):  # a sparse MLP: each token runs K experts of width moe_intermediate_size
        k, i = c.num_experts_per_tok, c.moe_intermediate_size
        items.append(Item(f"experts' gate, up, sigmoid(gate), silu(gate) ({k} per token)", 4 * t * k * i * cb))
        items.append(Item("expert inputs gathered per (token, expert) pair", t * k * d * cb))
    else:
        items.append(Item("MLP gate, up, sigmoid(gate), silu(gate)", 4 * t * i * cb))
    inputs: dict[str, tuple[set[str], int]] = {}  # the tensor a trained linear reads -> (its readers, width)
    for m in family_of(c.model_type).linears:
        inputs.setdefault(m.reads, (set(), m.shape(c)[0]))[0].add(m.short)
    for name, (users, width) in inputs.items():
        if users & trained:
            items.append(Item(name, t * width * cb))
    if plan.method != "full" and adapted:
        items.append(Item(f"LoRA x A ({len(adapted)} modules)", len(adapted) * t * plan.rank * cb))
    return items


def plan_memory(config: LlamaConfig, plan: PlanConfig) -> MemoryPlan:
    """The memory plan of one train step of `plan.method` on a model of `config`'s shapes."""
    c = config
    adapted_modules = [] if plan.method == "full" else _lora_targets(c, plan)
    weights, trainable, base = _weights(c, plan, adapted_modules)
    train_bytes = DTYPE_BYTES[plan.param_dtype] if plan.method == "full" else 4
    gradients = trainable * train_bytes
    optimizer = 2 * trainable * train_bytes + 2 * 4
    b, s, t, cb = plan.batch_size, plan.seq_len, plan.batch_size * plan.seq_len, DTYPE_BYTES[plan.dtype]
    misc = 3 * 4 * t + 8 + 4

    by_layer: dict[int, set[str]] = {}
    for m in adapted_modules:
        by_layer.setdefault(int(m.name.split(".")[2]), set()).add(m.name.split(".")[-1])
    n = c.num_hidden_layers
    # Layers differ only when targets pick some layers; plan each layer with its own list.
    saved_lists = [_layer_saved(c, plan, by_layer.get(layer, set())) for layer in range(n)]
    saved = [sum(i.nbytes for i in items) for items in saved_lists]
    kept = [t * c.hidden_size * cb] * n if plan.remat else saved

    k, v, d = plan.targets_k, c.vocab_size, c.hidden_size
    rows = resolve_chunk(plan.loss_chunk, k, v) or k  # the logits rows alive at once
    head = rows * v * 4 + (rows * v * cb if cb != 4 else 0) + 2 * k * d * cb
    scores = b * c.num_attention_heads * s * s
    dequant = 0
    if plan.method == "qlora":
        # One dequantized kernel in the compute dtype (an expert stack whole: the grouped compute dequantizes it).
        dequant = max([m.in_features * m.out_features for m in layer_linears(c, 0)]
                      + [x.numel for x in layer_experts(c, 0)]) * cb
    # The MLP's backward (dgate, dup) and the attention's (dscores, dprobs) run one after the other.
    width = c.num_experts_per_tok * c.moe_intermediate_size if layer_experts(c, 0) else c.intermediate_size
    backward = max(2 * scores * 4, 2 * t * width * cb) + 2 * t * d * cb + dequant
    shared = b * s * s + 2 * b * s * c.head_dim * cb

    # Gradients as the backward makes them (full fine-tuning only; LoRA's are small and counted whole).
    per = DTYPE_BYTES[plan.param_dtype]
    if plan.method == "full":
        head_grads = per * (d * v + d)  # lm_head (or, tied, the embedding) and the final norm
        layer_grads = [per * sum(m.in_features * m.out_features + (m.out_features if m.bias else 0)
                                 for m in layer_linears(c, layer))
                       + per * sum(x.numel for x in layer_experts(c, layer)) + per * 2 * d for layer in range(n)]
    else:
        head_grads, layer_grads = gradients, [0] * n

    phases = [Item("end of forward (loss head)", shared + sum(kept) + head + head_grads)]
    worst = None
    for layer in range(n - 1, -1, -1):
        live = shared + sum(kept[:layer]) + (kept[layer] if plan.remat else 0) + saved[layer] + backward
        live += head_grads + sum(layer_grads[layer:])
        if worst is None or live > worst.nbytes:
            worst = Item(f"backward of layer {layer}", live)
    phases.append(worst)
    phases.append(Item("optimizer update (all gradients)", shared + gradients))
    return MemoryPlan(
        config=c, plan=plan, weights=tuple(weights), trainable_params=trainable, base_params=base,
        active_params=active_params(c, base),
        gradients=gradients, optimizer=optimizer, misc=misc, layer_saved=tuple(saved_lists[-1]),
        saved_per_layer=kept[-1], head=head, layer_backward=backward, shared=shared, phases=tuple(phases),
    )


def gigabytes(nbytes: float) -> float:
    return nbytes / GB


def layer_count_scaled(config: LlamaConfig, layers: int) -> LlamaConfig:
    """`config` with `layers` decoder layers: the same widths at a size a CPU can compile."""
    if layers < 1:
        raise ConfigError(f"layers={layers}: a model needs at least one decoder layer")
    return dataclasses.replace(config, num_hidden_layers=layers)


__all__ = ["GB", "METHODS", "Item", "MemoryPlan", "PlanConfig", "active_params", "gigabytes", "layer_count_scaled", "nf4_bytes",
           "plan_memory"]
