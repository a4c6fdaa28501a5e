"""adam_jax on 8 virtual CPU devices: state placement, grouping, ZeRO-1, equality.

Run through ``tests/test_multidevice.py``, which starts pytest on this folder in a
subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (the flag
must be set before jax is imported). Every mesh is tried with ``Auto`` axes
(sharding propagation) and ``Explicit`` axes (shardings in the types).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import adam_jax
from tests.distributed_model import (
    bytes_on_device0,
    make_batches,
    make_params,
    max_abs_diff,
    train,
)

STEPS = 5
# Sharded runs reduce the loss in another order than one device; Adam turns the
# float32 rounding of the gradient into at most a few ulps of lr per step.
TOLERANCE = 1e-5

#: mesh shape, axis names and the params' PartitionSpecs for each layout.
CONFIGS = {
    "data_parallel": ((8,), ("data",), {}),
    "fsdp": (
        (8,),
        ("data",),
        {("dense1", "kernel"): P("data", None), ("dense2", "kernel"): P("data", None)},
    ),
    "data_x_model": (
        (4, 2),
        ("data", "model"),
        {
            ("dense1", "kernel"): P(None, "model"),
            ("dense1", "bias"): P("model"),
            ("norm", "scale"): P("model"),
            ("dense2", "kernel"): P("model", None),
        },
    ),
}
AXIS_TYPES = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}


def make_mesh(config: str, axis_type: str) -> jax.sharding.Mesh:
    shape, names, _ = CONFIGS[config]
    return jax.make_mesh(shape, names, axis_types=(AXIS_TYPES[axis_type],) * len(names))


def param_specs(config: str):
    overrides = CONFIGS[config][2]
    return jax.tree_util.tree_map_with_path(
        lambda path, _: overrides.get(tuple(k.key for k in path), P()), make_params()
    )


def place_params(mesh, config: str):
    specs = param_specs(config)
    return jax.tree.map(
        lambda p, s: jax.device_put(p, NamedSharding(mesh, s)), make_params(), specs
    )


def batch_placer(mesh):
    sharding = NamedSharding(mesh, P("data"))
    return lambda batch: tuple(jax.device_put(b, sharding) for b in batch)


def reference_run(tx, steps: int = STEPS):
    """The same training on one device."""
    return train(tx, make_params(), make_batches(steps))


def assert_same_sharding(tree, params, what: str):
    for (path, x), p in zip(
        jax.tree_util.tree_flatten_with_path(tree)[0], jax.tree.leaves(params), strict=True
    ):
        sharding = getattr(x, "sharding", x)  # an array or a Sharding
        assert sharding.is_equivalent_to(p.sharding, p.ndim), (
            f"{what}{jax.tree_util.keystr(path)}: {sharding} != param {p.sharding}"
        )


configs = pytest.mark.parametrize("config", list(CONFIGS))
axis_types = pytest.mark.parametrize("axis_type", list(AXIS_TYPES))


def test_eight_virtual_devices():
    assert jax.device_count() == 8


# ----------------------------------------------------------------------------- state follows params


@configs
@axis_types
@pytest.mark.parametrize("mode", ["eager", "jit"])
def test_state_follows_params(config, axis_type, mode):
    mesh = make_mesh(config, axis_type)
    tx = adam_jax.adam(1e-3, amsgrad=True)
    with jax.set_mesh(mesh):
        params = place_params(mesh, config)
        state = (tx.init if mode == "eager" else jax.jit(tx.init))(params)
    adam_state = state[0]
    assert isinstance(adam_state.mu, dict), "the default layout keeps per-leaf moments"
    assert adam_state.count.sharding.device_set == params["dense1"]["kernel"].sharding.device_set
    for name in ("mu", "nu", "nu_max"):
        assert_same_sharding(getattr(adam_state, name), params, name)


@configs
@axis_types
def test_training_matches_single_device(config, axis_type):
    mesh = make_mesh(config, axis_type)
    tx = adam_jax.adamw(1e-2, weight_decay=0.1)
    want, _, want_losses = reference_run(tx)
    with jax.set_mesh(mesh):
        params = place_params(mesh, config)
        got, state, losses = train(tx, params, make_batches(STEPS), batch_placer(mesh))
    assert_same_sharding(got, params, "params")
    assert_same_sharding(state[0].mu, params, "mu")
    assert max_abs_diff(got, want) < TOLERANCE
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)


@axis_types
def test_abstract_init_with_out_shardings(axis_type):
    """``state_shardings`` from abstract params; ``init`` writes each shard where it lives."""
    mesh = make_mesh("fsdp", axis_type)
    tx = adam_jax.adamw(1e-3)
    with jax.set_mesh(mesh):
        params = place_params(mesh, "fsdp")
        abstract = jax.tree.map(
            lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=p.sharding), params
        )
        shardings = adam_jax.state_shardings(tx, abstract)
        assert_same_sharding(shardings[0].mu, params, "state_shardings mu")
        state = jax.jit(tx.init, out_shardings=shardings)(params)
    for m, p in zip(jax.tree.leaves(state[0].mu), jax.tree.leaves(params), strict=True):
        assert m.addressable_shards[0].data.shape == p.sharding.shard_shape(p.shape)
    kernel = state[0].mu["dense1"]["kernel"]
    assert kernel.addressable_shards[0].data.shape == (16 // 8, 32)


# ----------------------------------------------------------------------------- grouped layout


def mixed_placement_params(mesh):
    """Small leaves: two replicated f32, two sharded, one on 4 of the 8 devices, one bf16."""
    sub_mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("sub",))
    rep, shard = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    return {
        "a_rep": jax.device_put(jnp.arange(10.0), rep),
        "b_rep": jax.device_put(jnp.arange(6.0), rep),
        "c_shard": jax.device_put(jnp.arange(16.0), shard),
        "d_shard": jax.device_put(jnp.arange(8.0), shard),
        "e_sub": jax.device_put(jnp.arange(5.0), NamedSharding(sub_mesh, P())),
        "f_bf16": jax.device_put(jnp.arange(4.0, dtype=jnp.bfloat16), rep),
        "g_rep": jax.device_put(jnp.arange(3.0), rep),
    }


def part_names(state) -> list[list[str]]:
    plan = state.mu.plan
    return [[plan.paths[i] for i in part.leaves] for part in plan.parts]


@pytest.mark.parametrize("mode", ["eager", "jit", "eval_shape"])
def test_grouped_layout_never_concatenates_sharded_leaves_on_explicit_meshes(mode):
    mesh = make_mesh("data_parallel", "explicit")
    tx = adam_jax.scale_by_adam(layout="grouped")
    with jax.set_mesh(mesh):
        params = mixed_placement_params(mesh)
        del params["e_sub"]  # other devices: an error, see below
        init = {"eager": tx.init, "jit": jax.jit(tx.init)}.get(mode)
        state = init(params) if init else jax.eval_shape(tx.init, params)
    groups = part_names(state)
    want = [["['a_rep']", "['b_rep']", "['g_rep']"], ["['c_shard']"], ["['d_shard']"]]
    want += [["['f_bf16']"]]
    assert groups == want
    assert [p.grouped for p in state.mu.plan.parts] == [True, False, False, False]
    if mode != "eval_shape":
        # A single part keeps its leaf's sharding; the replicated group stays replicated.
        assert state.mu.buffers[1].sharding.is_equivalent_to(params["c_shard"].sharding, 1)
        assert state.mu.buffers[0].sharding.is_fully_replicated


def test_grouped_layout_is_the_same_eagerly_and_under_jit_on_auto_meshes():
    """On Auto axes a tracer carries no sharding, so the eager plan must not use one
    either (issue 13, item 8): the restore target from jit/eval_shape must match."""
    mesh = make_mesh("data_parallel", "auto")
    tx = adam_jax.scale_by_adam(layout="grouped")
    with jax.set_mesh(mesh):
        params = mixed_placement_params(mesh)
        del params["e_sub"]
        structures = {
            jax.tree.structure(tx.init(params)),
            jax.tree.structure(jax.jit(tx.init)(params)),
            jax.tree.structure(jax.eval_shape(tx.init, params)),
            jax.tree.structure(adam_jax.state_shardings(tx, params)),
        }
    assert len(structures) == 1


@pytest.mark.parametrize("layout", ["grouped", "per_leaf"])
def test_grouped_layout_with_leaves_on_different_devices_is_a_clear_error(layout):
    """Issue 13, item 9: it used to fail inside optimization_barrier."""
    params = {
        "a": jax.device_put(jnp.ones(3), jax.devices()[0]),
        "b": jax.device_put(jnp.ones(4), jax.devices()[1]),
    }
    if layout == "grouped":
        with pytest.raises(ValueError, match=r"\['a'\] and \['b'\] live on different devices"):
            adam_jax.scale_by_adam(layout=layout).init(params)
    # per_leaf keeps each moment with its param.
    tx = adam_jax.scale_by_adam(layout="per_leaf")
    state = tx.init(params)
    updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state)
    assert updates["b"].sharding.device_set == {jax.devices()[1]}
    np.testing.assert_allclose(updates["a"], 1.0, rtol=1e-6)


def test_packer_with_leaves_on_different_devices_is_a_clear_error():
    params = {
        "a": jax.device_put(jnp.ones(3), jax.devices()[0]),
        "b": jax.device_put(jnp.ones(4), jax.devices()[2]),
    }
    with pytest.raises(ValueError, match="different devices"):
        adam_jax.ParamPacker(params)


@pytest.mark.parametrize("axis_type", ["explicit", "auto"])
def test_grouped_update_equals_per_leaf_on_a_mesh(axis_type):
    """Bitwise on Explicit axes (sharded leaves keep their own buffers). On Auto axes
    the plan cannot see shardings (they are not in the traced types), so sharded
    leaves share the replicated buffer; XLA then partitions that computation, and
    results agree to a float32 ulp (rtol 2**-22)."""
    mesh = make_mesh("data_parallel", axis_type)
    with jax.set_mesh(mesh):
        params = mixed_placement_params(mesh)
        del params["e_sub"]  # one jit call cannot mix device sets
        grads = jax.tree.map(lambda p: jnp.cos(p) * 0.1, params)
        results = {}
        for layout in ("grouped", "per_leaf"):
            tx = adam_jax.scale_by_adam(layout=layout)
            state = tx.init(params)
            step = jax.jit(tx.update)
            for _ in range(3):
                updates, state = step(grads, state)
            results[layout] = updates
    grouped, per_leaf = (jax.tree.leaves(results[k]) for k in ("grouped", "per_leaf"))
    for a, b in zip(grouped, per_leaf, strict=True):
        if axis_type == "explicit":
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        else:
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2**-22, atol=0)


# ----------------------------------------------------------------------------- ZeRO-1


# On a 1-D "data" mesh the moments end up the same whether the params are
# replicated (ZeRO-1 adds "data") or already sharded over "data" (FSDP keeps it).
_ZERO_SPECS_1D = {
    ("dense1", "kernel"): P("data", None),
    ("dense1", "bias"): P("data"),
    ("norm", "scale"): P("data"),
    ("dense2", "kernel"): P("data", None),
    ("dense2", "bias"): P("data"),
    ("head_bias",): P(None),  # 3 elements do not split 8 ways
}
ZERO_SPECS = {
    "data_parallel": _ZERO_SPECS_1D,
    "fsdp": _ZERO_SPECS_1D,
    "data_x_model": {
        ("dense1", "kernel"): P("data", "model"),
        ("dense1", "bias"): P(("model", "data")),
        ("norm", "scale"): P(("model", "data")),
        ("dense2", "kernel"): P("model", "data"),
        ("dense2", "bias"): P("data"),
        ("head_bias",): P(None),
    },
}


def shard_state_for(inner, mesh, config: str, axis_type: str):
    """ZeRO-1 over "data"; on Auto axes the params' specs are passed, as they cannot be traced."""
    specs = param_specs(config) if axis_type == "auto" else None
    return adam_jax.shard_state(inner, mesh, "data", param_specs=specs)


@configs
@axis_types
def test_zero1_state_partitioned_and_equal_to_single_device(config, axis_type):
    mesh = make_mesh(config, axis_type)
    inner = adam_jax.adamw(1e-2, weight_decay=0.1)
    tx = shard_state_for(inner, mesh, config, axis_type)
    want, _, _ = reference_run(inner)
    with jax.set_mesh(mesh):
        params = place_params(mesh, config)
        plain_state = inner.init(params)
        got, state, _ = train(tx, params, make_batches(STEPS), batch_placer(mesh))
    assert_same_sharding(got, params, "params")  # updates are gathered back
    mu = state.inner[0].mu
    for path, m in jax.tree_util.tree_flatten_with_path(mu)[0]:
        key = tuple(k.key for k in path)
        want_sharding = NamedSharding(mesh, ZERO_SPECS[config][key])
        assert m.sharding.is_equivalent_to(want_sharding, m.ndim), (key, m.sharding)
    assert max_abs_diff(got, want) < TOLERANCE
    plain, zero = bytes_on_device0(plain_state), bytes_on_device0(state)
    expected = 4 + 2 * sum(  # count + mu + nu
        4 * math.prod(NamedSharding(mesh, ZERO_SPECS[config][k]).shard_shape(p.shape))
        for k, p in (
            (tuple(k.key for k in path), p)
            for path, p in jax.tree_util.tree_flatten_with_path(params)[0]
        )
    )
    assert zero == expected
    if config == "data_parallel":
        assert zero < plain / 7  # 8 ways, less the 3-element leaf and the counter


def test_zero1_collectives_in_hlo():
    """What XLA does with ZeRO-1 on CPU: all-reduce the gradient, all-gather the update."""
    mesh = make_mesh("data_parallel", "auto")
    tx = adam_jax.shard_state(adam_jax.adam(1e-3), mesh, "data")
    with jax.set_mesh(mesh):
        params = place_params(mesh, "data_parallel")
        state = tx.init(params)
        x, y = batch_placer(mesh)(make_batches(1)[0])
        from tests.distributed_model import make_step

        hlo = make_step(tx).lower(params, state, x, y).compile().as_text()
    assert "all-gather" in hlo
    assert "all-reduce" in hlo


def test_zero1_on_auto_axes_needs_the_specs_of_sharded_params():
    mesh = make_mesh("fsdp", "auto")
    params = place_params(mesh, "fsdp")
    with pytest.raises(ValueError, match=r"\['dense1'\]\['kernel'\].*param_specs="):
        adam_jax.shard_state(adam_jax.adam(1e-3), mesh, "data").init(params)


def test_zero1_rejects_unknown_axis():
    mesh = make_mesh("data_parallel", "auto")
    with pytest.raises(ValueError, match="'batch' is not an axis"):
        adam_jax.shard_state(adam_jax.adam(1e-3), mesh, "batch")


def test_orbax_round_trip_of_sharded_state(tmp_path):
    mesh = make_mesh("data_x_model", "auto")
    tx = shard_state_for(adam_jax.adamw(1e-2), mesh, "data_x_model", "auto")
    with jax.set_mesh(mesh):
        params = place_params(mesh, "data_x_model")
        _, state, _ = train(tx, params, make_batches(2), batch_placer(mesh))
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(tmp_path / "state", state)
        checkpointer.wait_until_finished()
        abstract = jax.eval_shape(tx.init, params)
        shardings = adam_jax.state_shardings(tx, params)
        target = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
        )
        restored = checkpointer.restore(tmp_path / "state", target)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
