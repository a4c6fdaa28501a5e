"""Input checks with clear messages that name the offending leaf path."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def _concrete_float(x) -> float | None:
    """``float(x)`` for a concrete number, ``None`` for tracers and schedules."""
    if callable(x) or isinstance(x, jax.core.Tracer):
        return None
    try:
        return float(np.asarray(x))
    except (TypeError, ValueError):
        return None


def check_scalar_hyperparameter(name: str, value, *, schedule_ok: bool = False) -> None:
    """Raises unless ``value`` is one real number (or, if ``schedule_ok``, a schedule).

    Accepted: Python ``int``/``float``, NumPy scalars and 0-d arrays, 0-d JAX
    arrays and tracers (``optax.inject_hyperparams`` passes those), of a real
    floating or integer dtype. A shaped value would broadcast the update into
    the wrong shape or mix hyperparameters across elements, so it is an error.

    Raises:
      TypeError: ``value`` is a bool, string, ``None``, list, complex, or a
        callable where no schedule is allowed.
      ValueError: ``value`` is an array with a shape other than ``()``.
    """
    if callable(value) and not isinstance(value, (jax.Array, np.ndarray)):
        if schedule_ok:
            return
        raise TypeError(f"{name} must be a number, not a schedule or callable; got {value!r}.")
    kind = "a number or an optax schedule" if schedule_ok else "a number"
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be {kind}, got the bool {value!r}.")
    if isinstance(value, (int, float)):
        return
    dtype = getattr(value, "dtype", None)
    if dtype is None or not hasattr(value, "shape"):
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__} {value!r}.")
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
        raise TypeError(f"{name} must be a real number, got dtype {dtype}.")
    if tuple(np.shape(value)) != ():
        raise ValueError(
            f"{name} must be a scalar, got an array of shape {tuple(np.shape(value))}; "
            "one value applies to every element of every leaf."
        )


def check_static_bool(name: str, value) -> None:
    """Raises ``TypeError`` unless ``value`` is a Python (or NumPy) bool.

    Flags choose the program's structure, so they cannot be traced values.
    """
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a Python bool, got {type(value).__name__} {value!r}.")


def check_storage_dtype(name: str, dtype) -> None:
    """Raises ``TypeError`` unless ``dtype`` is ``None`` or a floating/complex dtype."""
    if dtype is None:
        return
    try:
        canonical = jnp.dtype(dtype)
    except TypeError as err:
        raise TypeError(f"{name} must be a floating dtype or None, got {dtype!r}.") from err
    if not jnp.issubdtype(canonical, jnp.inexact):
        raise TypeError(
            f"{name} must be a floating (or complex) dtype or None, got {canonical}: moments "
            "stored in an integer or bool dtype would be truncated every step."
        )


def check_in_unit_interval(name: str, value) -> None:
    """Raises ``ValueError`` unless ``0 <= value < 1`` (when concrete)."""
    check_scalar_hyperparameter(name, value)
    x = _concrete_float(value)
    if x is not None and not 0.0 <= x < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}.")


def check_non_negative(name: str, value, *, schedule_ok: bool = False) -> None:
    """Raises ``ValueError`` if ``value`` is a concrete negative, NaN or infinite number."""
    check_scalar_hyperparameter(name, value, schedule_ok=schedule_ok)
    x = _concrete_float(value)
    if x is not None and not 0.0 <= x < np.inf:
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}.")


def check_adam_hyperparams(b1, b2, eps, eps_root) -> None:
    """Validates Adam's hyperparameters at construction time."""
    check_in_unit_interval("b1", b1)
    check_in_unit_interval("b2", b2)
    check_non_negative("eps", eps)
    check_non_negative("eps_root", eps_root)


def _normalized_key(path) -> str:
    """``keystr`` of a leaf path without a trailing ``.value``: a leaf wrapper such as
    ``nnx.Param`` (whose only child is ``.value``) and its bare array have one path."""
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        path = path[:-1]
    return jax.tree_util.keystr(tuple(path))


def leaf_paths(tree) -> tuple[str, ...]:
    """The normalized path of every leaf of ``tree``, in flatten order."""
    return tuple(_normalized_key(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0])


class TreeSignature(NamedTuple):
    """What a tree must look like to match another: structure, leaf shapes, leaf paths.

    ``paths`` may be ``None`` only in a signature built on the fly from a tree
    (:func:`match_leaves` then computes them from the tree when the structures
    differ; when they are equal the paths are too, and a string per leaf is
    saved).
    """

    treedef: Any
    shapes: tuple[tuple[int, ...], ...]
    paths: tuple[str, ...] | None = None

    @classmethod
    def of(cls, tree, *, with_paths: bool = False) -> TreeSignature:
        leaves, treedef = jax.tree.flatten(tree)
        shapes = tuple(tuple(np.shape(x)) for x in leaves)
        return cls(treedef, shapes, leaf_paths(tree) if with_paths else None)


def match_leaves(tree, reference, *, name: str, reference_name: str) -> list:
    """The leaves of ``tree`` (flatten order), after checking them against ``reference``.

    ``reference`` is a tree or a :class:`TreeSignature`. The check is the same
    in every layout: the tree structure must be equal, or else the leaf paths
    must be, up to leaf wrappers (``nnx.Param`` in the state, bare arrays in
    the gradients); and each leaf's shape must equal the reference's exactly
    (no broadcasting).

    Raises:
      ValueError: naming the missing and extra leaf paths, or the first leaf
        whose shape differs.
    """
    ref = reference if isinstance(reference, TreeSignature) else TreeSignature.of(reference)
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
    leaves = [leaf for _, leaf in with_paths]
    if treedef != ref.treedef:
        got = tuple(_normalized_key(p) for p, _ in with_paths)
        want = ref.paths if ref.paths is not None else leaf_paths(reference)
        if got != want:
            raise ValueError(_structure_message(got, want, name, reference_name))
    for (path, leaf), shape in zip(with_paths, ref.shapes, strict=True):
        if tuple(np.shape(leaf)) != shape:
            raise ValueError(
                f"Shape mismatch at leaf {_normalized_key(path)}: {name} has shape "
                f"{tuple(np.shape(leaf))} but {reference_name} has shape {shape}."
            )
    return leaves


def _structure_message(got, want, name: str, reference_name: str) -> str:
    missing = [p for p in want if p not in set(got)]
    extra = [p for p in got if p not in set(want)]
    detail = []
    if missing:
        detail.append(f"missing from {name}: {', '.join(missing[:5])}")
    if extra:
        detail.append(f"not in {reference_name}: {', '.join(extra[:5])}")
    if not detail:
        detail.append(
            f"same leaf paths in another order or under other node types ({name}: "
            f"{', '.join(got[:5])}; {reference_name}: {', '.join(want[:5])})"
        )
    return f"The tree structure of {name} does not match {reference_name}; " + "; ".join(detail)


def check_inexact_leaves(tree, *, name: str) -> None:
    """Raises ``TypeError`` naming the first leaf that is not floating or complex."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.inexact):
            raise TypeError(
                f"{name} leaf {jax.tree_util.keystr(path)} has dtype {dtype}; the Adam family "
                "needs floating or complex leaves. Keep integer/bool arrays out of the "
                "optimized tree (e.g. nnx.Optimizer(..., wrt=nnx.Param) or optax.masked)."
            )
