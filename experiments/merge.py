"""Combine LoRA adapters of one base model into one adapter (and optionally a merged model).

    python -m experiments.merge --adapters=DIR1,DIR2[,...] --weights=W1,W2[,...] --combination=ties
        [--semantics=exact|peft] [--density=0.5] [--svd_rank=R] [--svd_clamp=Q]
        [--majority_sign_method=total|frequency] [--seed=S] --out=DIR [--base=MODEL --save_merged]
        [--merged_dtype=auto] [--overwrite] [--allow_base_mismatch]

Reads PEFT LoRA folders (jaxpeft's or peft's `save_pretrained`), and writes DIR/adapter/ (a PEFT folder
that `peft.PeftModel.from_pretrained` and jaxpeft load), DIR/merge_config.json (inputs, settings,
ranks, distance to the weighted sum of the deltas) and, with --save_merged, DIR/merged/ (an HF folder
of the base with the new adapter merged in; the base is --base, by default the adapters'
base_model_name_or_path). DIR appears whole or not at all; a non-empty DIR needs --overwrite.
Combination types: linear, cat, svd, ties, ties_svd, dare_linear, dare_ties, dare_linear_svd,
dare_ties_svd, magnitude_prune, magnitude_prune_svd (see jaxpeft/merge/combine.py). --weights default
to 1.0 each; --density to 0.5 for the types that trim or drop. An option the chosen type ignores is
refused rather than silently dropped.

Default semantics: exact. `--semantics=exact` merges what the adapters do: the weighted combination
of the full deltas w_i·s_i·A_i·B_i (trimmed, sign-elected or dropped on those deltas for ties, dare and
magnitude_prune), refactored by SVD at rank Σ R_i (or --svd_rank), so linear, svd and cat are exact.
`--semantics=peft` reproduces PEFT's `add_weighted_adapter`: its non-SVD types combine the A factors
and the B factors separately, so `linear` with weights [0.5, 0.5] yields (Σ√w_i A_i)(Σ√w_i B_i), whose
cross terms A_1·B_2 are a direction neither adapter learned and no weight choice removes (peft#3004);
TIES there trims and elects signs on A and B apart, while the product is what matters. Exact is the
default because "merge these adapters with these weights" means the weighted sum of their effects;
peft stays available to reproduce a PEFT merge bit for bit (up to fp32 rounding and DARE's draw).

Measured demonstration: `python -m experiments.merge_demo --out=/tmp/runs/merge_demo` (tree at cf3e49f;
SmolLM2-135M-Instruct, two LoRA adapters, rank 16 on q,k,v,o, 100 steps each, one on builtin:dates and
one on builtin:times; merged with semantics exact, TIES density 0.5 and linear, weights 1,1; held-out
exact match on 100 examples per task):

    model                                    dates   times
    base                                     0.01    0.00
    dates adapter                            0.98    0.04
    times adapter                            0.02    0.69
    ties merge                               0.84    0.53
    linear merge                             0.90    0.40
    both served in one batch (per-row)       0.98    0.69

One merged adapter keeps most of both skills (TIES keeps more of the weaker times adapter, linear more
of dates); serving the two adapters side by side in one batch loses nothing.
stdout holds the summary only; logs go to stderr.
"""

from __future__ import annotations

import json

from typing import Sequence

from absl import app, flags

from experiments.common import define_param_dtype_flag, log_to_stderr, run_cli, run_in_process
from jaxpeft.merge.combine import COMBINATION_TYPES, SEMANTICS
from jaxpeft.merge.ops import SIGN_METHODS


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_list("adapters", None, "Comma-separated PEFT LoRA adapter folders.", required=True, flag_values=fv)
    flags.DEFINE_list("weights", None, "One weight per adapter (default 1.0 each).", flag_values=fv)
    flags.DEFINE_enum("combination", None, list(COMBINATION_TYPES), "Combination type.", required=True,
                      flag_values=fv)
    flags.DEFINE_enum("semantics", "exact", list(SEMANTICS),
                      "exact: weighted sum of the full deltas; peft: PEFT's add_weighted_adapter.", flag_values=fv)
    flags.DEFINE_float("density", None, "Fraction kept by ties/dare/magnitude_prune, in (0, 1] (default 0.5).",
                       flag_values=fv)
    flags.DEFINE_integer("svd_rank", None, "Rank of the SVD refactoring (default: Σ ranks for exact, the "
                                           "largest input rank for peft's SVD types).", flag_values=fv)
    flags.DEFINE_float("svd_clamp", None, "PEFT's quantile clamp of the SVD factors, in (0, 1].", flag_values=fv)
    flags.DEFINE_enum("majority_sign_method", None, list(SIGN_METHODS), "TIES sign election (default total).",
                      flag_values=fv)
    flags.DEFINE_integer("seed", None, "DARE's random drop (default 0).", flag_values=fv)
    flags.DEFINE_string("out", None, "Output folder (adapter/, merge_config.json, merged/).", required=True,
                        flag_values=fv)
    flags.DEFINE_string("base", None, "The base model: merged into by --save_merged and written as the new "
                                      "adapter's base_model_name_or_path (default: the adapters' own).",
                        flag_values=fv)
    flags.DEFINE_bool("save_merged", False, "Also write merged/: the base with the new adapter merged in.",
                      flag_values=fv)
    flags.DEFINE_enum("merged_dtype", "auto", ["auto", "float32", "bfloat16", "float16"],
                      "dtype of merged/ (auto: the base's dtype).", flag_values=fv)
    define_param_dtype_flag(fv)
    flags.DEFINE_bool("overwrite", False, "Replace a non-empty --out.", flag_values=fv)
    flags.DEFINE_bool("allow_base_mismatch", False,
                      "Merge even if the adapters name different base models (same weights, other "
                      "names). Shapes and target modules are still checked.", flag_values=fv)


def main(fv: flags.FlagValues, argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    log_to_stderr()
    from jaxpeft.merge.folders import MergeConfig, merge_folders

    try:
        weights = tuple(float(w) for w in fv.weights) if fv.weights is not None else None
    except ValueError as e:
        raise app.UsageError(f"--weights must be numbers, got {fv.weights}: {e}") from e
    merge = MergeConfig(combination_type=fv.combination, weights=weights, semantics=fv.semantics,
                        density=fv.density, svd_rank=fv.svd_rank, svd_clamp=fv.svd_clamp,
                        majority_sign_method=fv.majority_sign_method, seed=fv.seed)
    summary = merge_folders(fv.adapters, merge, fv.out, base=fv.base, save_merged=fv.save_merged,
                            merged_dtype=fv.merged_dtype, param_dtype=fv.param_dtype, overwrite=fv.overwrite,
                            allow_base_mismatch=fv.allow_base_mismatch)
    ranks = sorted(set(summary["ranks"].values()))
    print(json.dumps({"adapter": summary["adapter"], "merged": summary["merged"],
                      "combination": summary["combination_type"], "semantics": summary["semantics"],
                      "weights": summary["weights"], "ranks": ranks,
                      "distance_to_weighted_sum": round(summary["distance_to_weighted_sum"], 6)}, indent=2))


def run(argv: Sequence[str]) -> int:
    """`python -m experiments.merge ARGV[1:]` in this process (its own FlagValues); returns the exit code."""
    return run_in_process(define_flags, main, argv, doc=__doc__)


if __name__ == "__main__":
    run_cli(define_flags, main)
