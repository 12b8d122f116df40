"""A LoRA train step on a tiny-but-not-trivial MoE: jaxpeft grouped experts against the same model computing every
expert on every token (kernels/moe "dense"), and against PEFT + transformers (torch), in one run.

    python -m bench.moe_step                 # Mixtral-shaped: 8 experts, top 2, hidden 256, expert width 512
    python -m bench.moe_step --steps 6 --experts 16 --top_k 2

LoRA r=8 on q_proj,v_proj and, in PEFT's target_parameters form, on mlp.experts.gate_up_proj and
mlp.experts.down_proj; fp32; AdamW lr 1e-3; batch x seq random ids, loss on every position but the first. Every
side starts from the same torch-made weights (jaxpeft converts them) and trains on the same batch; each side's
first step (compile) is untimed, then `--steps` steps are timed (median wall) with the process's user CPU time
over them. The printed ratios are the same run's: grouped / dense-all-experts (goal <= 0.4) and grouped / PEFT.
The step-0 losses are printed side by side (LoRA B = 0, so they are the base model's and should agree).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

import numpy as np

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--width", type=int, default=512, help="expert intermediate size")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top_k", type=int, default=2)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--sides", default="grouped,dense,peft")
    return p.parse_args(argv)


def _user() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_utime


def _timed(step, steps):
    first = step()
    times, user0 = [], _user()
    losses = [first]
    for _ in range(steps):
        t = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t)
    return statistics.median(times), (_user() - user0) / steps, losses


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    import transformers

    cfg = transformers.MixtralConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.width,
                                     num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=2,
                                     num_local_experts=args.experts, num_experts_per_tok=args.top_k,
                                     max_position_embeddings=4 * args.seq)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if n.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.5)  # routing spread over the experts
    ids = np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.seq)).astype(np.int32)
    targets = ["q_proj", "v_proj"]
    params_t = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    results = {}
    sides = args.sides.split(",")
    for side in [s for s in sides if s in ("grouped", "dense")]:
        import dataclasses

        import jax

        from jaxpeft import from_transformers
        from jaxpeft.methods import get_method
        from jaxpeft.methods.lora import LoraConfig
        from jaxpeft.train import optim
        from jaxpeft.train.loop import TrainConfig, Trainer

        model, params = from_transformers(hf)
        model = model.clone(config=dataclasses.replace(model.config, moe_implementation=side))
        lora = get_method("lora")
        lcfg = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=tuple(targets),
                          target_parameters=tuple(params_t))
        adapted = lora.init(jax.random.PRNGKey(0), params, lcfg)
        trainer = Trainer(model, adapted, lora.labels(adapted, lcfg),
                          optim_cfg=optim.OptimConfig(lr=1e-3, total_steps=args.steps + 1, warmup_steps=0,
                                                      max_grad_norm=0.0),
                          train_cfg=TrainConfig(steps=args.steps + 1, batch_size=args.batch),
                          max_targets=args.batch * (args.seq - 1))
        loss_mask = np.ones_like(ids)
        loss_mask[:, 0] = 0
        batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": loss_mask}
        results[side] = _timed(lambda: float(trainer.train_step(batch)["loss"]), args.steps)
        print(f"{side}: {results[side][0]:.3f} s/step (median), {results[side][1]:.2f} s user CPU/step, "
              f"losses {[round(x, 4) for x in results[side][2]]}", flush=True)
    if "peft" in sides:
        import copy

        import peft

        pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                                                   target_modules=targets,
                                                                   target_parameters=params_t))
        pm.train()
        opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
        x = torch.tensor(ids, dtype=torch.long)

        def step():
            logits = pm(x).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad()
            return float(loss)

        results["peft"] = _timed(step, args.steps)
        print(f"peft: {results['peft'][0]:.3f} s/step (median), {results['peft'][1]:.2f} s user CPU/step, "
              f"losses {[round(x, 4) for x in results['peft'][2]]}", flush=True)
    for a, b in (("grouped", "dense"), ("grouped", "peft")):
        if a in results and b in results:
            print(f"{a} / {b}: wall {results[a][0] / results[b][0]:.2f}x, user CPU "
                  f"{results[a][1] / results[b][1]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
