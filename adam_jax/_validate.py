"""Input checks with clear messages that name the offending leaf path."""

from __future__ import annotations

from typing import Any

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


def check_in_unit_interval(name: str, value) -> None:
    """Raises ``ValueError`` unless ``0 <= value < 1`` (when concrete)."""
    x = _concrete_float(value)
    if x is not None and not 0.0 <= x < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}.")


def check_non_negative(name: str, value) -> None:
    """Raises ``ValueError`` if ``value`` is a concrete negative (or NaN) number."""
    x = _concrete_float(value)
    if x is not None and not x >= 0.0:
        raise ValueError(f"{name} must be >= 0, got {value!r}.")


def check_adam_hyperparams(b1, b2, eps, eps_root) -> None:
    """Validates Adam's hyperparameters at construction time."""
    check_in_unit_interval("b1", b1)
    check_in_unit_interval("b2", b2)
    check_non_negative("eps", eps)
    check_non_negative("eps_root", eps_root)


def _paths(tree) -> dict[str, Any]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(p): leaf for p, leaf in leaves}


def check_same_structure(tree, reference, *, name: str, reference_name: str) -> None:
    """Raises ``ValueError`` naming the first leaf path where two trees differ."""
    if jax.tree.structure(tree) == jax.tree.structure(reference):
        return
    got, want = _paths(tree), _paths(reference)
    missing = [p for p in want if p not in got]
    extra = [p for p in got if p not in want]
    detail = []
    if missing:
        detail.append(f"missing from {name}: {', '.join(missing[:5])}")
    if extra:
        detail.append(f"not in {reference_name}: {', '.join(extra[:5])}")
    if not detail:
        detail.append(
            f"same leaf paths but different node types:\n  {name}: "
            f"{jax.tree.structure(tree)}\n  {reference_name}: {jax.tree.structure(reference)}"
        )
    raise ValueError(
        f"The tree structure of {name} does not match {reference_name}; " + "; ".join(detail)
    )


def check_same_shapes(tree, reference, *, name: str, reference_name: str) -> None:
    """Raises ``ValueError`` naming the leaf path whose shapes differ (no broadcasting)."""
    check_same_structure(tree, reference, name=name, reference_name=reference_name)
    pairs = zip(
        jax.tree_util.tree_flatten_with_path(tree)[0],
        jax.tree.leaves(reference),
        strict=True,
    )
    for (path, leaf), ref in pairs:
        if jnp.shape(leaf) != jnp.shape(ref):
            raise ValueError(
                f"Shape mismatch at leaf {jax.tree_util.keystr(path)}: {name} has shape "
                f"{jnp.shape(leaf)} but {reference_name} has shape {jnp.shape(ref)}."
            )


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
