"""Where one LoRA training step's time goes: jaxpeft against PEFT + transformers (torch), grouped the same way.

    python -m bench.profile_step                       # code_alpaca rows (../shared/data), batch 4 x 128
    python -m bench.profile_step --data=file:PATH --reps 5 --json /tmp/profile.json

One batch of real SFT rows (`bench.train_step.build_inputs`, the CLI's data path; the first batch of the
stream, whose longest row fills the 128 slots, so PEFT's dynamic padding gives it the same 4 x 128 shape and
both sides do equal work) and SmolLM2-135M with LoRA r16 on q,k,v,o, fp32. Each side runs in its own
subprocess and times, separately, each group of the step on that batch's shapes with layer 0's weights:

    embedding       the token lookup (frozen: no backward on either side)
    norms           one RMSNorm, x (2 per layer + the final one)
    q/k/v/o + LoRA  the four projections with their LoRA terms (backward: inputs and LoRA A/B), x layers
    RoPE            the cos/sin tables (once) + rotating q and k, x layers
    attention       the mask (once) + softmax attention (torch: its head transposes, repeat_kv and SDPA), x layers
    MLP             gate/up/down with SiLU (backward: input only, frozen), x layers
    head + loss     tied head + cross-entropy (jaxpeft: at the K gathered target slots; torch: every position)
    optimizer       global-norm clipping + AdamW over the LoRA leaves
    host-side       jaxpeft: Trainer.train_step on numpy minus the compiled step on device arrays; torch:
                    building the batch tensors from numpy

jaxpeft pieces are `jax.jit` of the library's own ops (`models/ops.py`, `kernels/attention`,
`train/chunked_loss.py`, `train/optim.py`); the backward is jit(vjp) minus the forward, so it includes the
residuals XLA keeps. torch pieces are the PEFT model's own modules (and transformers' rotary and SDPA
functions), the backward timed as forward+backward minus forward. The whole step (Trainer.train_step /
bench.train_step's torch step) is timed too; "unattributed" is the whole step minus the sum of the groups
(residual adds, layout changes between pieces, fusion XLA does across pieces, dispatch). Best of --reps
calls after one warm-up call, the least kept (the machine is shared; the load average is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:  # `python bench/profile_step.py` puts bench/ first on the path, not the repo
    sys.path.insert(0, _REPO)

from bench import train_step as ts  # noqa: E402
from bench.forward import _time_steps, model_folder, run_child  # noqa: E402

DEFAULT_DATA = "file:" + os.path.normpath(os.path.join(_REPO, "..", "shared", "data", "code_alpaca_2k.json"))
GROUPS = ("embedding", "norms", "q/k/v/o + LoRA", "RoPE", "attention", "MLP", "head + loss", "optimizer",
          "host-side")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DEFAULT_DATA, help="file:PATH of SFT records (default: code_alpaca_2k)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--reps", type=int, default=7, help="timed calls per piece after one warm-up call (the least counts)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="HF folder (default: the cached SmolLM2-135M folder)")
    p.add_argument("--json", default=None, help="also write both sides' figures to this file")
    p.add_argument("--side", default=None, choices=("jax", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--inputs", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _best_s(fn: Callable[[], Any], reps: int) -> float:
    """Least seconds of `fn()` (which must sync) over `reps` calls after one untimed call: on a shared machine
    the least disturbed call is the closest to the piece's own cost (torch's small ops suffer most from a
    busy core: every OpenMP region waits for both threads)."""
    return min(_time_steps(fn, reps, 0)[2])


def _row(fwd: float, fwd_bwd: float | None, count: int, once: float = 0.0) -> dict:
    """A group's figures in seconds per step: `count` calls of the piece plus `once` (a table, a mask)."""
    bwd = max(fwd_bwd - fwd, 0.0) if fwd_bwd is not None else 0.0
    return {"fwd_s": fwd * count + once, "bwd_s": bwd * count, "count": count, "piece_fwd_s": fwd,
            "piece_bwd_s": bwd, "once_s": once}


# ----------------------------------------------------------------------------------------------
# jaxpeft.


def run_jax(args: argparse.Namespace, inputs: dict[str, np.ndarray]) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    import jaxpeft
    from jaxpeft.core.partition import split_trainable
    from jaxpeft.kernels.attention.dense import dense_attention
    from jaxpeft.kernels.attention.mask import make_mask
    from jaxpeft.methods import get_method
    from jaxpeft.methods.lora import LoraConfig
    from jaxpeft.models import ops
    from jaxpeft.models.causal_lm import default_positions
    from jaxpeft.train.chunked_loss import target_nll
    from jaxpeft.train.loop import TrainConfig, Trainer
    from jaxpeft.train.optim import OptimConfig, adamw
    from jaxpeft.train.step import head_fn, target_slots

    batch = ts._batch_list(inputs)[0]
    model, params, _ = jaxpeft.from_pretrained(args.model, load_tokenizer=False)
    c = model.config
    cfg = LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=tuple(ts.DEFAULT_TARGETS.split(",")),
                     lora_dropout=0.0)
    lora = get_method("lora")
    adapted = lora.init(jax.random.PRNGKey(0), params, cfg)
    labels = lora.labels(adapted, cfg)
    b, s = batch["input_ids"].shape
    k_targets = int(inputs["max_targets"]) or max(8, -(-int(batch["loss_mask"][:, 1:].sum()) // 8) * 8)
    layers, reps = c.num_hidden_layers, args.reps
    ids, am, lm = (jnp.asarray(batch[key]) for key in ("input_ids", "attention_mask", "loss_mask"))
    layer0 = adapted["model"]["layers"]["0"]
    attn_p, mlp_p = layer0["self_attn"], layer0["mlp"]
    emb = adapted["model"]["embed_tokens"]["embedding"]
    rng = np.random.default_rng(args.seed)
    x = jnp.asarray(rng.standard_normal((b, s, c.hidden_size), np.float32))
    h, kv, e = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    q = jnp.asarray(rng.standard_normal((b, s, h, e), np.float32))
    kk = jnp.asarray(rng.standard_normal((b, s, kv, e), np.float32))
    v = jnp.asarray(rng.standard_normal((b, s, kv, e), np.float32))
    block = lambda t: jax.block_until_ready(t)  # noqa: E731

    def timed(f, primal: tuple, frozen: tuple = (), grad: bool = True) -> tuple[float, float | None]:
        """(forward s, forward+backward s) of f(*primal, *frozen), the backward w.r.t. `primal`."""
        fwd = jax.jit(f)
        t_f = _best_s(lambda: block(fwd(*primal, *frozen)), reps)
        if not grad:
            return t_f, None
        cot = jax.tree_util.tree_map(jnp.ones_like, jax.eval_shape(f, *primal, *frozen))

        def fb(p, fr, ct):  # the outputs too: else XLA drops the forward a linear's input gradient does not need
            out, vjp = jax.vjp(lambda *pp: f(*pp, *fr), *p)
            return out, vjp(ct)

        fbj = jax.jit(fb)
        return t_f, _best_s(lambda: block(fbj(primal, frozen, cot)), reps)

    rows: dict[str, dict] = {}
    t_f, _ = timed(lambda i, w: jnp.take(w, i, axis=0), (), (ids, emb), grad=False)
    rows["embedding"] = _row(t_f, None, 1)
    w_norm = layer0["input_layernorm"]["weight"]
    rows["norms"] = _row(*timed(lambda x_, w: ops.rms_norm(x_, w, c.rms_norm_eps, jnp.float32), (x,), (w_norm,)),
                         2 * layers + 1)

    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    train = {n: {"lora_a": attn_p[n]["lora_a"], "lora_b": attn_p[n]["lora_b"]} for n in names}
    frozen = {n: {key: val for key, val in attn_p[n].items() if key not in ("lora_a", "lora_b")} for n in names}
    o_in = jnp.asarray(rng.standard_normal((b, s, h * e), np.float32))

    def qkvo(x_, a_, tr, fr):
        lv = {n: {**fr[n], **tr[n]} for n in names}
        return tuple(ops.linear(x_, lv[n]) for n in names[:3]) + (ops.linear(a_, lv["o_proj"]),)

    rows["q/k/v/o + LoRA"] = _row(*timed(qkvo, (x, o_in, train), (frozen,)), layers)

    inv = jnp.asarray(c.base_inv_freq())
    tables = jax.jit(lambda m: ops.rope_cos_sin(default_positions(m), inv, jnp.float32))
    t_tab = _best_s(lambda: block(tables(am)), reps)
    cos, sin = tables(am)
    rows["RoPE"] = _row(*timed(lambda q_, k_, c_, s_: (ops.apply_rope(q_, c_, s_), ops.apply_rope(k_, c_, s_)),
                               (q, kk), (cos, sin)), layers, once=t_tab)

    mask_fn = jax.jit(lambda m: make_mask(m, right_padded=True).dense(s))
    t_mask = _best_s(lambda: block(mask_fn(am)), reps)
    allowed = mask_fn(am)
    rows["attention"] = _row(*timed(lambda q_, k_, v_, al: dense_attention(q_, k_, v_, al, jnp.float32),
                                    (q, kk, v), (allowed,)), layers, once=t_mask)
    mlp_leaves = {n: dict(mlp_p[n]) for n in ("gate_proj", "up_proj", "down_proj")}

    def mlp(x_, lv):
        return ops.linear(ops.silu(ops.linear(x_, lv["gate_proj"])) * ops.linear(x_, lv["up_proj"]), lv["down_proj"])

    rows["MLP"] = _row(*timed(mlp, (x,), (mlp_leaves,)), layers)

    def head_loss(hid, i, m, p):
        idx, valid = target_slots(m, k_targets)
        h_kd = hid[:, :-1].reshape(b * (s - 1), -1)[idx]
        nll = target_nll(head_fn(model, p), h_kd, i[:, 1:].reshape(-1)[idx], vocab=c.vocab_size)
        return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(jnp.sum(valid), 1)

    rows["head + loss"] = _row(*timed(head_loss, (x,), (ids, lm, {"model": {"embed_tokens": {"embedding": emb}}})),
                               1)

    trainable, _ = split_trainable(adapted, labels)
    optim_cfg = OptimConfig(lr=1e-4, warmup_steps=0, total_steps=100, max_grad_norm=1.0, weight_decay=0.0)
    tx = adamw(optim_cfg)
    opt_state = tx.init(trainable)
    grads = jax.tree_util.tree_map(lambda t: jnp.full_like(t, 1e-3), trainable)

    def opt_step(g, st, p):
        upd, st2 = tx.update(g, st, p)
        return optax.apply_updates(p, upd), st2

    opt_j = jax.jit(opt_step)
    rows["optimizer"] = _row(_best_s(lambda: block(opt_j(grads, opt_state, trainable)), reps), None, 1)

    trainer = Trainer(model, adapted, labels, optim_cfg=optim_cfg, train_cfg=TrainConfig(steps=100, batch_size=b),
                      max_targets=k_targets)
    whole = _best_s(lambda: trainer.train_step(batch)["loss"], reps)
    micro = jax.device_put(trainer._micro(batch))
    holder = {"state": trainer.state}

    def device_step():
        holder["state"], metrics = trainer._runner.step(holder["state"], trainer.frozen, micro)
        block(metrics)

    compiled = _best_s(device_step, reps)
    rows["host-side"] = _row(max(whole - compiled, 0.0), None, 1)
    return {"side": "jax", "rows": rows, "whole_s": whole, "device_step_s": compiled, "max_targets": k_targets,
            "shape": [b, s], "jax_version": jax.__version__, "load": os.getloadavg()}


# ----------------------------------------------------------------------------------------------
# PEFT + transformers.


def run_torch(args: argparse.Namespace, inputs: dict[str, np.ndarray]) -> dict:
    import peft
    import torch
    import transformers
    from transformers import AutoModelForCausalLM
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cols = int(inputs["torch_len"][0])
    batch = {key: val[:, :cols] for key, val in ts._batch_list(inputs)[0].items()}  # dynamic padding
    folder = model_folder(args.model)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    model = peft.get_peft_model(model, peft.LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0,
                                                       target_modules=ts.DEFAULT_TARGETS.split(",")))
    model.train()
    c = model.config
    base = model.base_model.model
    layer0 = base.model.layers[0]
    attn_m = layer0.self_attn
    b, s = batch["input_ids"].shape
    h, kv, e = c.num_attention_heads, c.num_key_value_heads, c.hidden_size // c.num_attention_heads
    layers, reps = c.num_hidden_layers, args.reps
    gen = torch.Generator().manual_seed(args.seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    trainable = [p for p in model.parameters() if p.requires_grad]

    def timed(f, primal: tuple, frozen: tuple = (), grad: bool = True) -> tuple[float, float | None]:
        def fwd():
            with torch.no_grad():
                f(*primal, *frozen)

        t_f = _best_s(fwd, reps)
        if not grad:
            return t_f, None

        def fwd_bwd():
            leaves = [p.detach().requires_grad_(True) for p in primal]
            out = f(*leaves, *frozen)
            out = out if isinstance(out, tuple) else (out,)
            torch.autograd.backward(out, [torch.ones_like(o) for o in out])
            for p in trainable:
                p.grad = None

        return t_f, _best_s(fwd_bwd, reps)

    rows: dict[str, dict] = {}
    ids = torch.from_numpy(batch["input_ids"].astype(np.int64))
    am = torch.from_numpy(batch["attention_mask"].astype(np.int64))
    rows["embedding"] = _row(*timed(lambda i: base.model.embed_tokens(i), (), (ids,), grad=False), 1)
    x = rand(b, s, c.hidden_size)
    rows["norms"] = _row(*timed(lambda x_: layer0.input_layernorm(x_), (x,)), 2 * layers + 1)
    o_in = rand(b, s, h * e)
    rows["q/k/v/o + LoRA"] = _row(*timed(lambda x_, a_: (attn_m.q_proj(x_), attn_m.k_proj(x_), attn_m.v_proj(x_),
                                                         attn_m.o_proj(a_)), (x, o_in)), layers)
    pos = (am.cumsum(1) - 1).clamp(min=0)
    t_tab = _best_s(lambda: base.model.rotary_emb(x, pos), reps)
    cos, sin = base.model.rotary_emb(x, pos)
    q, k = rand(b, h, s, e), rand(b, kv, s, e)
    rows["RoPE"] = _row(*timed(lambda q_, k_, c_, s_: apply_rotary_pos_emb(q_, k_, c_, s_), (q, k), (cos, sin)),
                        layers, once=t_tab)

    def make_mask():  # what create_causal_mask hands SDPA for a right-padded batch: (B, 1, S, S) bool
        causal = torch.ones(s, s, dtype=torch.bool).tril()
        return causal[None, None] & am.bool()[:, None, None, :]

    t_mask = _best_s(make_mask, reps)
    mask = make_mask()
    q_bshe, k_bske, v_bske = rand(b, s, h * e), rand(b, s, kv * e), rand(b, s, kv * e)

    def attention(q_, k_, v_, m):  # LlamaAttention's view/transpose around the attention function
        qh = q_.view(b, s, h, e).transpose(1, 2)
        kh, vh = k_.view(b, s, kv, e).transpose(1, 2), v_.view(b, s, kv, e).transpose(1, 2)
        out, _ = sdpa_attention_forward(attn_m, qh, kh, vh, m, dropout=0.0, scaling=attn_m.scaling)
        return out.reshape(b, s, h * e)

    rows["attention"] = _row(*timed(attention, (q_bshe, k_bske, v_bske), (mask,)), layers, once=t_mask)
    rows["MLP"] = _row(*timed(lambda x_: layer0.mlp(x_), (x,)), layers)
    mask_t = torch.from_numpy(batch["loss_mask"][:, 1:].astype(np.float32))

    def head_loss(hid, i):
        logits = base.lm_head(hid).float()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), i[:, 1:].reshape(-1),
                                                reduction="none")
        return (nll * mask_t.reshape(-1)).sum() / mask_t.sum()

    rows["head + loss"] = _row(*timed(head_loss, (x,), (ids,)), 1)
    opt = torch.optim.AdamW(trainable, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

    def opt_step():
        for p in trainable:
            p.grad = torch.full_like(p, 1e-3)
        t0 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    opt_step()
    rows["optimizer"] = _row(min(opt_step() for _ in range(reps)), None, 1)
    rows["host-side"] = _row(_best_s(lambda: [torch.from_numpy(batch[key].astype(np.int64)) for key in batch],
                                       reps), None, 1)

    def step():
        logits = model(input_ids=ids, attention_mask=am).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                reduction="none")
        loss = (nll * mask_t.reshape(-1)).sum() / mask_t.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    whole = _best_s(step, reps)
    return {"side": "torch", "rows": rows, "whole_s": whole, "shape": [b, s], "torch_version": torch.__version__,
            "transformers_version": transformers.__version__, "peft_version": peft.__version__,
            "threads": torch.get_num_threads(), "load": os.getloadavg()}


# ----------------------------------------------------------------------------------------------
# Parent.


def _spawn(side: str, args: argparse.Namespace, path: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), f"--side={side}", f"--inputs={path}", f"--reps={args.reps}",
           f"--rank={args.rank}", f"--alpha={args.alpha}", f"--seed={args.seed}"]
    if args.model:
        cmd.append(f"--model={args.model}")
    return run_child(cmd, side, marker="PROFILE_RESULT")


def _print_table(jx: dict, tc: dict) -> None:
    ms = lambda v: f"{v * 1e3:8.0f}"  # noqa: E731
    header = (f"{'group':<16s} {'x':>3s} | {'jax fwd':>8s} {'bwd':>8s} {'total':>8s} | {'torch fwd':>9s} {'bwd':>8s} "
              f"{'total':>8s} | {'jax/torch':>9s}")
    print(header)
    print("-" * len(header))
    sums = {"jax": 0.0, "torch": 0.0}
    for g in GROUPS:
        a, t = jx["rows"][g], tc["rows"][g]
        ta, tt = a["fwd_s"] + a["bwd_s"], t["fwd_s"] + t["bwd_s"]
        sums["jax"] += ta
        sums["torch"] += tt
        ratio = f"{ta / tt:9.2f}" if tt > 1e-4 else f"{'-':>9s}"
        print(f"{g:<16s} {a['count']:3d} | {ms(a['fwd_s'])} {ms(a['bwd_s'])} {ms(ta)} | {ms(t['fwd_s']):>9s} "
              f"{ms(t['bwd_s'])} {ms(tt)} | {ratio}")
    print("-" * len(header))
    print(f"{'sum of groups':<20s} | {'':8s} {'':8s} {ms(sums['jax'])} | {'':9s} {'':8s} {ms(sums['torch'])} | "
          f"{sums['jax'] / sums['torch']:9.2f}")
    print(f"{'whole step':<20s} | {'':8s} {'':8s} {ms(jx['whole_s'])} | {'':9s} {'':8s} {ms(tc['whole_s'])} | "
          f"{jx['whole_s'] / tc['whole_s']:9.2f}")
    print(f"{'unattributed':<20s} | {'':8s} {'':8s} {ms(jx['whole_s'] - sums['jax'])} | {'':9s} {'':8s} "
          f"{ms(tc['whole_s'] - sums['torch'])} |")
    print("(ms per step; a group's figure is its piece's least time x the count; bwd = fwd+bwd - fwd; "
          "jax/torch > 1: jaxpeft slower)")


def parent_main(args: argparse.Namespace) -> int:
    if not args.data.startswith("file:"):
        raise SystemExit(f"--data={args.data}: expected file:PATH (SFT records)")
    folder = model_folder(args.model)
    tsargs = ts.parse_args([f"--data={args.data}", f"--batch={args.batch}", f"--seq={args.seq}", "--file_batches=1",
                            f"--seed={args.seed}", f"--rank={args.rank}"])
    inputs, meta = ts.build_inputs(tsargs, folder)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "inputs.npz")
        np.savez(path, **inputs)
        jx = _spawn("jax", args, path)
        tc = _spawn("torch", args, path)
    print(f"model {folder}; LoRA r={args.rank} on {ts.DEFAULT_TARGETS}, fp32")
    print(f"data: {meta['desc']}")
    print(f"shapes: jaxpeft {jx['shape']} (K={jx['max_targets']} target slots), torch {tc['shape']} (dynamic padding)")
    print(f"jax {jx['jax_version']}; torch {tc['torch_version']} ({tc['threads']} threads), transformers "
          f"{tc['transformers_version']}, peft {tc['peft_version']}; load average before "
          f"{'/'.join(f'{v:.2f}' for v in load_before)}, after {'/'.join(f'{v:.2f}' for v in os.getloadavg())} "
          f"on {os.cpu_count()} CPUs")
    print(f"jaxpeft compiled step on device arrays {jx['device_step_s'] * 1e3:.0f} ms, Trainer.train_step "
          f"{jx['whole_s'] * 1e3:.0f} ms")
    print()
    _print_table(jx, tc)
    if args.json:
        tmp_path = args.json + ".tmp"
        with open(tmp_path, "w") as fh:
            json.dump({"args": vars(args), "meta": meta, "jax": jx, "torch": tc}, fh, indent=1)
        os.replace(tmp_path, args.json)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.side:
        with np.load(args.inputs) as z:
            inputs = {key: z[key] for key in z.files}
        result = run_jax(args, inputs) if args.side == "jax" else run_torch(args, inputs)
        print("PROFILE_RESULT " + json.dumps(result), flush=True)
        return 0
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
