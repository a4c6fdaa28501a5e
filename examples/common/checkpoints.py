"""Orbax checkpoints of a train state whose optimizer state is saved layout-free.

A checkpoint holds ``{"params", "opt_state", ...}`` with the optimizer state passed
through :func:`adam_jax.state_to_tree` (every moment shaped like its param, quantized
moments decoded, no ``shard_state`` wrapper), gathered to NumPy, plus a JSON record
(``meta``) of the run's settings and history. It restores on any device count, with or
without ZeRO-1, into either layout, and across ``adam_jax``/``optax``
(:func:`continue_state`).

``--out`` handling is shared too: a fresh run refuses to replace an earlier run's
outputs unless told to (:func:`check_out`).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp

import adam_jax

from .errors import ResumeError, SetupError

CHECKPOINTS = "checkpoints"  # directory in --out


def checkpoint_manager(directory: Path, keep: int) -> ocp.CheckpointManager:
    """An orbax manager keeping the last ``keep`` checkpoints under ``directory``."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    return ocp.CheckpointManager(Path(directory).resolve(), options=options)


def check_out(out: Path, outputs: tuple[str, ...], *, resume: bool, overwrite: bool) -> None:
    """Checks ``out`` before any work; changes nothing on disk.

    A fresh run refuses an ``out`` holding any of ``outputs`` (names in ``out``) unless
    ``overwrite``; a resumed run needs a checkpoint there.

    Raises:
      SetupError: ``out`` is not a directory, or holds an earlier run's outputs.
      ResumeError: ``resume`` without a checkpoint.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SetupError(f"--out {out}: not a directory")
    ckpt_dir = out / CHECKPOINTS
    if resume:
        if not (ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir())):
            raise ResumeError(f"--resume: no checkpoint found in {ckpt_dir}")
        return
    earlier = [n for n in outputs if (out / n).exists()]
    if earlier and not overwrite:
        raise SetupError(
            f"--out {out} holds the outputs of an earlier run ({', '.join(earlier)}): "
            "continue it with --resume, replace it with --overwrite, or choose another --out"
        )


def open_checkpoints(out: Path, keep: int, *, resume: bool) -> ocp.CheckpointManager:
    """Creates ``out``; a fresh run removes the checkpoints there first (see check_out)."""
    out = Path(out)
    ckpt_dir = out / CHECKPOINTS
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not resume and ckpt_dir.exists():
            shutil.rmtree(ckpt_dir)
    except OSError as err:
        raise SetupError(f"--out {out}: {err}") from err
    return checkpoint_manager(ckpt_dir, keep)


def payload(parts: dict[str, Any]) -> dict[str, Any]:
    """``parts`` with ``opt_state`` layout-free, every array gathered to the host as NumPy.

    NumPy arrays are cheaper to write than sharded ones, which orbax slices with a
    compiled op per shape.
    """
    tree = {**parts, "opt_state": adam_jax.state_to_tree(parts["opt_state"])}
    return jax.tree.map(np.array, tree)


def save(manager: ocp.CheckpointManager, step: int, parts: dict, meta: dict) -> None:
    """Saves ``parts`` (see :func:`payload`) and the JSON ``meta`` as checkpoint ``step``.

    Asynchronous: orbax finishes the write in the background.
    """
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(payload(parts)), meta=ocp.args.JsonSave(meta)
    )
    manager.save(step, args=args)


def latest(manager: ocp.CheckpointManager) -> int:
    """The latest checkpoint's step; ResumeError if there is none."""
    step = manager.latest_step()
    if step is None:
        raise ResumeError(f"--resume: no checkpoint found in {manager.directory}")
    return step


def restore_meta(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    """The JSON record saved with checkpoint ``step``."""
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta


def abstract(tree: Any) -> Any:
    """Shapes, dtypes and shardings of ``tree``'s arrays: where orbax restores them."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def restore_arrays(manager: ocp.CheckpointManager, step: int, target: Any) -> Any:
    """The arrays of checkpoint ``step``, restored into ``target``'s tree and placement."""
    args = ocp.args.Composite(state=ocp.args.StandardRestore(target))
    return manager.restore(step, args=args).state


def opt_state_target(saved_tx: optax.GradientTransformation, params: Any) -> Any:
    """Where a layout-free optimizer state written with ``saved_tx`` is restored to."""
    return adam_jax.restore_target(saved_tx, params, layout_free=True)


def continue_state(tree: Any, saved_optimizer: str, optimizer: str, like: Any) -> Any:
    """The layout-free optimizer state ``tree`` of ``saved_optimizer`` in the form of ``like``.

    ``like`` is this run's optimizer state (``optimizer``'s, in its layout, storage and
    placement). Across ``"adam_jax"`` and ``"optax"`` the Adam moments and step counts move
    over: the two then continue to float32 rounding of each other.
    """
    if saved_optimizer == optimizer:
        return adam_jax.state_from_tree(tree, like=like)
    if saved_optimizer == "optax":
        return adam_jax.from_optax_state(tree, like=like)
    return adam_jax.to_optax_state(tree, like=like)


def setting_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"name: checkpoint <saved>, now <current>"`` for every setting that differs."""
    return [
        f"{k}: checkpoint {saved.get(k)!r}, now {v!r}"
        for k, v in current.items()
        if saved.get(k) != v
    ]


def check_resumable(saved: dict, current: dict, where: Path, changeable: tuple = ()) -> None:
    """Raises ResumeError naming every setting that differs from the checkpoint's.

    Settings named in ``changeable`` may differ (the state is converted for this run).
    """
    current = {k: v for k, v in current.items() if k not in changeable}
    diffs = setting_differences(saved, current)
    if diffs:
        raise ResumeError(
            f"--resume: the checkpoint in {where} was trained with other settings, so the "
            f"run could not match an uninterrupted one ({'; '.join(diffs)})"
        )
