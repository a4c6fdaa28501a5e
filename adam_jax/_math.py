"""The Adam update of one leaf. The formula lives here and nowhere else.

Kingma & Ba, "Adam: A Method for Stochastic Optimization", arXiv:1412.6980,
Algorithm 1, generalised by per-step coefficients (see
:func:`adam_jax._numerics.adam_coefficients`):

.. math::
  m_t &= m_{t-1} + ((1-\\beta_1) g_t - (1-\\beta_1) m_{t-1}) \\\\
  v_t &= v_{t-1} + ((1-\\beta_2) |g_t|^2 - (1-\\beta_2) v_{t-1}) \\\\
  u_t &= \\frac{c_m m_t + c_g g_t}{\\sqrt{c_v \\tilde v_t + \\epsilon_{root}} + \\epsilon}

where :math:`\\tilde v_t` is :math:`v_t`, or the AMSGrad running maximum.
The averages are :func:`adam_jax._numerics.moving_average` and
:func:`adam_jax._numerics.second_moment_average` (accurate, and overflow-safe:
an infinite ``v`` stays infinite) and the quotient is
:func:`adam_jax._numerics.safe_divide` (0 where the denominator is infinite), so
a finite gradient never turns a param into NaN.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

import jax
import jax.numpy as jnp

from adam_jax._numerics import (
    AdamCoefficients,
    abs_sq,
    cast_scalar,
    compute_dtype,
    moving_average,
    safe_divide,
    second_moment_average,
)


class AmsgradMode(enum.Enum):
    """What the AMSGrad maximum (Reddi et al., 2018) is taken of."""

    OFF = "off"
    CORRECTED = "corrected"  # optax: max of bias-corrected v_hat
    RAW = "raw"  # torch, keras: max of raw v, bias-corrected afterwards


class LeafUpdate(NamedTuple):
    """Output of :func:`adam_leaf`: the update and the new moments (float32)."""

    update: jax.Array
    mu: jax.Array
    nu: jax.Array
    nu_max: jax.Array | None


def adam_leaf(
    g: jax.Array,
    m: jax.Array,
    v: jax.Array,
    v_max: jax.Array | None,
    *,
    one_minus_b1: jax.Array,
    one_minus_b2: jax.Array,
    eps: jax.Array,
    eps_root: jax.Array,
    coef: AdamCoefficients,
    amsgrad: AmsgradMode,
) -> LeafUpdate:
    """One Adam step for one leaf, computed in float32 (complex64 for complex), or in the
    leaf's own dtype where it is wider (float64, complex128).

    Args:
      g: gradient leaf, any floating or complex dtype.
      m, v, v_max: stored moments (any storage dtype); ``v_max`` is ``None``
        unless AMSGrad is on.
      eps, eps_root: scalars in the leaf's scalar dtype (``_numerics.scalar_dtype``).
      one_minus_b1, one_minus_b2: ``1 - b1`` and ``1 - b2`` in the scalar dtype,
        computed in float64 when known on the host (see ``_numerics.one_minus``).
      coef: per-step coefficients in the scalar dtype.
      amsgrad: which AMSGrad variant, if any.

    Returns:
      The update (in the compute dtype, not yet cast) and the new moments in
      the compute dtype; the caller casts them to their storage dtypes.
    """
    cdt = compute_dtype(g.dtype)
    g = g.astype(cdt)
    m = m.astype(cdt)
    v = v.astype(compute_dtype(v.dtype))
    m = moving_average(m, g, one_minus_b1)
    v = second_moment_average(v, abs_sq(g).astype(v.dtype), one_minus_b2)

    c_v = cast_scalar(coef.c_v, v)
    if amsgrad is AmsgradMode.CORRECTED:
        v_max = jnp.maximum(v_max.astype(v.dtype), c_v * v)
        v_hat = v_max
    elif amsgrad is AmsgradMode.RAW:
        v_max = jnp.maximum(v_max.astype(v.dtype), v)
        v_hat = c_v * v_max
    else:
        v_max = None
        v_hat = c_v * v

    numerator = cast_scalar(coef.c_m, m) * m
    if coef.c_g is not None:
        numerator = numerator + cast_scalar(coef.c_g, g) * g
    denominator = jnp.sqrt(v_hat + cast_scalar(eps_root, v)) + cast_scalar(eps, v)
    update = safe_divide(numerator, denominator)
    return LeafUpdate(update=update, mu=m, nu=v, nu_max=v_max)
