"""Optimizer state of the Adam family."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax


class AdamState(NamedTuple):
    """State of :func:`adam_jax.scale_by_adam`.

    Attributes:
      count: scalar ``int32`` step counter; it saturates at ``2**31 - 1``.
      mu: first moment :math:`m`, a pytree shaped like the params, stored in
        ``mu_dtype`` (default: the param dtype).
      nu: second moment :math:`v`, shaped like the params, stored in
        ``nu_dtype`` (default: the real dtype of the param, float32 for float16
        params; ``v`` of a complex param is real).
      nu_max: the AMSGrad running maximum, shaped and typed like ``nu``; ``None``
        when AMSGrad is off.
    """

    count: jax.Array
    mu: Any
    nu: Any
    nu_max: Any = None
