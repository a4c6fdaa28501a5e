"""Packed parameters: keep the params themselves in a few contiguous buffers.

The grouped optimizer layout still pays one kernel (and one host-side buffer)
per parameter leaf to apply the update. Packing removes that: the params live
in one flat buffer per (dtype, placement) group, the model gets its usual tree
from :meth:`ParamPacker.unpack` *inside* the jitted loss, the gradient arrives
packed, and Adam runs on a handful of large buffers.

Example (Flax NNX)::

  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  packer = adam_jax.ParamPacker(params)
  packed = packer.pack(params)
  tx = adam_jax.adamw(1e-3)
  opt_state = tx.init(packed)

  @jax.jit
  def train_step(packed, opt_state, rest, x, y):
      def loss(packed):
          model = nnx.merge(graphdef, packer.unpack(packed), rest)
          return loss_fn(model, x, y)
      loss, grads = jax.value_and_grad(loss)(packed)
      updates, opt_state = tx.update(grads, opt_state, packed)
      return optax.apply_updates(packed, updates), opt_state, loss

Weight-decay masks act per buffer: give ``ParamPacker`` a ``group_fn`` that
separates decayed from non-decayed leaves, then mask the buffers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from adam_jax._layout import GroupPlan, make_plan


class ParamPacker:
    """Packs a params tree into a tuple of flat buffers and back.

    Leaves are grouped by dtype and placement (never concatenating differently
    sharded leaves; a sharded leaf keeps its own buffer, unflattened), and
    optionally by ``group_fn(path, leaf)`` (e.g. "decays or not").

    Args:
      params: the params tree (arrays or ``jax.ShapeDtypeStruct``).
      group_fn: optional ``(keypath, leaf) -> hashable`` that further splits groups.
    """

    def __init__(self, params: Any, group_fn: Callable[[Any, Any], Any] | None = None):
        self.plan: GroupPlan = make_plan(params, max_grouped_size=None, group_fn=group_fn)

    def pack(self, params: Any) -> tuple[jax.Array, ...]:
        """Tree -> tuple of buffers (checks the tree matches the one packed first)."""
        return tuple(self.plan.gather(self.plan.check_leaves(params, name="params")))

    def unpack(self, packed: tuple[jax.Array, ...]) -> Any:
        """Tuple of buffers -> the original tree. Call it inside the jitted loss."""
        if len(packed) != len(self.plan.parts):
            raise ValueError(f"Expected {len(self.plan.parts)} packed buffers, got {len(packed)}.")
        return self.plan.treedef.unflatten(self.plan.scatter(packed))

    def buffer_labels(self) -> list[str]:
        """One line per buffer: which leaves it holds (for masks and debugging)."""
        return [", ".join(self.plan.paths[i] for i in part.leaves) for part in self.plan.parts]
