"""Run outputs: metrics.jsonl, TensorBoard scalars, and the loss-curve PNG."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from jaxpeft.core.atomic import atomic_file
from jaxpeft.core.write_errors import writing


class MetricsWriter:
    """Appends one JSON object per line to metrics.jsonl and mirrors scalars to TensorBoard."""

    def __init__(self, out_dir: str | os.PathLike, *, tensorboard: bool = True) -> None:
        self.path = Path(out_dir) / "metrics.jsonl"
        self._tb = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))
            except ImportError:  # optional: metrics.jsonl holds the same numbers
                self._tb = None

    def write(self, record: Mapping[str, Any]) -> None:
        with writing(str(self.path), self.path.parent), open(self.path, "a") as f:
            f.write(json.dumps(dict(record), sort_keys=True) + "\n")
        if self._tb is not None:
            step = int(record["step"])
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)

    def truncate_after(self, step: int) -> None:
        """Drops records after `step` (used on resume, so the file matches the restored state)."""
        if not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= step]
        with atomic_file(self.path) as f:
            f.write("".join(line + "\n" for line in keep))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_losses(metrics_path: str | os.PathLike, out_png: str | os.PathLike) -> None:
    """Training loss (and eval loss where present) against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = Path(out_png).with_name(Path(out_png).name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out_png)
