"""Data parallelism for the example: ``--devices N`` and ``--zero1``.

A 1-D ``"data"`` mesh over the first N devices. The params are replicated, each
training batch is split over the mesh (XLA all-reduces the gradient), and with
``--zero1`` the optimizer state is partitioned over the mesh as well
(:func:`adam_jax.shard_state`). On a CPU-only machine the N devices are virtual:
:func:`request_host_devices` asks XLA for them before jax is imported.
"""

from __future__ import annotations

# Shared with the byte-level LM example (examples/common/parallel.py).
from common.parallel import (
    HOST_DEVICES_FLAG,
    data_mesh,
    describe,
    place_like,
    replicate,
    request_host_devices,
    split_batch,
)

__all__ = [
    "HOST_DEVICES_FLAG",
    "data_mesh",
    "describe",
    "place_like",
    "replicate",
    "request_host_devices",
    "split_batch",
]
