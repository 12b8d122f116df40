"""One process of tests/test_multiprocess.py, started by the single-host launcher (so through
launch.multihost and `jax.distributed.initialize`):

    python -m launch.single_host --num_processes=2 --platform=cpu --devices_per_process=2 \\
        -- -m tests.multiprocess_worker --out=DIR

Trains the tiny LoRA model of tests/sharding_cases.py for three steps on meshes that span both processes
and with pmap, and writes DIR/losses_<process index>.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax

from tests.sharding_cases import adapted, batches, model_and_params, trainer

# data spans the processes and fsdp stays within one; then fsdp spans them and tensor stays within one.
LAYOUTS = {"data2_fsdp2": "data:2,fsdp:2", "fsdp2_tensor2": "fsdp:2,tensor:2", "pmap": "pmap"}


def main(argv: list[str]) -> None:
    out = Path(next(a.split("=", 1)[1] for a in argv if a.startswith("--out=")))
    model, _, params = model_and_params()
    tree, labels = adapted(params, False)
    result = {"process_count": jax.process_count(), "device_count": jax.device_count(),
              "local_device_count": jax.local_device_count()}
    for name, layout in LAYOUTS.items():
        t = trainer(model, tree, labels, layout)
        result[name] = [t.train_step(b)["loss"] for b in batches()]
    (out / f"losses_{jax.process_index()}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
