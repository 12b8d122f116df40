"""Quantize a model to 4 bits and write it as a bitsandbytes checkpoint that transformers loads.

    python -m experiments.quantize --model=PATH --out=DIR [--quant_type=nf4 --blocksize=64 --double_quant]

Every linear module but the output head is quantized (bit for bit as bitsandbytes does); embeddings
and norms stay dense in --dtype (default auto: the model's own dtype). The folder is written one module
at a time, sharded with an index past 50 GB as transformers does. `AutoModelForCausalLM.from_pretrained(DIR)`
loads it with bitsandbytes installed; `python -m experiments.qlora --model=DIR` fine-tunes from its codes.
"""

from __future__ import annotations

from typing import Sequence

from absl import flags

from experiments.common import log_to_stderr, run_app
from experiments.common import run_in_process


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("model", None, "HF folder, .gguf file or hub id (default: SmolLM2-135M-Instruct).",
                        flag_values=fv)
    flags.DEFINE_string("out", None, "Output folder.", required=True, flag_values=fv)
    flags.DEFINE_enum("quant_type", "nf4", ["nf4", "fp4"], "4-bit data type.", flag_values=fv)
    flags.DEFINE_bool("double_quant", True, "Quantize the block scales too (bitsandbytes' double quant).",
                      flag_values=fv)
    flags.DEFINE_integer("blocksize", 64, "Weights per quantization block (32, 64, ..., 4096).", flag_values=fv)
    flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16", "float16"],
                      "dtype of the dense tensors and of the 4-bit matmuls (bnb_4bit_compute_dtype); auto: the "
                      "model's own.", flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "Replace --out if it exists.", flag_values=fv)


def main(fv: flags.FlagValues, argv: Sequence[str]) -> None:
    del argv
    log_to_stderr()
    from absl import logging

    from jaxpeft.convert.bnb import Bnb4bitConfig, save_bnb_folder
    from jaxpeft.convert.load import QuantizedBaseLoader
    from jaxpeft.core.errors import ConfigError

    quant = Bnb4bitConfig(quant_type=fv.quant_type, double_quant=fv.double_quant, blocksize=fv.blocksize)
    model, params, tokenizer, info = QuantizedBaseLoader(quant)(fv.model, dtype=None)
    if info["quantization"]["source"].startswith("bitsandbytes"):
        raise ConfigError(f"{fv.model} is already a bitsandbytes checkpoint; there is nothing to quantize.")
    try:
        save_bnb_folder(fv.out, params, model.config, tokenizer=tokenizer, dtype=fv.dtype,
                        compute_dtype=fv.dtype, overwrite=fv.overwrite)
    except FileExistsError as e:
        raise ConfigError(f"{fv.out} exists; pass --overwrite to replace it or choose another --out.") from e
    b = info["quantization"]["base_param_bytes"]
    logging.info("wrote %s", fv.out)
    print(f"{fv.out}: {info['quantization']['quantized_modules']} linear modules in {fv.quant_type}; "
          f"parameters {b['quantized'] / 1e6:.1f} MB (fp32: {b['float32'] / 1e6:.1f} MB)")


def run(argv: Sequence[str]) -> int:
    """`python -m experiments.quantize ARGV[1:]` in this process (its own FlagValues); returns the exit code."""
    return run_in_process(define_flags, main, argv, doc=__doc__)


if __name__ == "__main__":
    define_flags(flags.FLAGS)
    run_app(lambda argv: main(flags.FLAGS, argv))
