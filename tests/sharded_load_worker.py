"""One process of the sharded-loading test (tests/test_sharded_load.py): loads a checkpoint straight onto an
fsdp mesh of every device (`MeshPlacement`) and writes what its reads and memory were to
DIR/load_<process index>.json. Run alone (8 fake CPU devices) or through launch.single_host (2 x 4).

    python -m tests.sharded_load_worker --model=CKPT --out=DIR --mesh=fsdp:8
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import numpy as np

from jaxpeft.convert.hf import hf_to_params, read_hf_weights
from jaxpeft.convert.load import load_config
from jaxpeft.train.sharding import MeshPlacement, make_mesh


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def main(argv: list[str]) -> None:
    args = dict(a[2:].split("=", 1) for a in argv if a.startswith("--"))
    folder, out = Path(args["model"]), Path(args["out"])
    mesh = make_mesh(args.get("mesh", "fsdp:8"))
    config = load_config(folder)
    source = read_hf_weights(folder)
    jax.numpy.zeros(1).block_until_ready()
    baseline = _status("VmRSS")
    params = hf_to_params(source, config, np.dtype(source["model.norm.weight"].dtype),
                          placement=MeshPlacement(mesh))
    jax.block_until_ready(params)
    leaves = jax.tree_util.tree_leaves(params)
    per_tensor: dict[str, list[int]] = {}
    for name, _, nbytes in source.requests:
        per_tensor.setdefault(name, []).append(nbytes)
    result = {
        "process_index": jax.process_index(), "process_count": jax.process_count(),
        "devices": jax.device_count(), "local_devices": jax.local_device_count(),
        "tensor_bytes": {n: i.nbytes for n, i in source.info.items()},
        "row_bytes": {n: i.nbytes // i.shape[0] for n, i in source.info.items()},
        "ndim": {n: len(i.shape) for n, i in source.info.items()},
        "requests": per_tensor, "requested_total": source.requested,
        "checkpoint_bytes": source.nbytes, "baseline_rss": baseline, "peak_rss": _status("VmHWM"),
        "shard_shapes": sorted({tuple(s.data.shape) for x in leaves for s in x.addressable_shards
                                if x.ndim == 2 and x.shape[0] == config.hidden_size})[:3],
    }
    (out / f"load_{jax.process_index()}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
