"""Data parallelism for the examples: ``--devices N`` and ``--zero1``.

A 1-D ``"data"`` mesh over the first N devices. The params are replicated, each
training batch is split over the mesh (XLA all-reduces the gradient), and with
``--zero1`` the optimizer state is partitioned over the mesh as well
(:func:`adam_jax.shard_state`). On a CPU-only machine the N devices are virtual:
:func:`request_host_devices` asks XLA for them before jax is imported, which is why
jax is imported inside the functions here.
"""

from __future__ import annotations

import os
from typing import Any

HOST_DEVICES_FLAG = "--xla_force_host_platform_device_count"


def request_host_devices(n: int) -> None:
    """Makes the CPU platform expose ``n`` devices; effective only before jax is imported."""
    flags = os.environ.get("XLA_FLAGS", "")
    if n > 1 and HOST_DEVICES_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {HOST_DEVICES_FLAG}={n}".strip()


def data_mesh(n: int):
    """A ``("data",)`` mesh over the first ``n`` devices, or ``None`` for one device."""
    import jax
    from jax.sharding import AxisType

    if n == 1:
        return None
    if jax.device_count() < n:
        raise ValueError(
            f"--devices {n}: only {jax.device_count()} {jax.default_backend()} device(s). "
            f"On CPU, set XLA_FLAGS={HOST_DEVICES_FLAG}={n} before jax is imported "
            "(main.py does this)."
        )
    return jax.make_mesh((n,), ("data",), axis_types=(AxisType.Auto,), devices=jax.devices()[:n])


def replicate(tree: Any, mesh) -> Any:
    """``tree`` copied to every device of ``mesh`` (unchanged without a mesh)."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    return tree if mesh is None else jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def place_like(tree: Any, like: Any) -> Any:
    """``tree``'s arrays placed as ``like``'s (a fresh state of this run) are.

    Leaves ``like`` holds on the mesh go to their sharding; leaves it holds uncommitted on
    one device (counters, and everything on one device) become uncommitted again, so that
    jit can use them next to the mesh arrays.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    def place(x, ref):
        if ref.committed:
            return jax.device_put(x, ref.sharding)
        return jnp.asarray(np.asarray(x))

    return jax.tree.map(place, tree, like)


def split_batch(x, mesh):
    """Inside a jitted step: ``x``'s leading (batch) axis split over ``mesh``."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec("data")))


def describe(n: int, zero1: bool) -> str:
    """One line on the device setup, for the run's header."""
    if n == 1:
        return "devices: 1"
    state = "optimizer state partitioned (ZeRO-1)" if zero1 else "optimizer state replicated"
    return f"devices: {n}, batch split over a 'data' mesh, params replicated, {state}"
