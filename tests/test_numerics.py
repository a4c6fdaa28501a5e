"""Numerics: float32 scalars, strict promotion, dtype stability, zero gradients, counters."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adam_jax
from adam_jax._numerics import bias_correction, one_minus, safe_increment
from adam_jax.compat import keras_adam, torch_adam, torch_adamw
from tests.harness import CASES, find_adam_state

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16, jnp.complex64]
OPTIMIZERS = {
    "adam": lambda: adam_jax.adam(1e-3),
    "adamw": lambda: adam_jax.adamw(1e-3, weight_decay=0.1),
    "nadam": lambda: adam_jax.nadam(1e-3),
    "nadamw": lambda: adam_jax.nadamw(1e-3),
    "amsgrad": lambda: adam_jax.amsgrad(1e-3),
    "adam_eps_root": lambda: adam_jax.adam(1e-3, eps_root=1e-8),
    "adam_schedule": lambda: adam_jax.adamw(optax.cosine_decay_schedule(1e-3, 10), 0.9),
    "adamw_wd_schedule": lambda: adam_jax.adamw(
        1e-3, weight_decay=optax.linear_schedule(0.1, 0, 5)
    ),
    "torch_adam": lambda: torch_adam(weight_decay=1e-2, amsgrad=True, maximize=True),
    "torch_adamw": lambda: torch_adamw(),
    "keras_adam": lambda: keras_adam(amsgrad=True, weight_decay=0.01),
}


def _tree(dtype, fill=1.0):
    return {
        "a": jnp.full((3, 4), fill, dtype),
        "b": [jnp.full((5,), fill, dtype), jnp.full((), fill, dtype)],
    }


def _dtypes(tree):
    return jax.tree.structure(tree), [(x.shape, x.dtype) for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_strict_promotion_dtypes_stable_and_finite_on_zero_grads(name, dtype):
    """Strict promotion, update dtype == grad dtype, stable state, finite on zero grads."""
    tx = OPTIMIZERS[name]()
    params = _tree(dtype)
    with jax.numpy_dtype_promotion("strict"):
        state = tx.init(params)
        before = _dtypes(state)
        step = jax.jit(tx.update)
        for fill in (0.0, 0.0, 1e-3, 0.0):
            grads = _tree(dtype, fill)
            updates, state = step(grads, state, params)
            assert _dtypes(updates) == _dtypes(grads)
            assert _dtypes(state) == before
            for u in jax.tree.leaves(updates):
                assert bool(jnp.all(jnp.isfinite(u))), (name, dtype, fill)
            params = optax.apply_updates(params, updates)


def test_optax_adam_is_not_strict_clean_but_we_are():
    """The reason strict promotion is tested at all."""
    params = _tree(jnp.bfloat16)
    with jax.numpy_dtype_promotion("strict"):
        with pytest.raises(Exception, match="promot"):
            tx = optax.adam(1e-3)
            tx.update(params, tx.init(params), params)
        tx = adam_jax.adam(1e-3)
        tx.update(params, tx.init(params), params)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_zero_gradients_low_precision_give_exact_zero_updates(dtype):
    tx = adam_jax.adam(1e-3)
    params = _tree(dtype)
    updates, _ = tx.update(_tree(dtype, 0.0), tx.init(params), params)
    for u in jax.tree.leaves(updates):
        np.testing.assert_array_equal(np.asarray(u, np.float32), 0.0)


def test_bias_correction_is_float32_and_accurate():
    count = jnp.asarray(1, jnp.int32)
    bc = bias_correction(0.999, count)
    assert bc.dtype == jnp.float32
    assert abs(float(bc) - 1e-3) / 1e-3 < 1e-6  # 1 - float32(0.999) would be off by 1.3e-5
    assert abs(float(one_minus(0.999)) - 1e-3) / 1e-3 < 1e-7
    big = bias_correction(0.999, jnp.asarray(2**31 - 1, jnp.int32))
    assert float(big) == 1.0


def test_counter_saturates_instead_of_wrapping():
    top = jnp.asarray(np.iinfo(np.int32).max, jnp.int32)
    assert int(safe_increment(top)) == np.iinfo(np.int32).max
    assert int(safe_increment(jnp.asarray(5, jnp.int32))) == 6
    tx = adam_jax.adam(1e-3)
    params = _tree(jnp.float32)
    state = tx.init(params)
    inner = state[0]._replace(count=top)
    updates, new = tx.update(_tree(jnp.float32, 0.5), (inner, *state[1:]), params)
    assert int(new[0].count) == np.iinfo(np.int32).max
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


@pytest.mark.parametrize("layout", ["per_leaf", "grouped"])
def test_mu_and_nu_dtypes_are_independent(layout):
    tx = adam_jax.scale_by_adam(
        mu_dtype=jnp.bfloat16, nu_dtype=jnp.float32, amsgrad=True, layout=layout
    )
    params = _tree(jnp.bfloat16)
    state = tx.init(params)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state.mu))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.nu))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.nu_max))
    _, state2 = tx.update(_tree(jnp.bfloat16, 1e-4), state, params)
    assert _dtypes(state2) == _dtypes(state)
    # nu holds (1-b2) g^2 = 1e-11 in float32; stored as bf16 it would be far coarser.
    nu = adam_jax.moments_as_tree(state2.nu)
    assert float(nu["a"][0, 0]) == pytest.approx(1e-3 * (1e-4 * (1 + 2**-8)) ** 2, rel=2e-2)


def test_default_moment_dtypes_float16_params_are_both_float32():
    """Both moments of a float16 leaf in float32: same precision (issue 13, item 1)."""
    state = adam_jax.scale_by_adam().init(_tree(jnp.float16))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.mu))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.nu))
    explicit = adam_jax.scale_by_adam(mu_dtype=jnp.float16).init(_tree(jnp.float16))
    assert all(x.dtype == jnp.float16 for x in jax.tree.leaves(explicit.mu))


def test_complex_nu_is_real_average_of_abs_squared():
    tx = adam_jax.scale_by_adam()
    params = {"z": jnp.zeros((2,), jnp.complex64)}
    state = tx.init(params)
    assert state.nu["z"].dtype == jnp.float32
    g = {"z": jnp.asarray([3 + 4j, 1j], jnp.complex64)}
    updates, state = tx.update(g, state)
    np.testing.assert_allclose(np.asarray(state.nu["z"]), 1e-3 * np.array([25.0, 1.0]), rtol=1e-6)
    assert updates["z"].dtype == jnp.complex64
    # First step: m_hat = g, v_hat = |g|^2, so u = g / |g| (up to eps).
    np.testing.assert_allclose(np.asarray(updates["z"]), [0.6 + 0.8j, 1j], rtol=1e-6)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_differentiable_through_update_at_zero_gradient_with_eps_root(amsgrad):
    tx = adam_jax.scale_by_adam(eps_root=1e-8, amsgrad=amsgrad)
    params = {"w": jnp.zeros(4)}
    state = tx.init(params)

    def f(g):
        updates, _ = tx.update({"w": g}, state)
        return jnp.sum(updates["w"] ** 2) + jnp.sum(updates["w"])

    grad = jax.grad(f)(jnp.zeros(4))
    assert bool(jnp.all(jnp.isfinite(grad)))
    # Without eps_root the derivative of sqrt at 0 is infinite: the test can fail.
    tx0 = adam_jax.scale_by_adam(eps_root=0.0)
    state0 = tx0.init(params)
    grad0 = jax.grad(lambda g: jnp.sum(tx0.update({"w": g}, state0)[0]["w"]))(jnp.zeros(4))
    assert not bool(jnp.all(jnp.isfinite(grad0)))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_jit_equals_no_jit_and_no_retrace(case):
    tx = case.ours()
    params = {
        "w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4),
        "b": jnp.ones(4),
        "k": jnp.full((2, 2), 0.5, jnp.float32),
        "s": jnp.asarray(2.0, jnp.float32),
    }
    chex.clear_trace_counter()
    grads = [jax.tree.map(lambda p, i=i: jnp.sin(p * (i + 1)), params) for i in range(3)]

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, state, g):
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state

    p_jit, s_jit = params, tx.init(params)
    p_eager, s_eager = params, tx.init(params)
    for g in grads:
        p_jit, s_jit = step(p_jit, s_jit, g)
        updates, s_eager = tx.update(g, s_eager, p_eager)
        p_eager = optax.apply_updates(p_eager, updates)
    chex.assert_trees_all_close(p_jit, p_eager, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(find_adam_state(s_jit), find_adam_state(s_eager), rtol=1e-6)


def test_state_survives_lax_cond():
    """Identical state types across steps are what lax.cond needs."""
    tx = adam_jax.adamw(1e-3, weight_decay=optax.linear_schedule(0.1, 0.0, 5), amsgrad=True)
    params = _tree(jnp.bfloat16)
    state = tx.init(params)

    def step(state):
        return tx.update(_tree(jnp.bfloat16, 0.1), state, params)[1]

    jax.jit(lambda s, c: jax.lax.cond(c, step, lambda s: s, s))(state, True)
