"""Numerical helpers: scalars, bias correction, safe counters, robust averages, casts.

Every scalar the Adam update needs (``1 - b**t``, the Nesterov and Keras
coefficients, ``eps``, the learning rate) is formed here in the *scalar dtype*
of the leaf it applies to: float32 for every leaf of 32 bits or fewer (``b**t``
in bfloat16 rounds to 1 and divides by zero), float64 for float64/complex128
leaves (x64 users expect float64-accurate updates).
"""

from __future__ import annotations

import enum
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

SCALAR_DTYPE = jnp.float32


class Convention(enum.Enum):
    """Where bias correction and eps sit, and what AMSGrad takes the max of.

    ``OPTAX``: ``m_hat / (sqrt(v_hat + eps_root) + eps)``; AMSGrad takes the max
    of the bias-corrected ``v_hat``.
    ``TORCH``: same direction; AMSGrad takes the max of the raw ``v`` and then
    bias-corrects it.
    ``KERAS``: ``lr_t = lr * sqrt(1 - b2**t) / (1 - b1**t)`` and
    ``m / (sqrt(v) + eps)`` (the "epsilon hat" form); AMSGrad on raw ``v``.
    """

    OPTAX = "optax"
    TORCH = "torch"
    KERAS = "keras"


class AdamCoefficients(NamedTuple):
    """Per-step float32 scalars of ``u = (c_m m + c_g g) / (sqrt(c_v v + eps_root) + eps)``."""

    c_m: jax.Array
    c_g: jax.Array | None
    c_v: jax.Array


def scalar_dtype(dtype) -> np.dtype:
    """The dtype in which the scalars of a leaf of ``dtype`` are formed.

    float32 for leaves of at most 32 bits (complex64 included), float64 for
    float64 and complex128 leaves.
    """
    if jnp.finfo(jnp.dtype(dtype)).dtype.itemsize > 4:
        return jnp.dtype(jnp.float64)
    return jnp.dtype(SCALAR_DTYPE)


class SharedScalars:
    """Scalars formed once per scalar dtype (see :func:`scalar_dtype`) within one step.

    ``scalars[leaf.dtype]`` calls ``make(scalar_dtype(leaf.dtype))`` the first
    time and reuses the result for every leaf of the same scalar dtype.
    """

    def __init__(self, make):
        self._make = make
        self._cache: dict = {}

    def __getitem__(self, leaf_dtype):
        key = scalar_dtype(leaf_dtype)
        if key not in self._cache:
            self._cache[key] = self._make(key)
        return self._cache[key]


def to_scalar(x, dtype=SCALAR_DTYPE) -> jax.Array:
    """Returns ``x`` (Python number, NumPy or JAX scalar) as a scalar array of ``dtype``.

    A host number is rounded once, straight to ``dtype`` (so ``1e-8`` is
    float64-exact for float64 leaves); an array is cast.
    """
    return jnp.asarray(x, dtype=dtype)


def evaluate_schedule(schedule, count: jax.Array):
    """``schedule(count)``, as the schedule returns it (host number or array).

    The schedule is user code (optax's own schedules mix int32 counts with
    Python floats), so it runs under standard promotion even when the caller
    has turned strict promotion on; everything around it stays strict. Convert
    the result per leaf with :func:`to_scalar`.
    """
    with jax.numpy_dtype_promotion("standard"):
        return schedule(count)


def _host_float(x) -> float | None:
    """``float(x)`` if ``x`` is a concrete host number (Python/NumPy), else ``None``."""
    if isinstance(x, (int, float, np.number)) or (isinstance(x, np.ndarray) and x.ndim == 0):
        return float(x)
    return None


def one_minus(b, dtype=SCALAR_DTYPE) -> jax.Array:
    """``1 - b`` in ``dtype``, computed in float64 on the host when ``b`` is a number.

    ``float32(0.999)`` is off by 1.3e-8, which is a 1.3e-5 relative error in
    ``1 - b2``; subtracting in float64 first keeps it at float32 rounding.
    """
    host = _host_float(b)
    if host is not None:
        return to_scalar(1.0 - host, dtype)
    return jnp.ones((), dtype) - to_scalar(b, dtype)


def log_decay(b, dtype=SCALAR_DTYPE) -> jax.Array:
    """``log(b)`` in ``dtype``, computed in float64 on the host when ``b`` is a number."""
    host = _host_float(b)
    if host is not None:
        return to_scalar(np.log(host) if host > 0 else -np.inf, dtype)
    return jnp.log(to_scalar(b, dtype))


def safe_increment(count: jax.Array) -> jax.Array:
    """``count + 1`` for an int32 counter, saturating at its maximum."""
    max_value = jnp.iinfo(count.dtype).max
    return jnp.where(count < max_value, count + jnp.ones_like(count), count)


def bias_correction(decay, count: jax.Array, dtype=SCALAR_DTYPE) -> jax.Array:
    """Returns ``1 - decay**count`` in ``dtype`` (float32 or float64), for ``count >= 1``.

    Computed in float32 whatever the param dtype: in bfloat16 ``decay**count``
    rounds to 1 for small ``count`` and the correction would divide by zero.
    It is evaluated as ``-expm1(count * log(decay))`` with ``log(decay)`` taken in
    float64 on the host: ``1 - float32(0.999)**t`` would carry a 1.3e-5 relative
    error at small ``t`` (optax's form), this one stays near float32 rounding.
    """
    return -jnp.expm1(count.astype(dtype) * log_decay(decay, dtype))


def adam_coefficients(
    count_inc: jax.Array,
    b1,
    b2,
    *,
    convention: Convention,
    nesterov: bool,
    bias_correction_mu: bool = True,
    bias_correction_nu: bool = True,
    dtype=SCALAR_DTYPE,
) -> AdamCoefficients:
    """Coefficients of the Adam direction at step ``t = count_inc``, in ``dtype``.

    .. math::
      u = \\frac{c_m m_t + c_g g_t}{\\sqrt{c_v v_t + \\epsilon_{root}} + \\epsilon}

    * optax/torch: :math:`c_m = 1/(1-\\beta_1^t)`, :math:`c_g = 0`,
      :math:`c_v = 1/(1-\\beta_2^t)`;
    * Nesterov (optax): :math:`c_m = \\beta_1/(1-\\beta_1^{t+1})`,
      :math:`c_g = (1-\\beta_1)/(1-\\beta_1^t)`;
    * Keras: :math:`c_m = \\sqrt{1-\\beta_2^t}/(1-\\beta_1^t)`, :math:`c_v = 1`.
    """
    # b1 and b2 stay as given (host numbers where possible) so that the
    # bias corrections and 1 - b1 are formed in float64 on the host.
    one = jnp.ones((), dtype)
    bc1 = bias_correction(b1, count_inc, dtype) if bias_correction_mu else one
    bc2 = bias_correction(b2, count_inc, dtype) if bias_correction_nu else one
    c_g = None
    if convention is Convention.KERAS:
        return AdamCoefficients(c_m=jnp.sqrt(bc2) / bc1, c_g=None, c_v=one)
    if nesterov:
        bc1_next = (
            bias_correction(b1, safe_increment(count_inc), dtype) if bias_correction_mu else one
        )
        c_m = to_scalar(b1, dtype) / bc1_next
        c_g = one_minus(b1, dtype) / bc1
    else:
        c_m = one / bc1
    return AdamCoefficients(c_m=c_m, c_g=c_g, c_v=one / bc2)


def compute_dtype(dtype) -> np.dtype:
    """Arithmetic dtype for a leaf: float32 / complex64, or wider if the leaf is."""
    dtype = jnp.dtype(dtype)
    # No jnp.promote_types: it obeys (and would trip) strict promotion mode.
    if jnp.issubdtype(dtype, jnp.complexfloating):
        return dtype if dtype.itemsize > 8 else jnp.dtype(jnp.complex64)
    return dtype if dtype.itemsize > 4 else jnp.dtype(jnp.float32)


def real_dtype(dtype) -> np.dtype:
    """The real dtype matching ``dtype`` (``complex64 -> float32``)."""
    return jnp.finfo(jnp.dtype(dtype)).dtype


def abs_sq(x: jax.Array) -> jax.Array:
    """``|x|**2``, real for complex ``x`` (differentiable everywhere)."""
    if jnp.iscomplexobj(x):
        return jnp.real(x) ** 2 + jnp.imag(x) ** 2
    return x * x


def as_array_leaf(x):
    """A Python ``int``/``float`` leaf as a floating JAX scalar; anything else unchanged.

    optax accepts Python numbers as params (``{"a": 1, "b": 2}``); they become
    floating scalars (float32, or float64 with x64) rather than integer arrays,
    which the Adam family rejects.
    """
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return jnp.asarray(float(x))
    return x


def arrays_tree(tree):
    """:func:`as_array_leaf` on every leaf of ``tree`` (``None`` stays ``None``)."""
    return None if tree is None else jax.tree.map(as_array_leaf, tree)


def cast_scalar(s: jax.Array, like: jax.Array) -> jax.Array:
    """Casts a scalar to the dtype of ``like`` (explicit, strict-safe; free if equal)."""
    return s if s.dtype == like.dtype else s.astype(like.dtype)


def moving_average(x: jax.Array, y: jax.Array, one_minus_decay: jax.Array) -> jax.Array:
    """``decay * x + (1 - decay) * y``, written as ``x + ((1-b) y - (1-b) x)``.

    It needs only ``1 - b``, exact to rounding when formed in float64 on the
    host, whereas ``float32(0.999)`` itself is off by 1.3e-8 and that error
    compounds over steps in ``b * x``. Unlike the plain lerp ``x + (1-b)(y - x)``,
    ``y - x`` is never formed, so ``y = -x = 3.3e38`` cannot overflow: for
    finite ``x`` and ``y`` the result is finite.
    """
    c = cast_scalar(one_minus_decay, x)
    return x + (c * y - c * x)


def second_moment_average(v: jax.Array, g_sq: jax.Array, one_minus_decay: jax.Array) -> jax.Array:
    """:func:`moving_average` of a non-negative ``v``, keeping ``v = inf`` infinite.

    A finite gradient whose square overflows makes ``v`` infinite; the lerp
    form would then give ``inf - inf = NaN`` on the next step and turn the
    param into NaN for good. optax and PyTorch (``b * v + (1-b) g**2``) keep
    ``inf``, and so does this. NaN inputs still give NaN.
    """
    return jnp.where(v == jnp.inf, v, moving_average(v, g_sq, one_minus_decay))


def safe_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """``numerator / denominator`` for a non-negative denominator, but 0 where it is infinite.

    The denominator of Adam is ``sqrt(v_hat) + eps``: infinite when a squared
    gradient overflowed. Mathematically ``|m_hat| <= sqrt(v_hat)`` up to a
    constant, so the quotient tends to 0 (optax gives 0 when ``m_hat`` is
    finite, and NaN when it is not; this gives 0 in both cases).
    """
    quotient = numerator / denominator.astype(numerator.dtype)
    return jnp.where(denominator == jnp.inf, jnp.zeros((), quotient.dtype), quotient)
