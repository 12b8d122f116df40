"""Quantize a model to 4 bits and write it as a bitsandbytes checkpoint that transformers loads.

    python -m experiments.quantize --model=PATH --out=DIR [--quant_type=nf4 --blocksize=64 --double_quant]

Every linear module but the output head is quantized (bit for bit as bitsandbytes does); embeddings
and norms stay dense in --dtype. `AutoModelForCausalLM.from_pretrained(DIR)` loads the folder with
bitsandbytes installed; `python -m experiments.qlora --model=DIR` fine-tunes from its codes.
"""

from __future__ import annotations

from absl import flags

from experiments.common import log_to_stderr, run_app

_MODEL = flags.DEFINE_string("model", None, "HF folder, .gguf file or hub id (default: SmolLM2-135M-Instruct).")
_OUT = flags.DEFINE_string("out", None, "Output folder.", required=True)
_QUANT_TYPE = flags.DEFINE_enum("quant_type", "nf4", ["nf4", "fp4"], "4-bit data type.")
_DOUBLE_QUANT = flags.DEFINE_bool("double_quant", True, "Quantize the block scales too (bitsandbytes' double quant).")
_BLOCKSIZE = flags.DEFINE_integer("blocksize", 64, "Weights per quantization block (32, 64, ..., 4096).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"],
                           "dtype of the dense tensors and of the 4-bit matmuls (bnb_4bit_compute_dtype).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace --out if it exists.")


def main(argv) -> None:
    del argv
    log_to_stderr()
    from absl import logging

    from jaxpeft.convert.bnb import Bnb4bitConfig, save_bnb_folder
    from jaxpeft.convert.load import QuantizedBaseLoader
    from jaxpeft.core.errors import ConfigError

    quant = Bnb4bitConfig(quant_type=_QUANT_TYPE.value, double_quant=_DOUBLE_QUANT.value, blocksize=_BLOCKSIZE.value)
    model, params, tokenizer, info = QuantizedBaseLoader(quant)(_MODEL.value, dtype=None)
    if info["quantization"]["source"].startswith("bitsandbytes"):
        raise ConfigError(f"{_MODEL.value} is already a bitsandbytes checkpoint; there is nothing to quantize.")
    try:
        save_bnb_folder(_OUT.value, params, model.config, tokenizer=tokenizer, dtype=_DTYPE.value,
                        compute_dtype=_DTYPE.value, overwrite=_OVERWRITE.value)
    except FileExistsError as e:
        raise ConfigError(f"{_OUT.value} exists; pass --overwrite to replace it or choose another --out.") from e
    b = info["quantization"]["base_param_bytes"]
    logging.info("wrote %s", _OUT.value)
    print(f"{_OUT.value}: {info['quantization']['quantized_modules']} linear modules in {_QUANT_TYPE.value}; "
          f"parameters {b['quantized'] / 1e6:.1f} MB (fp32: {b['float32'] / 1e6:.1f} MB)")


if __name__ == "__main__":
    run_app(main)
