"""State that moves: a layout-free form, restore targets, and optax interop. No math here.

* :func:`state_to_tree`: the whole optimizer state with every moment params-shaped
  (grouped buffers split, ``shard_state``'s wrapper removed). For the default
  layout it is the state itself, which is optax's.
* :func:`state_from_tree`: such a tree back into the layout, sharding and storage
  dtypes of a ``like`` state (concrete or abstract). The round trip is bitwise.
* :func:`restore_target`: abstract arrays (with shardings) to restore a
  checkpoint into, in the state's own layout or layout-free.
* :func:`from_optax_state` / :func:`to_optax_state`: move the moments and step
  counts between an optax state and an adam_jax state whose chains differ (a
  ``clip_by_global_norm`` in front, a schedule, another layout).

A checkpoint written as ``state_to_tree(state)`` restores on any device count,
with or without ``shard_state``, and into any layout.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adam_jax._layout import GroupedMoments
from adam_jax._sharding import ShardedState
from adam_jax._state import (
    AmsgradState,
    ScheduleState,
    WeightDecaySchedule,
    is_moment_state,
)
from adam_jax._storage import QuantizedArray, decode, decode_tree, encode
from adam_jax._validate import TreeSignature, match_leaves


def _is_wrapper(node: Any) -> bool:
    return isinstance(node, (GroupedMoments, ShardedState, QuantizedArray))


def state_to_tree(opt_state: Any) -> Any:
    """The optimizer state with every moment shaped like its param.

    Works on any chain and nesting (``optax.chain``, ``MultiSteps``,
    ``inject_hyperparams``, ``masked``, :func:`adam_jax.shard_state`):
    :class:`adam_jax.GroupedMoments` become params-shaped trees,
    :class:`adam_jax.QuantizedArray` (``moments="8bit"``/``"4bit"``) become their
    decoded float32 values and :class:`adam_jax.ShardedState` is replaced by its
    inner state. Everything else
    is kept as it is, so for the default layout this is the state itself
    (optax's types). Use it to inspect, log, or save a state that any layout and
    any device count can restore (:func:`state_from_tree`).

    Example:
      >>> import jax.numpy as jnp, adam_jax
      >>> tx = adam_jax.adam(1e-3, layout="grouped")
      >>> state = tx.init({"a": jnp.ones(2), "b": jnp.ones(3)})
      >>> adam_jax.state_to_tree(state)[0].mu["b"].shape
      (3,)
    """

    def convert(node):
        if isinstance(node, GroupedMoments):
            return decode_tree(node.to_tree())
        if isinstance(node, ShardedState):
            return state_to_tree(node.inner)
        return decode(node)

    return jax.tree.map(convert, opt_state, is_leaf=_is_wrapper)


def _abstract_tree_form(like: Any) -> Any:
    """Shapes and dtypes of ``state_to_tree(like)``, without computing it."""
    return jax.eval_shape(state_to_tree, like)


def _placement(like_leaf: Any):
    return getattr(like_leaf, "sharding", None)


def _fit_leaf(x: Any, like_leaf: Any, where: str) -> Any:
    """``x`` with ``like_leaf``'s dtype and placement; shapes must be equal."""
    x_shape, like_shape = tuple(np.shape(x)), tuple(np.shape(like_leaf))
    if x_shape != like_shape:
        raise ValueError(f"Shape mismatch at {where}: got {x_shape}, the state has {like_shape}.")
    want = jnp.dtype(like_leaf.dtype)
    got = jnp.dtype(getattr(x, "dtype", np.asarray(x).dtype))
    if jnp.issubdtype(want, jnp.inexact) != jnp.issubdtype(got, jnp.inexact) or (
        jnp.issubdtype(want, jnp.complexfloating) != jnp.issubdtype(got, jnp.complexfloating)
    ):
        raise ValueError(
            f"Dtype mismatch at {where}: got {got}, the state stores {want} (a float moment "
            "cannot go into an integer count, nor a complex one into a real moment)."
        )
    if not isinstance(x, jax.Array):
        x = np.asarray(x)
    x = jnp.asarray(x).astype(want) if got != want else x
    sharding = _placement(like_leaf)
    if sharding is not None:
        return jax.device_put(x, sharding)
    return jnp.asarray(x)


def _fit_moment(x: Any, like_node: Any, where: str) -> Any:
    """:func:`_fit_leaf`, or for a quantized ``like_node`` the encoding of ``x`` with its
    codec, each array placed like ``like_node``'s."""
    if not isinstance(like_node, QuantizedArray):
        return _fit_leaf(x, like_node, where)
    value = _fit_leaf(x, jax.ShapeDtypeStruct(like_node.shape, jnp.float32), where)
    encoded = encode(value, like_node.codec)
    return jax.tree.map(lambda a, b: _fit_leaf(a, b, where), encoded, like_node)


def state_from_tree(tree: Any, like: Any) -> Any:
    """Puts a layout-free ``tree`` (from :func:`state_to_tree`) into ``like``'s form.

    ``like`` is an optimizer state (concrete, or abstract from
    :func:`restore_target` / ``jax.eval_shape``) of the transformation to continue
    with: its layout (grouped buffers), ``shard_state`` wrapper, shardings and
    storage dtypes are applied to ``tree``'s values; quantized moments are
    encoded with ``like``'s codecs (encoding the decoded values of a state
    reproduces its codes and scales bitwise). The structure of ``tree`` must be
    ``state_to_tree(like)``'s.

    Raises:
      ValueError: naming the leaf path where ``tree`` does not fit ``like``
        (structure, shape, or an integer/float or real/complex mismatch).
        Nothing is broadcast or reordered.
    """
    expected = _abstract_tree_form(like)
    match_leaves(
        tree,
        TreeSignature.of(expected, with_paths=True),
        name="the state tree",
        reference_name="the target state",
    )

    def convert(path, like_node, tree_node):
        where = jax.tree_util.keystr(path)
        if isinstance(like_node, GroupedMoments):
            plan = like_node.plan
            leaves = plan.check_leaves(
                tree_node, name=f"{where} (tree)", reference_name=f"{where} (state)"
            )
            buffers = plan.gather([jnp.asarray(x) for x in leaves])
            fitted = [
                _fit_moment(b, lb, f"{where} buffer {i}")
                for i, (b, lb) in enumerate(zip(buffers, like_node.buffers, strict=True))
            ]
            return GroupedMoments(fitted, plan)
        if isinstance(like_node, ShardedState):
            return ShardedState(
                state_from_tree(tree_node, like_node.inner), like_node.specs, like_node.signature
            )
        return _fit_moment(tree_node, like_node, where)

    return jax.tree_util.tree_map_with_path(convert, like, tree, is_leaf=_is_wrapper)


def restore_target(
    tx: optax.GradientTransformation, params: Any, *, layout_free: bool = False
) -> Any:
    """Abstract state (``jax.ShapeDtypeStruct`` with shardings) to restore a checkpoint into.

    ``params`` may be arrays or ``ShapeDtypeStruct`` with shardings. The state
    is laid out by compiling, not running, ``tx.init``. With ``layout_free=True``
    the target is that of ``state_to_tree(state)``: the documented way to save
    a state that restores on any device count and into any layout::

      orbax_ckpt.save(path, adam_jax.state_to_tree(state))
      ...
      target = adam_jax.restore_target(tx, params, layout_free=True)
      tree = orbax_ckpt.restore(path, target)
      state = adam_jax.state_from_tree(tree, like=adam_jax.restore_target(tx, params))
    """

    def init(p):
        state = tx.init(p)
        return state_to_tree(state) if layout_free else state

    compiled = jax.jit(init).lower(params).compile()
    abstract = jax.eval_shape(init, params)
    shardings = compiled.output_shardings
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )


# ----------------------------------------------------------------------------- transplant

_SCHEDULE_TYPES = (ScheduleState, WeightDecaySchedule, optax.ScaleByScheduleState)


def _is_node_of_interest(node: Any) -> bool:
    return is_moment_state(node) or isinstance(node, _SCHEDULE_TYPES)


def _nodes(tree: Any, predicate: Callable[[Any], bool]) -> list:
    return [n for n in jax.tree.leaves(tree, is_leaf=_is_node_of_interest) if predicate(n)]


def transplant_state(source: Any, like: Any, *, source_name: str = "source") -> Any:
    """``like`` with its moments and step counts taken from ``source``.

    Both are optimizer states of Adam-family chains (optax's or adam_jax's, in
    any layout). The Adam/AMSGrad states are paired in order and must agree in
    number and kind; each schedule count of ``like`` takes the matching
    schedule count of ``source`` when both have the same number of them, else
    the Adam step count (one schedule step per update). Everything else (empty
    states, masks, clipping) is ``like``'s own. The moments go into ``like``'s
    layout, shardings and dtypes (:func:`state_from_tree`).
    """
    src = state_to_tree(source)
    target_tree = jax.eval_shape(state_to_tree, like)
    src_moments = _nodes(src, is_moment_state)
    dst_moments = _nodes(target_tree, is_moment_state)
    if len(src_moments) != len(dst_moments) or not dst_moments:
        raise ValueError(
            f"The {source_name} state has {len(src_moments)} Adam/AMSGrad states and the target "
            f"has {len(dst_moments)}; they must correspond one to one."
        )
    for i, (s, d) in enumerate(zip(src_moments, dst_moments, strict=True)):
        if isinstance(s, AmsgradState) != isinstance(d, AmsgradState):
            kinds = [type(x).__name__ for x in (s, d)]
            raise ValueError(
                f"Adam state {i}: the {source_name} state is a {kinds[0]}, the target a "
                f"{kinds[1]}; AMSGrad's running maximum cannot be made up or dropped."
            )
    src_schedules = _nodes(src, lambda n: isinstance(n, _SCHEDULE_TYPES))
    dst_schedules = _nodes(target_tree, lambda n: isinstance(n, _SCHEDULE_TYPES))
    adam_count = src_moments[0].count
    moments = iter(src_moments)
    schedules = iter(src_schedules if len(src_schedules) == len(dst_schedules) else [])

    def replace(node):
        if is_moment_state(node):
            return next(moments)
        if isinstance(node, _SCHEDULE_TYPES):
            source_node = next(schedules, None)
            count = adam_count if source_node is None else source_node.count
            return type(node)(count=count)
        return node

    # Rebuild like's layout-free tree with the source's moment nodes, keeping
    # like's own values elsewhere (zeros where like is abstract).
    abstract = any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(like))
    like_tree = target_tree if abstract else state_to_tree(like)
    new_tree = jax.tree.map(replace, like_tree, is_leaf=_is_node_of_interest)
    new_tree = jax.tree.map(
        lambda x: jnp.zeros(x.shape, x.dtype) if isinstance(x, jax.ShapeDtypeStruct) else x,
        new_tree,
    )
    return state_from_tree(new_tree, like)


def from_optax_state(optax_state: Any, like: Any) -> Any:
    """An adam_jax state (shaped like ``like``) continuing from an optax state.

    ``optax_state`` comes from an optax Adam-family chain (``optax.adam``,
    ``optax.adamw``, ``optax.chain(optax.clip_by_global_norm(1.0),
    optax.adamw(...))``, ...); ``like`` is the adam_jax state to continue with, in
    any layout, with or without ``shard_state``. The Adam moments and counts
    move over (see :func:`transplant_state`); a run continued across the switch
    equals an uninterrupted one to float32 rounding.

    For identical chains (``adam_jax.adamw`` and ``optax.adamw`` with the same
    arguments, default layout) the states are the same types and need no
    conversion at all.
    """
    return transplant_state(optax_state, like, source_name="optax")


def to_optax_state(opt_state: Any, like: Any) -> Any:
    """An optax state (shaped like ``like``) continuing from an adam_jax state.

    The reverse of :func:`from_optax_state`: ``like`` is ``optax_tx.init(params)``
    (or its abstract form), ``opt_state`` any adam_jax state.
    """
    return transplant_state(opt_state, like, source_name="adam_jax")
