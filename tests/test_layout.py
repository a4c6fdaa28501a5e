"""Grouped layout: bitwise equal to per-leaf, mixed dtypes, checkpoint round-trip."""

from __future__ import annotations

import jax
import jax.export
import jax.extend.core as jax_core
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adam_jax
from adam_jax._layout import DEFAULT_MAX_GROUPED_SIZE, make_plan
from adam_jax.compat import keras_adam, torch_adam, torch_adamw
from tests.harness import find_adam_state


def _mixed_tree():
    rng = np.random.default_rng(0)

    def a(shape, dtype):
        return jnp.asarray(rng.normal(size=shape), dtype)

    return {
        "big": a((200, 200), jnp.float32),  # 40,000 > 2**15: stays per leaf
        "small": [a((7,), jnp.float32), a((3, 5), jnp.float32), a((), jnp.float32)],
        "half": {"w": a((4, 4), jnp.bfloat16), "b": a((4,), jnp.bfloat16)},
    }


def _run(tx, params, n=5):
    state = tx.init(params)

    @jax.jit
    def step(params, state, i):
        grads = jax.tree.map(lambda p: (jnp.sin(p.astype(jnp.float32) * i)).astype(p.dtype), params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for i in range(n):
        params, state = step(params, state, jnp.float32(i + 1))
    return params, state


def test_plan_groups_small_leaves_by_dtype_and_keeps_large_ones_alone():
    plan = make_plan(_mixed_tree())
    leaves = jax.tree.leaves(_mixed_tree())
    grouped = [p for p in plan.parts if p.grouped]
    assert len(grouped) == 2  # one float32 group, one bfloat16 group
    for part in grouped:
        assert len({leaves[i].dtype for i in part.leaves}) == 1
        assert all(leaves[i].size <= DEFAULT_MAX_GROUPED_SIZE for i in part.leaves)
    big = [p for p in plan.parts if not p.grouped]
    assert [leaves[p.leaves[0]].shape for p in big] == [(200, 200)]


LAYOUT_CASES = {
    "adam": lambda layout: adam_jax.adam(1e-2, layout=layout),
    "adamw_schedule": lambda layout: adam_jax.adamw(
        optax.cosine_decay_schedule(1e-2, 5), weight_decay=0.1, layout=layout
    ),
    "nadamw": lambda layout: adam_jax.nadamw(1e-2, layout=layout),
    "amsgrad": lambda layout: adam_jax.amsgrad(1e-2, layout=layout),
    "adam_mu_bf16": lambda layout: adam_jax.adam(1e-2, mu_dtype=jnp.bfloat16, layout=layout),
    "torch_adam": lambda layout: torch_adam(
        1e-2, weight_decay=0.1, amsgrad=True, maximize=True, layout=layout
    ),
    "torch_adamw": lambda layout: torch_adamw(1e-2, layout=layout),
    "keras": lambda layout: keras_adam(1e-2, amsgrad=True, weight_decay=0.1, layout=layout),
}


@pytest.mark.parametrize("name", sorted(LAYOUT_CASES))
def test_grouped_is_bitwise_equal_to_per_leaf(name):
    params = _mixed_tree()
    p1, s1 = _run(LAYOUT_CASES[name]("per_leaf"), params)
    p2, s2 = _run(LAYOUT_CASES[name]("grouped"), params)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), strict=True):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    m1, m2 = find_adam_state(s1), find_adam_state(s2)
    for a, b in zip(jax.tree.leaves(m1), jax.tree.leaves(m2), strict=True):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))

    def is_moment_state(x):
        return isinstance(x, (adam_jax.AdamState, adam_jax.AmsgradState))

    states = jax.tree.leaves(s2, is_leaf=is_moment_state)
    assert any(is_moment_state(x) and isinstance(x.mu, adam_jax.GroupedMoments) for x in states)


@pytest.mark.parametrize("count", [0, 7, 2**31 - 1, -5, -(2**31)])
def test_grouped_split_is_exact_at_any_step_count(count):
    """The split offsets hang on the step count (opaque_int32); any count gives the same split."""
    params = _mixed_tree()
    tx = {layout: adam_jax.scale_by_adam(layout=layout) for layout in ("per_leaf", "grouped")}
    grads = jax.tree.map(lambda p: jnp.cos(p.astype(jnp.float32)).astype(p.dtype), params)
    out = {}
    for layout, t in tx.items():
        state = t.init(params)._replace(count=jnp.int32(count))
        out[layout] = jax.jit(t.update)(grads, state, params)[0]
    for a, b in zip(jax.tree.leaves(out["per_leaf"]), jax.tree.leaves(out["grouped"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_opaque_int32_returns_its_values_for_any_count():
    from adam_jax._layout import opaque_int32

    values = [0, 5, 1000, 2**30]
    for count in [0, 1, 2**31 - 1, -1, -(2**31)]:
        got = jax.jit(opaque_int32, static_argnums=0)(tuple(values), jnp.int32(count))
        assert [int(v) for v in got] == values, count


def test_default_layout_is_per_leaf_and_grouping_is_explicit():
    """Issue 14: the default state is optax's (params-shaped) on any machine."""
    params = {"a": jnp.ones((300, 300)), "b": jnp.ones((400, 100))}
    small = {"a": jnp.ones(3), "b": jnp.ones(4)}
    assert adam_jax.adam(1e-3).init(small)[0].mu["a"].shape == (3,)  # default
    assert adam_jax.scale_by_adam(layout="per_leaf").init(small).mu["a"].shape == (3,)
    assert isinstance(
        adam_jax.scale_by_adam(layout="grouped").init(small).mu, adam_jax.GroupedMoments
    )
    state = adam_jax.scale_by_adam(layout="grouped").init(params)
    assert isinstance(state.mu, adam_jax.GroupedMoments)
    with pytest.raises(ValueError, match="removed"):
        adam_jax.adam(1e-3, layout="auto")


def test_grouped_state_dtypes_and_bad_grads():
    params = _mixed_tree()
    tx = adam_jax.adam(1e-3, layout="grouped")
    state = tx.init(params)
    inner = state[0]
    assert {b.dtype for b in inner.mu.buffers} == {jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)}
    bad = jax.tree.map(lambda x: x, params)
    bad["small"][1] = jnp.ones((5, 3), jnp.float32)
    with pytest.raises(ValueError, match=r"\['small'\]\[1\].*\(5, 3\).*\(3, 5\)"):
        tx.update(bad, state, params)
    with pytest.raises(ValueError, match="missing from grads"):
        tx.update({"big": params["big"]}, state, params)


def test_grouped_state_checkpoint_round_trip(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    params = _mixed_tree()
    tx = adam_jax.adamw(1e-3, amsgrad=True, layout="grouped")
    params, state = _run(tx, params, n=3)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "state", state)
    target = jax.eval_shape(tx.init, params)
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(tmp_path / "state", target)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    # Training continues identically from the restored state.
    grads = jax.tree.map(jnp.ones_like, params)
    u1, _ = tx.update(grads, state, params)
    u2, _ = tx.update(grads, restored, params)
    for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2), strict=True):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


@pytest.mark.parametrize(
    ("platforms", "dynamic", "static"),
    [(("cpu",), True, False), (("cuda",), False, True), (("cpu", "cuda"), True, True)],
)
def test_grouped_split_is_chosen_per_platform(platforms, dynamic, static):
    """Run-time offsets on CPU (where distinct kernels are slow to compile), static elsewhere."""
    params = {f"p{i}": jnp.zeros((10,)) for i in range(3)}
    tx = adam_jax.scale_by_adam(layout="grouped")
    exported = jax.export.export(jax.jit(tx.update), platforms=platforms)(
        params, tx.init(params), params
    )
    text = exported.mlir_module()
    assert ("stablehlo.dynamic_slice" in text) == dynamic
    assert ("stablehlo.while" in text) == dynamic
    assert ("stablehlo.slice" in text) == static


def _jaxpr_primitives(jaxpr) -> list[str]:
    names = []
    for eqn in jaxpr.eqns:
        names.append(eqn.primitive.name)
        for sub in jax_core.jaxprs_in_params(eqn.params):
            names += _jaxpr_primitives(sub)
    return names


def test_gradient_through_a_grouped_update_matches_per_leaf():
    """Meta-gradients through the update: same values, and no per-leaf buffer-sized scatter.

    On CPU the grouped split is a ``dynamic_slice`` per leaf, whose transpose would
    be a buffer-sized ``dynamic_update_slice`` per leaf; its tangent is the static
    ``lax.split`` instead, whose transpose is one ``concatenate``.
    """
    params = _mixed_tree()
    params.pop("big")

    def meta(tx, p):
        state = tx.init(p)
        grads = jax.tree.map(lambda x: jnp.sin(x.astype(jnp.float32)).astype(x.dtype), p)
        updates, _ = tx.update(grads, state, p)
        new = optax.apply_updates(p, updates)
        return sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(new))

    grouped, per_leaf = (adam_jax.adam(1e-2, layout=k) for k in ("grouped", "per_leaf"))
    got = jax.jit(jax.grad(lambda p: meta(grouped, p)))(params)
    want = jax.jit(jax.grad(lambda p: meta(per_leaf, p)))(params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-6)
    prims = _jaxpr_primitives(jax.make_jaxpr(jax.grad(lambda p: meta(grouped, p)))(params).jaxpr)
    assert "dynamic_slice" in prims  # the CPU split was traced
    assert "dynamic_update_slice" not in prims and "pad" not in prims
