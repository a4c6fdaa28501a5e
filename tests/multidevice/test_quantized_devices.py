"""Quantized moments on 8 virtual CPU devices (issue 15).

* An FSDP-sharded leaf's codes and scales are sharded with it: each device holds
  its rows' codes and block scales, and the state bytes per device are an eighth
  of one device's (less the replicated small leaves).
* Blocks never span a shard boundary: the 8-bit step on sharded params needs no
  collective at all (every block is encoded where its values live), and encoding
  one shard on its own gives that shard's codes and scales.
* ``shard_state`` (ZeRO-1) partitions quantized moments, and both placements train
  exactly like one device.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import adam_jax
from adam_jax import _storage as storage
from tests.distributed_model import bytes_on_device0

FORMATS = ["8bit", "4bit"]
STEPS = 4
SPECS = {"w": P("data", None), "e": P("data"), "b": P()}


def _mesh():
    return jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))


def _params():
    rng = np.random.default_rng(0)
    return {
        "w": jnp.asarray(0.1 * rng.standard_normal((64, 1024)), jnp.float32),
        "e": jnp.asarray(rng.standard_normal(8 * 512), jnp.float32),  # 1-D: 512 per shard
        "b": jnp.zeros((1024,), jnp.float32),  # under min_size: float32 moments
    }


def _grads(step: int):
    """Gradients with per-column scales 1e-4..1 (the mixed-scale stream)."""
    rng = np.random.default_rng(100 + step)
    scales = np.logspace(-4, 0, 1024).astype(np.float32)
    return {
        "w": jnp.asarray(rng.standard_normal((64, 1024)) * scales, jnp.float32),
        "e": jnp.asarray(rng.standard_normal(8 * 512), jnp.float32),
        "b": jnp.asarray(rng.standard_normal(1024), jnp.float32),
    }


def _placed(tree, mesh):
    return {k: jax.device_put(v, NamedSharding(mesh, SPECS[k])) for k, v in tree.items()}


def _train(tx, params, place=lambda t: t):
    @jax.jit
    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    state = jax.jit(tx.init)(params)
    for i in range(STEPS):
        params, state = step(params, state, place(_grads(i)))
    return params, state, step


def _assert_equal(got, want, exact=("w", "e")):
    """``exact`` leaves bitwise, the others to float32 rounding: XLA fuses a sharded
    program differently, and a product may round once less (a few ulps after
    ``STEPS`` steps)."""
    for k in want:
        if k not in exact:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-7, err_msg=k)
        else:
            np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)


@pytest.mark.parametrize("fmt", FORMATS)
def test_fsdp_leaf_keeps_codes_and_scales_sharded_and_equals_one_device(fmt):
    mesh = _mesh()
    tx = adam_jax.adamw(1e-2, weight_decay=0.1, moments=fmt)
    want, want_state, _ = _train(tx, _params())
    with jax.set_mesh(mesh):
        got, state, _ = _train(tx, _placed(_params(), mesh), lambda g: _placed(g, mesh))
    _assert_equal(got, want)
    adam = state[0]
    for moment in (adam.mu, adam.nu):
        for name in ("w", "e"):
            q = moment[name]
            assert storage.is_quantized(q), name
            # The codes and the block scales (4-bit: the row maxima) are split 8 ways on
            # the leading axis; 4-bit's column maxima stay whole on every device.
            for a in (q.codes, q.scales[0]):
                shard = a.addressable_shards[0].data.shape
                assert shard[0] * 8 == a.shape[0], (name, a.shape, shard)
        assert not storage.is_quantized(moment["b"])
    one = bytes_on_device0(want_state)
    eight = bytes_on_device0(state)
    # b's float32 moments (2 x 4 KiB), the count and 4-bit's column maxima stay whole.
    replicated = sum(
        bytes_on_device0(x)
        for x in jax.tree.leaves(state)
        if all(s is None for s in x.sharding.spec)
    )
    assert eight - replicated <= (one - replicated) / 8 + 64, (one, eight, replicated)
    _assert_equal(adam_jax.state_to_tree(state)[0].mu, adam_jax.state_to_tree(want_state)[0].mu)


def test_8bit_blocks_never_span_a_shard_boundary():
    mesh = _mesh()
    tx = adam_jax.adamw(1e-2, moments="8bit")
    with jax.set_mesh(mesh):
        params = _placed(_params(), mesh)
        _, state, step = _train(tx, params, lambda g: _placed(g, mesh))
        grads = _placed(_grads(STEPS), mesh)
        hlo = step.lower(params, state, grads).compile().as_text()
    # Every block is encoded on the device that holds its values: no communication.
    for collective in ("all-gather", "all-reduce", "all-to-all", "collective-permute"):
        assert collective not in hlo, collective
    # Encoding one shard alone gives that shard's codes and scales.
    for name, rows_per_shard in (("w", 8), ("e", 512)):
        q = state[0].mu[name]
        full = np.asarray(storage.decode(q))
        for i in range(8):
            part = full.reshape(8, -1)[i].reshape((rows_per_shard, 1024) if name == "w" else -1)
            codec = storage.resolve_moments("8bit").mu_codec(part.shape)
            alone = storage.encode(jnp.asarray(part), codec)
            shard_codes = np.asarray(q.codes).reshape(8, -1)[i]
            shard_scales = np.asarray(q.scales[0]).reshape(8, -1)[i]
            np.testing.assert_array_equal(np.asarray(alone.codes).reshape(-1), shard_codes)
            np.testing.assert_array_equal(np.asarray(alone.scales[0]).reshape(-1), shard_scales)


@pytest.mark.parametrize("fmt", FORMATS)
def test_zero1_partitions_quantized_moments_and_equals_one_device(fmt):
    mesh = _mesh()
    inner = adam_jax.adamw(1e-2, weight_decay=0.1, moments=fmt)
    want, _, _ = _train(inner, _params())
    tx = adam_jax.shard_state(inner, mesh, "data")
    replicated = {k: NamedSharding(mesh, P()) for k in SPECS}
    with jax.set_mesh(mesh):
        params = {k: jax.device_put(v, replicated[k]) for k, v in _params().items()}
        place = lambda g: {k: jax.device_put(v, replicated[k]) for k, v in g.items()}
        got, state, _ = _train(tx, params, place)
    _assert_equal(got, want, exact=())
    mu = state.inner[0].mu["w"]
    assert storage.is_quantized(mu)
    assert mu.codes.addressable_shards[0].data.shape[0] * 8 == mu.codes.shape[0]


@pytest.mark.parametrize("spec", [P("data", None), P(None, "data")], ids=["rows", "columns"])
def test_stochastic_rounding_draws_the_same_bits_however_the_leaf_is_sharded(spec):
    """``stochastic_rounding``'s bits hash each element's global index: a bfloat16 leaf
    sharded by rows or by columns lands exactly where the unsharded one does, and the
    sharded step keeps its sharding."""
    tx = adam_jax.stochastic_rounding(jax.random.key(0))
    index = jnp.arange(64 * 1024, dtype=jnp.float32).reshape(64, 1024)
    p = (1 + (index % 997) * 1e-3).astype(jnp.bfloat16)  # in [1, 2): ulp 2**-7
    u = jnp.full((64, 1024), 3e-3, jnp.bfloat16)  # about 0.4 ulp: the draw decides
    ref, _ = jax.jit(tx.update)({"w": u}, tx.init({"w": p}), {"w": p})
    sharding = NamedSharding(_mesh(), spec)
    ps, us = jax.device_put(p, sharding), jax.device_put(u, sharding)
    out, _ = jax.jit(tx.update)({"w": us}, tx.init({"w": ps}), {"w": ps})
    assert out["w"].sharding.spec == spec
    np.testing.assert_array_equal(
        np.asarray(out["w"], np.float32), np.asarray(ref["w"], np.float32)
    )
    moved = np.asarray(optax.apply_updates(p, ref["w"]) != p)
    assert 0.01 < moved.mean() < 0.99  # the draws differ between elements
