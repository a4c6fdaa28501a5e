"""A small MLP and a training loop shared by the multi-device and multi-process tests.

``train`` runs the same jitted step on one device or on a mesh: the caller
places params and batches, so the single-device reference and the sharded runs
are the same code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, PartitionSpec

IN, HIDDEN, OUT = 16, 32, 8
BATCH = 32


def make_params(seed: int = 0) -> dict[str, np.ndarray]:
    """Kernels, biases and a norm scale: leaves of several shapes, some too small to split."""
    rng = np.random.default_rng(seed)
    return {
        "dense1": {
            "kernel": rng.normal(0, IN**-0.5, (IN, HIDDEN)).astype(np.float32),
            "bias": np.zeros(HIDDEN, np.float32),
        },
        "norm": {"scale": np.ones(HIDDEN, np.float32)},
        "dense2": {
            "kernel": rng.normal(0, HIDDEN**-0.5, (HIDDEN, OUT)).astype(np.float32),
            "bias": np.zeros(OUT, np.float32),
        },
        "head_bias": np.zeros(3, np.float32),
    }


def make_batches(steps: int, seed: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
    """Regression batches ``(x, y)`` of ``BATCH`` rows."""
    rng = np.random.default_rng(seed)
    target = rng.normal(size=(IN, OUT)).astype(np.float32)
    batches = []
    for _ in range(steps):
        x = rng.normal(size=(BATCH, IN)).astype(np.float32)
        batches.append((x, np.tanh(x @ target)))
    return batches


def _matmul_batch_sharded(h, kernel) -> jax.Array:
    """``h @ kernel``; on a mesh with ``Explicit`` axes the output is batch-sharded.

    (A contraction over a sharded dimension needs its output sharding spelled out there.)
    """
    mesh = jax.sharding.get_abstract_mesh()
    if any(t == AxisType.Explicit for t in getattr(mesh, "axis_types", ())):
        return jnp.matmul(h, kernel, out_sharding=PartitionSpec("data", None))
    return h @ kernel


def loss_fn(params, x, y) -> jax.Array:
    h = jnp.tanh(x @ params["dense1"]["kernel"] + params["dense1"]["bias"])
    h = h * params["norm"]["scale"]
    out = _matmul_batch_sharded(h, params["dense2"]["kernel"]) + params["dense2"]["bias"]
    return jnp.mean((out - y) ** 2) + 1e-3 * jnp.sum(params["head_bias"] ** 2)


def make_step(tx: optax.GradientTransformation) -> Callable:
    def step(params, state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    return jax.jit(step)


def train(
    tx: optax.GradientTransformation,
    params,
    batches: Iterable[tuple],
    place_batch: Callable = lambda b: b,
):
    """Runs ``tx`` over ``batches``; returns ``(params, state, losses)``."""
    state = tx.init(params)
    step = make_step(tx)
    losses = []
    for batch in batches:
        params, state, loss = step(params, state, *place_batch(batch))
        losses.append(float(loss.addressable_data(0)))  # also on a multi-process mesh
    return params, state, losses


def max_abs_diff(a, b) -> float:
    """Largest absolute difference over the leaves of two trees (gathered to the host)."""
    diffs = [
        float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    ]
    return max(diffs)


def bytes_on_device0(tree) -> int:
    """Bytes of ``tree``'s arrays held by ``jax.devices()[0]`` (per-device memory)."""
    device = jax.devices()[0]
    return sum(
        shard.data.nbytes
        for leaf in jax.tree.leaves(tree)
        for shard in leaf.addressable_shards
        if shard.device == device
    )


def param_differences(params, reference) -> tuple[float, float]:
    """(largest |difference| of an element, |difference| / |reference| over all params)."""
    pairs = list(zip(jax.tree.leaves(params), jax.tree.leaves(reference), strict=True))
    largest = max(float(np.max(np.abs(a - b))) for a, b in pairs)
    norm = np.sqrt(sum(float(np.sum(np.square(a - b, dtype=np.float64))) for a, b in pairs))
    ref_norm = np.sqrt(sum(float(np.sum(np.square(b, dtype=np.float64))) for _, b in pairs))
    return largest, norm / ref_norm
