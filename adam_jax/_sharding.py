"""Where optimizer state lives on a mesh. No math here.

* :func:`placement_key`: which leaves may share a grouped buffer (same dtype and
  the same *replicated* placement; a sharded leaf never shares one).
* :func:`zeros_like_param`: zero moments that take their param's sharding, also
  under ``jit`` on meshes with ``Auto`` axes, where plain ``zeros_like`` has no
  data dependence on the param and XLA would put it on one device.
* :func:`state_shardings`: the shardings of ``tx.init(params)`` without running
  it, for ``jax.jit(tx.init, out_shardings=...)`` and for restoring checkpoints.
* :func:`shard_state`: ZeRO-1, moments partitioned over a data-parallel axis.
"""

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from adam_jax._validate import TreeSignature, match_leaves

# ----------------------------------------------------------------------------- placement


def _is_tracer(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def _traced_sharding(x):
    """The sharding in a tracer's type, or ``None`` (older JAX, no mesh)."""
    try:
        return jax.typeof(x).sharding
    except Exception:  # pragma: no cover - depends on the JAX version
        return None


def _has_explicit_axes(mesh) -> bool:
    return any(t == AxisType.Explicit for t in getattr(mesh, "axis_types", ()))


def placement_key(leaf) -> str | None:
    """``"sharded"`` if ``leaf`` is known to be split over devices, else ``None``.

    Known means: readable in the same way from a concrete array, a tracer under
    ``jit`` and a ``jax.ShapeDtypeStruct``, so that a grouped layout comes out
    the same eagerly, under ``jit`` and under ``eval_shape``. That is a
    ``NamedSharding`` on a mesh with ``Explicit`` axes (``jax.make_mesh``'s
    default), whose spec names a mesh axis. On ``Auto`` axes a tracer carries
    no sharding, so neither does the eager answer: such leaves are grouped
    like replicated ones (correct, but resharded each step; use ``Explicit``
    axes or ``layout="per_leaf"`` for sharded params).

    A ``"sharded"`` leaf is never concatenated with another: that would reshard
    it on every step (which is what ``optax.flatten`` does).
    """
    sharding = _traced_sharding(leaf) if _is_tracer(leaf) else getattr(leaf, "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    spec = getattr(sharding, "spec", None)
    if mesh is None or spec is None or not _has_explicit_axes(mesh):
        return None
    return None if all(axis is None for axis in spec) else "sharded"


def _committed_devices(leaf) -> frozenset | None:
    """The devices of a committed concrete JAX array; ``None`` for anything else
    (NumPy, uncommitted arrays, which follow the others, tracers, abstract leaves)."""
    if _is_tracer(leaf) or not isinstance(leaf, jax.Array) or not leaf.committed:
        return None
    return frozenset(leaf.sharding.device_set)


def check_one_device_set(leaves_with_paths) -> None:
    """Raises ``ValueError`` if concrete leaves live on different sets of devices.

    One grouped buffer cannot hold leaves committed to different devices, and
    a single ``jit`` cannot take them either.
    """
    first: tuple[frozenset, str] | None = None
    for path, leaf in leaves_with_paths:
        devices = _committed_devices(leaf)
        if devices is None:
            continue
        if first is None:
            first = (devices, jax.tree_util.keystr(path))
        elif devices != first[0]:
            other_devices, other_path = first
            raise ValueError(
                f"Leaves {other_path} and {jax.tree_util.keystr(path)} live on different "
                f"devices ({sorted(d.id for d in other_devices)} vs "
                f"{sorted(d.id for d in devices)}); the grouped layout concatenates leaves "
                "into shared buffers and cannot span them. Put them on the same devices "
                '(jax.device_put) or use layout="per_leaf".'
            )


def zeros_like_param(param, dtype) -> jax.Array:
    """Zeros of ``param``'s shape in ``dtype``, sharded like ``param``.

    Concrete params: ``zeros_like`` already uses their sharding. Under ``jit``
    the zeros are tied to the param by a select whose predicate is constant
    false, so sharding propagation gives them the param's sharding; XLA folds
    the select away, and no NaN or Inf in the param can leak into the zeros.
    """
    zeros = jnp.zeros_like(param, dtype=dtype)
    if not _is_tracer(param):
        return zeros
    source = param
    if jnp.iscomplexobj(param) and not jnp.issubdtype(dtype, jnp.complexfloating):
        source = jnp.real(param)
    return jnp.where(jnp.zeros_like(param, dtype=bool), source.astype(dtype), zeros)


def zeros_count_like(params) -> jax.Array:
    """A scalar int32 zero (a step count) placed with ``params``.

    When every committed param lives on one set of devices, the count is
    replicated there (on the mesh of a ``NamedSharding``), so that a state
    restored with these shardings feeds a jitted step next to its params (a
    count left on device 0 next to params on a mesh fails with "incompatible
    devices"). Under ``jit``, for uncommitted params, or for params on several
    device sets, it is a plain (uncommitted) ``jnp.zeros``.
    """
    count = jnp.zeros([], jnp.int32)
    leaves = jax.tree.leaves(params)
    if any(_is_tracer(x) for x in leaves):
        return count
    committed = [x for x in leaves if isinstance(x, jax.Array) and x.committed]
    if not committed or len({frozenset(x.sharding.device_set) for x in committed}) != 1:
        return count
    sharding = committed[0].sharding
    if isinstance(sharding, NamedSharding):
        return jax.device_put(count, NamedSharding(sharding.mesh, PartitionSpec()))
    if len(sharding.device_set) == 1:
        return jax.device_put(count, next(iter(sharding.device_set)))
    return count


def state_shardings(tx: optax.GradientTransformation, params: Any) -> Any:
    """The sharding of every leaf of ``tx.init(params)``, found by compiling, not running, it.

    ``params`` may be arrays or ``jax.ShapeDtypeStruct`` with a ``sharding``, so
    the state never has to exist to be laid out::

      shardings = adam_jax.state_shardings(tx, abstract_params)
      opt_state = jax.jit(tx.init, out_shardings=shardings)(params)

    The same tree is the restore target's sharding for orbax checkpoints.
    """
    return jax.jit(tx.init).lower(params).compile().output_shardings


# ----------------------------------------------------------------------------- ZeRO-1


def _spec_entries(spec: PartitionSpec, ndim: int) -> list:
    entries = list(spec) + [None] * (ndim - len(spec))
    return entries[:ndim]


def _axes_of(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple) else (entry,)


def zero_spec(shape: tuple[int, ...], spec: PartitionSpec, mesh: Mesh, axis_name: str):
    """``spec`` with ``axis_name`` added on the first dimension that divides evenly.

    An unsharded dimension is preferred; otherwise ``axis_name`` is appended to
    a sharded one. A leaf already sharded over ``axis_name`` (FSDP) or too small
    to divide (a bias of 10 on 8 devices) keeps ``spec``.
    """
    entries = _spec_entries(spec, len(shape))
    if any(axis_name in _axes_of(e) for e in entries):
        return PartitionSpec(*entries)
    size = mesh.shape[axis_name]
    for d, entry in enumerate(entries):
        if entry is None and shape[d] % size == 0:
            entries[d] = axis_name
            return PartitionSpec(*entries)
    for d, entry in enumerate(entries):
        axes = _axes_of(entry)
        if axes and shape[d] % (size * math.prod(mesh.shape[a] for a in axes)) == 0:
            entries[d] = (*axes, axis_name)
            return PartitionSpec(*entries)
    return PartitionSpec(*entries)


def _param_spec(leaf, path: str, mesh: Mesh, hint: PartitionSpec | None) -> PartitionSpec:
    """The PartitionSpec of a param, read the same way whether ``init`` is traced or not.

    ``Explicit`` axes: from the leaf (its type, when traced). ``Auto`` axes: a
    tracer has no sharding, so the spec is ``hint`` (default replicated) and a
    concrete leaf must agree with it, else eager and traced ``init`` would lay
    out the state differently.
    """
    ndim = jnp.ndim(leaf)
    if _has_explicit_axes(mesh):
        sharding = _traced_sharding(leaf) if _is_tracer(leaf) else getattr(leaf, "sharding", None)
        spec = getattr(sharding, "spec", None)
        return PartitionSpec(*_spec_entries(spec if spec is not None else PartitionSpec(), ndim))
    spec = PartitionSpec(*_spec_entries(hint if hint is not None else PartitionSpec(), ndim))
    sharding = None if _is_tracer(leaf) else getattr(leaf, "sharding", None)
    if sharding is not None and not sharding.is_equivalent_to(NamedSharding(mesh, spec), ndim):
        raise ValueError(
            f"Param {path} has sharding {sharding}, but shard_state expects {spec} on this "
            "mesh with Auto axes. Pass param_specs= (a tree of PartitionSpec like the params) "
            "so that init lays out the state the same way eagerly and under jit/eval_shape."
        )
    return spec


def _constrain(x, mesh: Mesh, spec: PartitionSpec):
    """Puts ``x`` on ``NamedSharding(mesh, spec)``: eagerly, or as a constraint under ``jit``."""
    sharding = NamedSharding(mesh, spec)
    if not _is_tracer(x):
        return jax.device_put(x, sharding)
    if _has_explicit_axes(mesh):
        return jax.sharding.reshard(x, sharding)
    return jax.lax.with_sharding_constraint(x, sharding)


class LeafSpecs(NamedTuple):
    """Static per-leaf placement of a ZeRO-1 state: the param's spec and the moments'."""

    param: PartitionSpec
    state: PartitionSpec


@jax.tree_util.register_pytree_with_keys_class
class ShardedState:
    """State of :func:`shard_state`: the inner state, plus the static specs in aux data."""

    def __init__(
        self, inner: Any, specs: tuple[LeafSpecs, ...], signature: TreeSignature | None = None
    ):
        self.inner = inner
        self.specs = specs
        self.signature = signature

    def tree_flatten_with_keys(self):
        return [(jax.tree_util.GetAttrKey("inner"), self.inner)], (self.specs, self.signature)

    def tree_flatten(self):
        return (self.inner,), (self.specs, self.signature)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(children[0], *aux)

    def __repr__(self) -> str:
        return f"ShardedState(inner={self.inner!r})"


def shard_state(
    tx: optax.GradientTransformation,
    mesh: Mesh,
    axis_name: str,
    *,
    param_specs: Any = None,
) -> optax.GradientTransformation:
    r"""ZeRO-1: partitions ``tx``'s state over the mesh axis ``axis_name``.

    For data parallelism the params are replicated over ``axis_name``; their
    moments need not be. Each moment leaf gets its param's sharding with
    ``axis_name`` added on the first dimension that divides evenly
    (:func:`zero_spec`), so per-device state memory falls by the axis size.
    Each step slices the (all-reduced) gradient and the params to that sharding,
    runs ``tx`` on the shards and gathers the update back to the params'
    sharding. XLA chooses the collectives (see BUILD_NOTES: an all-gather of the
    update per leaf). The math is ``tx``'s, elementwise, so results equal the
    unsharded run to float32 rounding.

    Params sharded over ``axis_name`` already (FSDP) and leaves that do not
    divide keep their sharding. ``tx``'s ``init`` must give state that follows
    its params' sharding, as adam_jax's does.

    The params' shardings are read at ``init``. On a mesh with ``Explicit`` axes
    (``jax.make_mesh``'s default) they are in the arrays' types, traced or not.
    On ``Auto`` axes a traced param has none, so they come from ``param_specs``
    (default: replicated), and concrete params are checked against it.

    Args:
      tx: the transformation whose state to partition, e.g. ``adam_jax.adamw(...)``.
      mesh: the device mesh.
      axis_name: the (data-parallel) axis to partition the state over.
      param_specs: ``Auto`` axes only: a tree like the params of
        ``PartitionSpec`` (``None`` = replicated), e.g. for tensor parallelism.

    Returns:
      A ``GradientTransformation`` with state :class:`ShardedState`.

    References:
      Rajbhandari et al., 2020, ZeRO: Memory Optimizations Toward Training
      Trillion Parameter Models, https://arxiv.org/abs/1910.02054
    """
    if axis_name not in mesh.axis_names:
        raise ValueError(f"axis_name {axis_name!r} is not an axis of the mesh {dict(mesh.shape)}.")

    def hints(params) -> list:
        leaves = jax.tree.leaves(params)
        if param_specs is None:
            return [None] * len(leaves)
        return jax.tree.structure(params).flatten_up_to(param_specs)

    def leaf_specs(params) -> tuple[LeafSpecs, ...]:
        out = []
        with_paths = jax.tree_util.tree_flatten_with_path(params)[0]
        for (path, leaf), hint in zip(with_paths, hints(params), strict=True):
            spec = _param_spec(leaf, jax.tree_util.keystr(path), mesh, hint)
            out.append(LeafSpecs(spec, zero_spec(jnp.shape(leaf), spec, mesh, axis_name)))
        return tuple(out)

    def place(tree, specs, which: str):
        leaves, treedef = jax.tree.flatten(tree)
        if len(leaves) != len(specs):
            raise ValueError(
                f"shard_state: got a tree of {len(leaves)} leaves, but the state was built "
                f"for {len(specs)} params."
            )
        placed = [
            _constrain(x, mesh, getattr(s, which)) for x, s in zip(leaves, specs, strict=True)
        ]
        return treedef.unflatten(placed)

    def init_fn(params):
        specs = leaf_specs(params)
        signature = TreeSignature.of(params, with_paths=True)
        return ShardedState(tx.init(place(params, specs, "state")), specs, signature)

    def update_fn(updates, state: ShardedState, params=None):
        specs = state.specs
        if state.signature is not None:
            name = "the params of the optimizer state"
            match_leaves(updates, state.signature, name="grads", reference_name=name)
            if params is not None:
                match_leaves(params, state.signature, name="params", reference_name=name)
        updates = place(updates, specs, "state")
        if params is not None:
            params = place(params, specs, "state")
        updates, inner = tx.update(updates, state.inner, params)
        return place(updates, specs, "param"), ShardedState(inner, specs, state.signature)

    return optax.GradientTransformation(init_fn, update_fn)
