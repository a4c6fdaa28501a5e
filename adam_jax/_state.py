"""Optimizer state of the Adam family: optax's own state types.

The default state of every adam_jax optimizer *is* optax's: ``scale_by_adam``
keeps an ``optax.ScaleByAdamState`` (``count, mu, nu``), or with AMSGrad an
``optax.ScaleByAmsgradState`` (``count, mu, nu, nu_max``), and the aliases
chain the same stages as the optax alias of the same name. So a checkpoint
written by ``optax.adamw(...)`` restores into ``adam_jax.adamw(...)``'s state
and back, and ``optax.tree_utils`` finds ``"mu"``, ``"nu"`` and ``"count"``.

* ``count``: scalar ``int32`` step counter; it saturates at ``2**31 - 1``.
* ``mu``: first moment :math:`m`, params-shaped (or grouped buffers with
  ``layout="grouped"``), stored in ``mu_dtype``.
* ``nu``: second moment :math:`v`, stored in ``nu_dtype``; real for complex
  params.
* ``nu_max``: the AMSGrad running maximum, like ``nu``.
"""

from typing import Any, NamedTuple

import jax
import optax

#: The state of :func:`adam_jax.scale_by_adam` without AMSGrad (optax's type).
AdamState = optax.ScaleByAdamState
#: The state of :func:`adam_jax.scale_by_adam` with ``amsgrad=True`` (optax's type).
AmsgradState = optax.ScaleByAmsgradState
#: The state of a stage with a scheduled scalar (learning rate): optax's type.
ScheduleState = optax.ScaleByScheduleState


class WeightDecaySchedule(NamedTuple):
    """State of :func:`adam_jax.add_decayed_weights` with a scheduled weight decay.

    Same name and field as optax's (``optax.add_decayed_weights``), which is not
    exported: checkpoints of ``optax.adamw(weight_decay=schedule)`` restore into
    it by field name.
    """

    count: jax.Array


def is_moment_state(node: Any) -> bool:
    """Whether ``node`` is an Adam or AMSGrad state (optax's or adam_jax's: the same types)."""
    return isinstance(node, (AdamState, AmsgradState))
