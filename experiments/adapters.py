"""Fine-tune a model with bottleneck adapters (Houlsby or Pfeiffer, as AdapterHub's `adapters` package).

    python -m experiments.adapters --adapter_type=houlsby --reduction_factor=16 [--activation=swish]

Same run folder as experiments.lora (see jaxpeft/train/run.py), with adapter/ in the AdapterHub layout
(adapter_config.json + adapter.safetensors): the package reads it with
`model.load_adapter(".../adapter", use_safetensors=True)`. Adapters cannot be merged (no --save_merged).
"""

from __future__ import annotations

from typing import Sequence

from absl import app, flags

from experiments.common import define_run_flags, method_main, run_cli, run_in_process


def define_flags(fv: flags.FlagValues) -> None:
    define_run_flags(fv, default_steps=100, default_lr=1e-3)
    flags.DEFINE_enum("adapter_type", "houlsby", ["houlsby", "pfeiffer"],
                      "houlsby: adapters after attention and after the MLP (double_seq_bn); pfeiffer: after the MLP "
                      "only (seq_bn).", flag_values=fv)
    flags.DEFINE_float("reduction_factor", 16, "Bottleneck size = hidden size / reduction_factor (must divide it).",
                       flag_values=fv)
    flags.DEFINE_string("activation", None, "Bottleneck activation (default: swish for houlsby, relu for pfeiffer).",
                        flag_values=fv)
    flags.DEFINE_float("scaling", 1.0, "Factor on the adapter's output.", flag_values=fv)
    flags.DEFINE_float("dropout", 0.0, "Dropout on the adapter's output while training.", flag_values=fv)
    flags.DEFINE_list("leave_out", [], "Layer indices (comma-separated) that get no adapter.", flag_values=fv)
    flags.DEFINE_string("adapter_name", "adapter", "The adapter's name in the AdapterHub files.", flag_values=fv)


def adapters_config_from_flags(fv: flags.FlagValues):
    """AdaptersConfig from the flags; a non-integer --leave_out is a usage error."""
    from jaxpeft.methods.bottleneck import AdaptersConfig

    f = fv
    try:
        leave_out = tuple(int(i) for i in f.leave_out)
    except ValueError as e:
        raise app.UsageError(f"--leave_out={','.join(f.leave_out)}: give layer indices such as 0,1") from e
    rf = f.reduction_factor
    return AdaptersConfig(adapter_type=f.adapter_type, reduction_factor=int(rf) if float(rf).is_integer() else rf,
                          activation=f.activation or None, scaling=f.scaling, dropout=f.dropout,
                          leave_out=leave_out, name=f.adapter_name)


main = method_main("adapters", adapters_config_from_flags)


def run(argv: Sequence[str]) -> int:
    """`python -m experiments.adapters ARGV[1:]` in this process (its own FlagValues); returns the exit code."""
    return run_in_process(define_flags, main, argv, doc=__doc__)


if __name__ == "__main__":
    run_cli(define_flags, main)
