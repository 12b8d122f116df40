"""Extract a PEFT LoRA from a full fine-tune by truncated SVD of each targeted linear's difference (issue 18).

    python -m experiments.extract_lora --base=B --finetuned=F (--rank=R | --energy=0.95) \
        [--targets=q_proj,k_proj,...] [--save_modules=lm_head,norm] --out=DIR [--overwrite]

Prints the rank and the energy kept per module, and the differences a LoRA does not carry with their share.
"""

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("base", None, "Base model folder.")
flags.DEFINE_string("finetuned", None, "Fully fine-tuned model folder (same architecture).")
flags.DEFINE_integer("rank", None, "Fixed LoRA rank.")
flags.DEFINE_float("energy", None, "Per module, the least rank keeping this fraction of ||F - B||_F^2.")
flags.DEFINE_list("targets", None, "Module-name suffixes to extract (default: the attention and MLP linears).")
flags.DEFINE_list("save_modules", [], "Module-name suffixes stored whole as PEFT modules_to_save.")
flags.DEFINE_string("out", None, "Output PEFT adapter folder.")
flags.DEFINE_bool("overwrite", False, "Replace --out if it exists.")
flags.mark_flags_as_required(["base", "finetuned", "out"])


def main(argv):
    del argv
    from jaxpeft.core.errors import ConfigError
    from jaxpeft.merge.extract import DEFAULT_TARGETS, ExtractConfig, extract_lora

    cfg = ExtractConfig(rank=FLAGS.rank, energy=FLAGS.energy, targets=tuple(FLAGS.targets or DEFAULT_TARGETS),
                        save_modules=tuple(FLAGS.save_modules))
    try:
        report = extract_lora(FLAGS.base, FLAGS.finetuned, FLAGS.out, cfg, overwrite=FLAGS.overwrite)
    except ConfigError as e:
        raise app.UsageError(str(e)) from None
    for m, v in report["modules"].items():
        print(f"{m}: rank {v['rank']}, energy kept {v['energy_kept']:.4f}, share of the difference {v['share']:.4f}")
    for n, share in sorted(report["not_carried"].items(), key=lambda kv: -kv[1]):
        print(f"not a LoRA: {n}: {share:.4f} of the difference" + (" (saved whole)" if any(
            n.startswith(s + ".") for s in report["saved"]) else ""))
    print(f"LoRA modules carry {report['lora_share']:.4f} of ||F - B||^2; wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
