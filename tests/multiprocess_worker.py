"""One process of the 2-process ``jax.distributed`` test (``tests/test_multiprocess.py``).

Usage: ``python -m tests.multiprocess_worker PROCESS_ID NUM_PROCESSES PORT OUT_DIR``.
Each process owns ``--xla_force_host_platform_device_count`` CPU devices (set by
the launcher); the mesh spans the devices of all processes. The params are
replicated (data parallelism), the batch is split over the "data" axis, and the
moments are partitioned over it too (ZeRO-1). Writes the final params, the
losses and the bytes of state on its first device to ``OUT_DIR``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import adam_jax
from tests.distributed_model import make_batches, make_params, train

STEPS = 5
LR, WEIGHT_DECAY = 1e-2, 0.1


def global_array(value: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a value every process holds in full."""
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def main(process_id: int, num_processes: int, port: int, out_dir: Path) -> None:
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=60,
        heartbeat_timeout_seconds=30,
        shutdown_timeout_seconds=30,
    )
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    tx = adam_jax.shard_state(adam_jax.adamw(LR, weight_decay=WEIGHT_DECAY), mesh, "data")
    with jax.set_mesh(mesh):
        params = jax.tree.map(lambda p: global_array(p, replicated), make_params())
        batches = make_batches(STEPS)
        place = lambda batch: tuple(global_array(b, split) for b in batch)
        params, state, losses = train(tx, params, batches, place)
    first = jax.local_devices()[0]
    state_bytes = sum(
        s.data.nbytes
        for leaf in jax.tree.leaves(state)
        for s in leaf.addressable_shards
        if s.device == first
    )
    np.savez(
        out_dir / f"params_{process_id}.npz",
        **{
            jax.tree_util.keystr(path): np.asarray(leaf.addressable_data(0))
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
        },
    )
    summary = {
        "losses": losses,
        "state_bytes_first_device": state_bytes,
        "devices": jax.device_count(),
        "local_devices": jax.local_device_count(),
    }
    (out_dir / f"summary_{process_id}.json").write_text(json.dumps(summary))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
