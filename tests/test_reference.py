"""Every optimizer and convention against the independent float64 reference, 200 steps."""

from __future__ import annotations

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from tests.harness import CASES, TOLERANCE, find_adam_state, run_trajectory
from tests.reference import make_problem, max_rel_error, reference_trajectory

# Storage the reference emulates per param dtype: (params, mu, nu). float16
# keeps both moments in float32 by default (adam_jax's default_nu_dtype and
# default_mu_dtype explain why).
STORAGE = {
    "float32": (None, None, None),
    "complex64": (None, None, None),
    "bfloat16": (ml_dtypes.bfloat16,) * 3,
    "float16": (np.float16, np.float32, np.float32),
}


def _errors(case, dtype_name, params0, grads):
    dtype = jnp.dtype(dtype_name)
    p_store, mu_store, nu_store = STORAGE[dtype_name]
    ref = reference_trajectory(
        case.ref,
        params0,
        grads,
        param_dtype=p_store,
        mu_dtype=mu_store,
        nu_dtype=nu_store,
        decay_mask=case.decay_mask,
    )
    params, state = run_trajectory(case.ours(), params0, grads, dtype)
    adam_state = find_adam_state(state)
    return {
        "params": max_rel_error(params, ref["params"], params0),
        "mu": max_rel_error(adam_state.mu, ref["mu"]),
        "nu": max_rel_error(adam_state.nu, ref["nu"]),
    }


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_float32_matches_float64_reference(case):
    params0, grads = make_problem()
    errors = _errors(case, "float32", params0, grads)
    assert max(errors.values()) < TOLERANCE["float32"], errors


@pytest.mark.parametrize("case", [c for c in CASES if c.optax is not None], ids=lambda c: c.name)
def test_as_close_to_reference_as_optax(case):
    """Our float32 error is no larger than optax's on the same case (small slack for ties)."""
    params0, grads = make_problem()
    ref = reference_trajectory(case.ref, params0, grads, decay_mask=case.decay_mask)
    ours, _ = run_trajectory(case.ours(), params0, grads)
    theirs, _ = run_trajectory(case.optax(), params0, grads)
    err_ours = max_rel_error(ours, ref["params"], params0)
    err_optax = max_rel_error(theirs, ref["params"], params0)
    assert err_ours <= 1.25 * err_optax + 1e-7, (err_ours, err_optax)


LOW_PRECISION_CASES = [c for c in CASES if c.name in ("adam", "adamw", "nadam", "amsgrad")]


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16", "complex64"])
@pytest.mark.parametrize("case", LOW_PRECISION_CASES, ids=lambda c: c.name)
def test_dtype_matrix_matches_reference(case, dtype_name):
    # Params of size 0.01 so that lr=1e-3 steps are not below half an ulp of a
    # bf16/fp16 param (they would all round away and the test would prove
    # nothing). float16 cannot hold 1e-6-scale first moments except as
    # subnormals (6e-8 apart), where a relative error is meaningless: its
    # gradients span 1e-3..1e2.
    params0, grads = make_problem(
        complex_=dtype_name == "complex64",
        min_exponent=-3 if dtype_name == "float16" else -6,
        param_scale=0.01,
    )
    errors = _errors(case, dtype_name, params0, grads)
    assert max(errors.values()) < TOLERANCE[dtype_name], errors
