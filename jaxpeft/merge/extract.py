"""LoRA extraction from a full fine-tune (mergekit-extract-lora's job): truncated SVD of F - B per targeted linear.

Legend: O = out features, I = in features, R = rank. Each tensor is read on its own (stream.Checkpoint) and
dropped after use. For a targeted 2-D weight, D_OxI = F - B = U S V^T; the LoRA keeps the top R singular
triplets, split evenly: B_OxR = U_R sqrt(S_R), A_RxI = sqrt(S_R) V_R^T, with lora_alpha = r per module
(scale 1) so that B @ A is the rank-R truncation. `rank` fixes R; `energy` picks, per module, the smallest R
keeping that fraction of ||D||_F^2 (written as PEFT's `rank_pattern`/`alpha_pattern`). Every other
difference (norms, embeddings, the head, untargeted linears) is reported with its share of the total
squared difference, and `save_modules` stores those modules' fine-tuned tensors whole as `modules_to_save`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from jaxpeft.convert.hf import read_hf_weights
from jaxpeft.convert.peft.common import write_folder
from jaxpeft.core.errors import ConfigError, bullet_list

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class ExtractConfig:
    rank: int | None = None
    energy: float | None = None
    targets: tuple[str, ...] = DEFAULT_TARGETS  # module-name suffixes
    save_modules: tuple[str, ...] = ()  # module-name suffixes stored whole (modules_to_save)

    def problems(self) -> list[str]:
        out = []
        if (self.rank is None) == (self.energy is None):
            out.append("give exactly one of rank (a fixed rank) and energy (a fraction of ||F - B||^2 to keep)")
        if self.rank is not None and self.rank < 1:
            out.append(f"rank={self.rank}: must be >= 1")
        if self.energy is not None and not 0 < self.energy <= 1:
            out.append(f"energy={self.energy}: must be in (0, 1]")
        return out


def _matches(module: str, suffixes: tuple[str, ...]) -> bool:
    return any(module == s or module.endswith("." + s) for s in suffixes)


def low_rank(d_OxI: np.ndarray, rank: int | None, energy: float | None) -> tuple[np.ndarray, np.ndarray, float]:
    """(B_OxR, A_RxI, kept energy) of the truncated SVD of d (R from `rank`, or the least keeping `energy`)."""
    u, s, vt = np.linalg.svd(d_OxI.astype(np.float64), full_matrices=False)
    sq = s ** 2
    total = sq.sum()
    if rank is None:
        frac = np.cumsum(sq) / max(total, 1e-300)
        rank = int(np.searchsorted(frac, energy - 1e-12) + 1)
    rank = min(rank, s.size)
    root = np.sqrt(s[:rank])
    kept = float(sq[:rank].sum() / total) if total > 0 else 1.0
    return (u[:, :rank] * root).astype(np.float32), (root[:, None] * vt[:rank]).astype(np.float32), kept


def extract_lora(base: str | Path, finetuned: str | Path, out: str | Path, cfg: ExtractConfig, *,
                 overwrite: bool = False) -> dict:
    """Writes the PEFT LoRA folder `out` and returns the report: per module its rank and kept energy, and the
    differences a LoRA does not carry with their share of the total squared difference."""
    problems = cfg.problems()
    if Path(out).exists() and not overwrite:
        problems.append(f"--out {out} already exists; pass --overwrite to replace it")
    if problems:
        raise ConfigError("cannot extract a LoRA:\n" + bullet_list(problems))
    b, f = read_hf_weights(base), read_hf_weights(finetuned)
    problems = [f"{finetuned}: tensor {n} is missing (it is in {base})" for n in b if n not in f]
    problems += [f"{finetuned}: tensor {n} has shape {list(f.info[n].shape)}, {base} {list(b.info[n].shape)}"
                 for n in b if n in f and f.info[n].shape != b.info[n].shape]
    if problems:
        raise ConfigError("the fine-tune is not of this base:\n" + bullet_list(problems))
    tensors, modules, others, saved = {}, {}, {}, []
    total = 0.0
    for name in b:
        d = np.asarray(f[name], np.float32) - np.asarray(b[name], np.float32)
        sq = float((d.astype(np.float64) ** 2).sum())
        total += sq
        module = name.rsplit(".", 1)[0]
        if d.ndim == 2 and name.endswith(".weight") and _matches(module, cfg.targets):
            if sq == 0:
                continue
            b_OxR, a_RxI, kept = low_rank(d, cfg.rank, cfg.energy)
            tensors[f"base_model.model.{module}.lora_A.weight"] = a_RxI
            tensors[f"base_model.model.{module}.lora_B.weight"] = b_OxR
            modules[module] = {"rank": a_RxI.shape[0], "energy_kept": kept, "sq": sq}
        else:
            if sq > 0:
                others[name] = sq
            if _matches(module, cfg.save_modules):
                tensors[f"base_model.model.{name}"] = np.asarray(f[name], np.float32)
                saved.append(module)
    if not modules:
        raise ConfigError(f"no targeted linear ({', '.join(cfg.targets)}) differs between {base} and {finetuned}")
    ranks = {m: v["rank"] for m, v in modules.items()}
    r = max(ranks.values()) if cfg.rank is None else cfg.rank
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": r, "lora_dropout": 0.0,
              "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
              "init_lora_weights": True, "target_modules": sorted(modules), "base_model_name_or_path": str(base),
              "modules_to_save": sorted(set(saved)) or None,
              "rank_pattern": {m: k for m, k in ranks.items() if k != r},
              "alpha_pattern": {m: k for m, k in ranks.items() if k != r}}
    write_folder(out, config, tensors, overwrite=overwrite)
    total = max(total, 1e-300)
    return {"modules": {m: {"rank": v["rank"], "energy_kept": v["energy_kept"], "share": v["sq"] / total}
                        for m, v in modules.items()},
            "not_carried": {n: sq / total for n, sq in others.items()}, "saved": sorted(set(saved)),
            "lora_share": sum(v["sq"] for v in modules.values()) / total}
