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
separates decayed from non-decayed leaves, and turn the usual per-leaf mask into
one flag per buffer with :meth:`ParamPacker.pack_mask`::

  packer = adam_jax.ParamPacker(params, group_fn=lambda path, p: p.ndim > 1)
  tx = adam_jax.adamw(1e-3, mask=packer.pack_mask(jax.tree.map(lambda p: p.ndim > 1, params)))
"""

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

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
        """Tree -> tuple of buffers.

        Raises:
          ValueError: ``params`` differs from the tree the packer was built for
            in structure (leaf paths), in a leaf's shape, or in a leaf's dtype
            (a buffer has one dtype; another would be silently cast).
        """
        leaves = self.plan.check_leaves(
            params,
            name="params",
            reference_name="the params the packer was built for",
            check_dtypes=True,
        )
        return tuple(self.plan.gather(leaves))

    def unpack(self, packed: tuple[jax.Array, ...]) -> Any:
        """Tuple of buffers -> the original tree. Call it inside the jitted loss."""
        if len(packed) != len(self.plan.parts):
            raise ValueError(f"Expected {len(self.plan.parts)} packed buffers, got {len(packed)}.")
        return self.plan.treedef.unflatten(self.plan.scatter(packed))

    def pack_mask(self, mask: Any) -> tuple[bool, ...]:
        """A per-leaf boolean mask (as ``optax`` masks take) -> one flag per buffer.

        Use it for ``mask=`` of ``adamw`` and friends on packed params: a mask by
        ``ndim`` applied to the flat buffers themselves would see only vectors.
        ``mask`` has the params' structure with one Python or NumPy bool per leaf.

        Raises:
          ValueError: ``mask`` does not have the packed tree's leaves, or a buffer
            holds leaves with both values (pass a ``group_fn`` that separates them).
          TypeError: a mask leaf is not a bool (e.g. a traced or array value).
        """
        with_paths = jax.tree_util.tree_flatten_with_path(mask)[0]
        if len(with_paths) != len(self.plan.paths):
            got = [jax.tree_util.keystr(path) for path, _ in with_paths]
            raise ValueError(
                f"mask has {len(got)} leaves but the packer was built for "
                f"{len(self.plan.paths)}; mask leaves: {', '.join(got[:8])}; packed leaves: "
                f"{', '.join(self.plan.paths[:8])}"
            )
        flags = []
        for path, leaf in with_paths:
            if not isinstance(leaf, bool | np.bool_):
                raise TypeError(
                    f"mask leaf {jax.tree_util.keystr(path)} must be a bool, got "
                    f"{type(leaf).__name__}"
                )
            flags.append(bool(leaf))
        out = []
        for part in self.plan.parts:
            values = {flags[i] for i in part.leaves}
            if len(values) > 1:
                on = [self.plan.paths[i] for i in part.leaves if flags[i]]
                off = [self.plan.paths[i] for i in part.leaves if not flags[i]]
                raise ValueError(
                    "A packed buffer holds leaves the mask selects and leaves it does not "
                    f"(True: {', '.join(on[:4])}; False: {', '.join(off[:4])}). Build the "
                    "ParamPacker with a group_fn that separates them, e.g. "
                    "group_fn=lambda path, leaf: <the mask's rule>."
                )
            out.append(values.pop())
        return tuple(out)

    def buffer_labels(self) -> list[str]:
        """One line per buffer: which leaves it holds (for masks and debugging)."""
        return [", ".join(self.plan.paths[i] for i in part.leaves) for part in self.plan.parts]
