"""Equality with optax's adam, adamw, nadam, nadamw and amsgrad at the same options."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import optax
import pytest

import adam_jax
from tests.harness import CASES, find_adam_state, run_trajectory
from tests.reference import RefConfig, make_problem, max_rel_error, reference_trajectory

OPTAX_CASES = [c for c in CASES if c.optax is not None]


@pytest.mark.parametrize("case", OPTAX_CASES, ids=lambda c: c.name)
def test_trajectory_equals_optax(case):
    params0, grads = make_problem()
    ours, our_state = run_trajectory(case.ours(), params0, grads)
    theirs, their_state = run_trajectory(case.optax(), params0, grads)
    assert max_rel_error(ours, theirs, params0) < 1e-5
    # Same first moment too (optax's lives in its own state type).
    nodes = jax.tree.leaves(their_state, is_leaf=lambda x: hasattr(x, "mu"))
    optax_inner = next(s for s in nodes if hasattr(s, "mu"))
    assert max_rel_error(find_adam_state(our_state).mu, optax_inner.mu) < 1e-5


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (adam_jax.adam(1e-2, 0.8, 0.99, 1e-6), optax.adam(1e-2, 0.8, 0.99, 1e-6)),
        (
            adam_jax.adamw(1e-2, 0.8, 0.99, 1e-6, 0.0, None, 0.1),
            optax.adamw(1e-2, 0.8, 0.99, 1e-6, 0.0, None, 0.1),
        ),
        (adam_jax.nadamw(1e-2, 0.8, 0.99), optax.nadamw(1e-2, 0.8, 0.99)),
    ],
)
def test_positional_order_matches_optax(ours, theirs):
    params0, grads = make_problem(n_steps=20)
    a, _ = run_trajectory(ours, params0, grads)
    b, _ = run_trajectory(theirs, params0, grads)
    assert max_rel_error(a, b, params0) < 1e-4


def test_bf16_mu_storage_is_closer_to_reference_than_optax():
    """mu stored in bf16, arithmetic in f32: we track the reference; optax drifts 0.5%."""
    params0, grads = make_problem(n_steps=20)
    ref = reference_trajectory(RefConfig(lr=1e-2), params0, grads, mu_dtype=ml_dtypes.bfloat16)
    ours, state = run_trajectory(adam_jax.adam(1e-2, mu_dtype=jnp.bfloat16), params0, grads)
    theirs, _ = run_trajectory(optax.adam(1e-2, mu_dtype=jnp.bfloat16), params0, grads)
    assert find_adam_state(state).mu["w"].dtype == jnp.bfloat16
    err_ours = max_rel_error(ours, ref["params"], params0)
    assert err_ours < 1e-5
    assert err_ours <= max_rel_error(theirs, ref["params"], params0)
