"""Layouts: per-leaf moments, or small leaves grouped into flat buffers.

Per-leaf Adam pays a fixed cost per leaf (kernel launches on GPU, host dispatch,
and on CPU three XLA loop fusions per leaf). The grouped layout concatenates
the *small* leaves of equal dtype and placement into one flat buffer per group,
runs the same per-leaf math (:func:`adam_jax._math.adam_leaf`) on the buffers,
and splits the update back. Large leaves stay per-leaf. Elementwise math on a
concatenation equals the math on the pieces, so results are bitwise equal to the
per-leaf layout (tested).

The plan (which leaves form which buffer) is static and lives in the pytree
aux data of :class:`GroupedMoments`, so it survives ``jit`` and checkpointing:
orbax saves and restores the buffers against a target built by ``init``.
"""

import dataclasses
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from adam_jax._sharding import check_one_device_set, placement_key, zeros_like_param
from adam_jax._validate import TreeSignature, leaf_paths, match_leaves

Layout = Literal["per_leaf", "grouped"]
LAYOUTS = ("per_leaf", "grouped")

#: Leaves with at most this many elements are grouped (``layout="grouped"``).
#: Grouping costs a copy of the gradient and of the update (about 12 extra
#: bytes per element); it pays while that is cheaper than the
#: fixed per-leaf cost, which is a few microseconds per kernel.
DEFAULT_MAX_GROUPED_SIZE = 2**15


def check_layout(layout: str) -> None:
    if layout == "auto":
        raise ValueError(
            'layout="auto" was removed: it grouped on one device and not on several, so '
            "the state's structure depended on the machine. Use the default "
            '"per_leaf" (optax\'s state), or "grouped" for many small leaves.'
        )
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}.")


@dataclasses.dataclass(frozen=True)
class Part:
    """One buffer of the layout: several leaves (flat, concatenated) or a single leaf."""

    leaves: tuple[int, ...]
    grouped: bool


@dataclasses.dataclass(frozen=True)
class GroupPlan:
    """Static description of a grouped layout (hashable: it is pytree aux data)."""

    treedef: Any
    paths: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    parts: tuple[Part, ...]

    @property
    def has_groups(self) -> bool:
        return any(p.grouped for p in self.parts)

    @property
    def signature(self) -> TreeSignature:
        return TreeSignature(self.treedef, self.shapes, self.paths)

    def check_leaves(
        self, tree, *, name: str, reference_name: str, check_dtypes: bool = False
    ) -> list[jax.Array]:
        """Returns the leaves of ``tree`` after checking them against the plan.

        The check is :func:`adam_jax._validate.match_leaves`, the one every
        layout uses: same structure (or the same leaf paths, up to leaf
        wrappers such as ``nnx.Param``), same shapes, and with ``check_dtypes``
        the same dtypes.
        """
        leaves = match_leaves(tree, self.signature, name=name, reference_name=reference_name)
        if check_dtypes:
            for leaf, want, path in zip(leaves, self.dtypes, self.paths, strict=True):
                got = jnp.dtype(leaf.dtype).name
                if got != want:
                    raise ValueError(
                        f"Dtype mismatch at leaf {path}: {name} has dtype {got} but "
                        f"{reference_name} has dtype {want}."
                    )
        return leaves

    def gather(self, leaves: Sequence[jax.Array]) -> list[jax.Array]:
        """Leaves (in treedef order) -> one array per part."""
        out = []
        for part in self.parts:
            if part.grouped:
                out.append(_concatenate([jnp.ravel(leaves[i]) for i in part.leaves]))
            else:
                out.append(leaves[part.leaves[0]])
        return out

    def offsets(self) -> list[int]:
        """Start of each grouped leaf in its buffer, grouped leaves in plan order."""
        out = []
        for part in self.parts:
            if part.grouped:
                starts = itertools.accumulate(
                    (math.prod(self.shapes[i]) for i in part.leaves), initial=0
                )
                out.extend(list(starts)[:-1])
        return out

    def scatter(
        self, parts: Sequence[jax.Array], count: jax.Array | None = None
    ) -> list[jax.Array]:
        """One array per part -> leaves in treedef order.

        With ``count`` (any int32 scalar the program receives at run time, such
        as the optimizer's step count) and on CPU, each leaf is cut with a
        ``dynamic_slice`` at an offset XLA cannot constant-fold (see
        :func:`opaque_int32`), so leaves of equal shape share one compiled
        kernel; elsewhere, or without ``count``, with one ``lax.split`` per
        buffer (static slices, whose transpose is one ``concatenate``: the
        gradient through :meth:`ParamPacker.unpack` is a single pack, not one
        buffer-sized ``pad`` per leaf). Both give the same values.
        """
        if count is None:
            return self._split(parts)
        return jax.lax.platform_dependent(
            parts,
            count,
            cpu=self._split_at_runtime_offsets,
            default=lambda ps, c: self._split(ps),
        )

    def _split_at_runtime_offsets(self, parts: Sequence[jax.Array], count: jax.Array):
        """The CPU split; differentiated as the static split.

        The transpose of ``dynamic_slice`` is a buffer-sized ``dynamic_update_slice``
        per leaf, quadratic in the leaf count (a gradient through a 1000-leaf
        update compiled in 34 s and ran in 162 ms). The tangent of this split is
        therefore the static ``lax.split``, whose transpose is one ``concatenate``.
        """

        @jax.custom_jvp
        def split(parts, count):
            return tuple(self._split(parts, opaque_int32(self.offsets(), count)))

        @split.defjvp
        def split_jvp(primals, tangents):
            parts, count = primals
            return split(parts, count), tuple(self._split(tangents[0]))

        return list(split(tuple(parts), count))

    def _split(self, parts: Sequence[jax.Array], offsets=None) -> list[jax.Array]:
        """Leaves cut with ``dynamic_slice`` at ``offsets`` (one per grouped leaf, as
        :meth:`offsets` orders them) if given, else with one ``lax.split`` per buffer."""
        leaves: list[Any] = [None] * len(self.shapes)
        starts = None if offsets is None else iter(offsets)
        for part, buf in zip(self.parts, parts, strict=True):
            if not part.grouped:
                leaves[part.leaves[0]] = buf
                continue
            sizes = [math.prod(self.shapes[i]) for i in part.leaves]
            if starts is None:
                pieces = _split_sizes(buf, sizes)
            else:
                pieces = [jax.lax.dynamic_slice(buf, (next(starts),), (n,)) for n in sizes]
            for i, piece in zip(part.leaves, pieces, strict=True):
                leaves[i] = piece.reshape(self.shapes[i])
        return leaves


#: Eagerly, each ``concatenate``/``split`` op is compiled for its exact list of
#: operand shapes: XLA:CPU took minutes to compile one 5000-operand concatenate,
#: and a split compiles one kernel per output (14 s for 128 outputs on a loaded
#: 2-core machine). Eager gathers therefore concatenate chunks of this many
#: leaves (0.2 s to compile each, cached across steps), and eager splits cut
#: each leaf with a ``dynamic_slice`` whose offset is a run-time operand (one
#: compiled kernel per slice size). Under ``jit`` the ops are emitted flat.
EAGER_CHUNK = 128


def _is_concrete(xs: Sequence[Any]) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def _concatenate(xs: Sequence[jax.Array]) -> jax.Array:
    if len(xs) <= EAGER_CHUNK or not _is_concrete(xs):
        return jnp.concatenate(xs)
    return jnp.concatenate(
        [jnp.concatenate(xs[i : i + EAGER_CHUNK]) for i in range(0, len(xs), EAGER_CHUNK)]
    )


def _split_sizes(buf: jax.Array, sizes: Sequence[int]) -> list[jax.Array]:
    if not _is_concrete([buf]):
        return list(jax.lax.split(buf, sizes))
    starts = np.cumsum([0, *sizes[:-1]]).astype(np.int32)
    return [jax.lax.dynamic_slice(buf, (o,), (n,)) for o, n in zip(starts, sizes, strict=True)]


def opaque_int32(values: Sequence[int], count: jax.Array) -> tuple[jax.Array, ...]:
    """``values`` as int32 run-time scalars that XLA cannot fold back into constants.

    XLA:CPU compiles every distinct fused kernel separately (several ms each)
    and identical kernels once. A static ``slice`` at offset ``o_i`` makes the
    kernel of leaf ``i`` distinct, so a 1000-leaf grouped step compiled in
    about 8.6 s. A ``dynamic_slice`` reading its offset from a buffer is the
    same kernel for every leaf of one shape, but only if the offset is not a
    constant XLA can see (it would turn the ``dynamic_slice`` back into a
    ``slice``). Here the offsets are the carry of a ``while_loop`` whose counter
    starts at ``min(count, -1) < 0``: the loop runs zero times and returns
    ``values`` unchanged, for any ``count``, but XLA cannot prove it. The price
    is one int32 scalar copy per value into the loop's carry. Measured on 2 CPU
    cores, 1000 leaves of 1000: compile 8.6 s -> 2.5-3.3 s, step time unchanged
    or lower (``benchmarks/studies/results/cpu-2core/compile_time.md``).
    """
    counter = jnp.minimum(jnp.asarray(count, jnp.int32), -1)

    def body(carry):
        step, *vals = carry
        return (step - 1, *[v + step for v in vals])

    carry = (counter, *[jnp.int32(v) for v in values])
    return tuple(jax.lax.while_loop(lambda c: c[0] > 0, body, carry)[1:])


def make_plan(
    params,
    max_grouped_size: int | None = DEFAULT_MAX_GROUPED_SIZE,
    group_fn: Callable[[Any, Any], Any] | None = None,
) -> GroupPlan:
    """Groups the small leaves of ``params`` by (dtype, placement); large leaves stay alone.

    ``max_grouped_size=None`` groups leaves of any size; ``group_fn(path, leaf)``
    adds its result to the grouping key. The plan is the same whether ``params``
    are concrete (NumPy, JAX, or a mix), traced under ``jit`` or abstract
    (``eval_shape``): placement only separates leaves known to be sharded at
    trace time too (:func:`adam_jax._sharding.placement_key`).

    Raises:
      ValueError: concrete leaves live on different sets of devices (one
        buffer cannot span them, and no single ``jit`` could take them).
    """
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(params)
    leaves = [leaf for _, leaf in with_paths]
    check_one_device_set(with_paths)
    groups: dict[Any, list[int]] = {}
    singles: list[int] = []
    for i, (path, leaf) in enumerate(with_paths):
        key = (jnp.dtype(leaf.dtype).name, placement_key(leaf))
        if group_fn is not None:
            key = (*key, group_fn(path, leaf))
        small = max_grouped_size is None or math.prod(leaf.shape) <= max_grouped_size
        if small and key[1] is None:
            groups.setdefault(key, []).append(i)
        else:
            singles.append(i)
    parts = [Part(tuple(idx), grouped=len(idx) > 1) for idx in groups.values()]
    parts += [Part((i,), grouped=False) for i in singles]
    parts.sort(key=lambda p: p.leaves[0])
    return GroupPlan(
        treedef=treedef,
        paths=leaf_paths(params),
        shapes=tuple(tuple(leaf.shape) for leaf in leaves),
        dtypes=tuple(jnp.dtype(leaf.dtype).name for leaf in leaves),
        parts=tuple(parts),
    )


@jax.tree_util.register_pytree_with_keys_class
class GroupedMoments:
    """A moment tree in the grouped layout: one array per part, plan in aux data.

    ``to_tree()`` gives the usual params-shaped tree (for inspection and tests).
    """

    def __init__(self, buffers: Sequence[jax.Array], plan: GroupPlan):
        self.buffers = tuple(buffers)
        self.plan = plan

    def tree_flatten_with_keys(self):
        keys = [jax.tree_util.SequenceKey(i) for i in range(len(self.buffers))]
        return list(zip(keys, self.buffers, strict=True)), self.plan

    def tree_flatten(self):
        return self.buffers, self.plan

    @classmethod
    def tree_unflatten(cls, plan, buffers):
        return cls(buffers, plan)

    def to_tree(self):
        return self.plan.treedef.unflatten(self.plan.scatter(self.buffers))

    def __repr__(self) -> str:
        shapes = [getattr(b, "shape", b) for b in self.buffers]
        return f"GroupedMoments(parts={len(self.buffers)}, shapes={shapes})"


def moments_as_tree(moments):
    """Params-shaped view of a moment tree, whatever its layout."""
    return moments.to_tree() if isinstance(moments, GroupedMoments) else moments


def use_grouped_plan(params, layout: str, max_grouped_size: int | None) -> GroupPlan | None:
    """The plan to use for ``params`` under ``layout``, or ``None`` for per-leaf moments.

    It never depends on the machine (device count, placement unknown under
    ``jit``): ``"grouped"`` always groups, ``"per_leaf"`` never does.
    """
    if layout == "per_leaf":
        return None
    return make_plan(params, max_grouped_size)


def grouped_zeros(params, plan: GroupPlan, dtype_fn: Callable[[Any], Any]) -> GroupedMoments:
    """Zero moments in the grouped layout; ``dtype_fn(param_dtype)`` picks the storage dtype."""
    leaves = jax.tree.leaves(params)
    zeros = [zeros_like_param(p, dtype_fn(p.dtype)) for p in leaves]
    return GroupedMoments(plan.gather(zeros), plan)
