"""Shared test harness: the optimizer table, per-dtype tolerances, a trajectory runner."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adam_jax
from adam_jax.compat import keras_adam, torch_adam, torch_adamw
from tests.reference import RefConfig

N_STEPS = 200
LR = 1e-3
WD = 1e-2
DECAY_MASK = {"w": True, "b": False, "k": True, "s": False}


def cosine(step):
    """The schedule used by the schedule cases (works on ints and arrays)."""
    return LR * (0.55 + 0.45 * np.cos(np.pi * step / N_STEPS))


def cosine_jax(step):
    return LR * (0.55 + 0.45 * jnp.cos(jnp.pi * step / N_STEPS))


@dataclasses.dataclass(frozen=True)
class Case:
    """One row of the table: ours, the float64 reference, and optax's equivalent."""

    name: str
    ours: Callable[[], optax.GradientTransformation]
    ref: RefConfig
    optax: Callable[[], optax.GradientTransformation] | None = None
    decay_mask: dict[str, bool] | None = None


CASES = [
    Case("adam", lambda: adam_jax.adam(LR), RefConfig(), lambda: optax.adam(LR)),
    Case(
        "adam_eps_root",
        lambda: adam_jax.adam(LR, eps_root=1e-8),
        RefConfig(eps_root=1e-8),
        lambda: optax.adam(LR, eps_root=1e-8),
    ),
    Case(
        "adam_schedule",
        lambda: adam_jax.adam(cosine_jax),
        RefConfig(lr_schedule=cosine),
        lambda: optax.adam(cosine_jax),
    ),
    Case(
        "adamw",
        lambda: adam_jax.adamw(LR, weight_decay=WD),
        RefConfig(weight_decay=WD),
        lambda: optax.adamw(LR, weight_decay=WD),
    ),
    Case(
        "adamw_mask",
        lambda: adam_jax.adamw(LR, weight_decay=WD, mask=DECAY_MASK),
        RefConfig(weight_decay=WD),
        lambda: optax.adamw(LR, weight_decay=WD, mask=DECAY_MASK),
        decay_mask=DECAY_MASK,
    ),
    Case("nadam", lambda: adam_jax.nadam(LR), RefConfig(nesterov=True), lambda: optax.nadam(LR)),
    Case(
        "nadamw",
        lambda: adam_jax.nadamw(LR, weight_decay=WD),
        RefConfig(nesterov=True, weight_decay=WD),
        lambda: optax.nadamw(LR, weight_decay=WD),
    ),
    Case(
        "amsgrad", lambda: adam_jax.amsgrad(LR), RefConfig(amsgrad=True), lambda: optax.amsgrad(LR)
    ),
    Case(
        "adam_amsgrad_kw",
        lambda: adam_jax.adam(LR, amsgrad=True),
        RefConfig(amsgrad=True),
        lambda: optax.amsgrad(LR),
    ),
    Case(
        "amsgrad_uncorrected",
        lambda: adam_jax.amsgrad(LR, bias_correction_mu=False, bias_correction_nu=False),
        RefConfig(amsgrad=True, bias_correction_mu=False, bias_correction_nu=False),
        lambda: optax.amsgrad(LR, bias_correction_mu=False, bias_correction_nu=False),
    ),
    Case("torch_adam", lambda: torch_adam(LR), RefConfig(convention="torch")),
    Case(
        "torch_adam_l2",
        lambda: torch_adam(LR, weight_decay=WD),
        RefConfig(convention="torch", weight_decay=WD, decoupled=False),
    ),
    Case(
        "torch_amsgrad",
        lambda: torch_adam(LR, amsgrad=True),
        RefConfig(convention="torch", amsgrad=True),
    ),
    Case(
        "torch_maximize",
        lambda: torch_adam(LR, maximize=True),
        RefConfig(convention="torch", maximize=True),
    ),
    Case(
        "torch_adamw",
        lambda: torch_adamw(LR, weight_decay=WD),
        RefConfig(convention="torch", weight_decay=WD),
    ),
    Case("keras_adam", lambda: keras_adam(LR), RefConfig(convention="keras", eps=1e-7)),
    Case(
        "keras_amsgrad",
        lambda: keras_adam(LR, amsgrad=True),
        RefConfig(convention="keras", eps=1e-7, amsgrad=True),
    ),
    Case(
        "keras_weight_decay",
        lambda: keras_adam(LR, weight_decay=WD),
        RefConfig(convention="keras", eps=1e-7, weight_decay=WD),
    ),
]
CASES_BY_NAME = {c.name: c for c in CASES}

# Max relative error after N_STEPS steps against the float64 reference.
# float32/complex64: pure float64 reference. bfloat16/float16: the reference
# rounds stored params and moments to the same storage dtype every step, so the
# budget is 8 ulps of that dtype (2**-8 for bf16, 2**-11 for fp16): a rounding
# tie that falls the other way moves a param by one ulp, and 200 steps add up.
TOLERANCE = {
    "float32": 2e-5,
    "complex64": 2e-5,
    "bfloat16": 8 * 2.0**-8,
    "float16": 8 * 2.0**-11,
}


def run_trajectory(
    tx: optax.GradientTransformation,
    params0: dict[str, np.ndarray],
    grads: list[dict[str, np.ndarray]],
    dtype: Any = jnp.float32,
    *,
    use_jit: bool = True,
) -> tuple[dict[str, np.ndarray], Any]:
    """Runs ``tx`` over the gradient sequence; returns final params (NumPy) and state."""

    def step(params, state, g):
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state

    if use_jit:
        step = jax.jit(step)
    params = {k: jnp.asarray(v, dtype) for k, v in params0.items()}
    state = tx.init(params)
    for g in grads:
        params, state = step(params, state, {k: jnp.asarray(v, dtype) for k, v in g.items()})
    return {k: np.asarray(v) for k, v in params.items()}, state


def is_moment_state(x) -> bool:
    return isinstance(x, (adam_jax.AdamState, adam_jax.AmsgradState))


def find_adam_state(state):
    """The first Adam/AMSGrad state inside a (possibly chained) optimizer state, moments
    params-shaped (whatever the layout)."""
    for node in jax.tree.leaves(adam_jax.state_to_tree(state), is_leaf=is_moment_state):
        if is_moment_state(node):
            return node
    return None
