"""Training, evaluation and sampling for the byte-level language model, importable and testable.

The whole run is a pure function of ``(Config, corpus)``. The params come from
``seed``; the training windows of micro-step ``i`` are drawn inside the jitted step from
``fold_in(data_key, i)``; nothing depends on process history, so a run resumed from the
checkpoint of step ``k`` ends bitwise equal to an uninterrupted one.

The train state is ``TrainState(params, opt_state)``: ``params`` is the model's
``nnx.Param`` state as a pure dict (or, with ``--packed``, the flat buffers of an
``adam_jax.ParamPacker``), merged into the module inside the jitted loss. The
optimizer is one optax chain: ``clip_by_global_norm``, ``adamw`` (adam_jax or optax),
then ``kahan_summation`` or ``stochastic_rounding`` last, wrapped in ``optax.MultiSteps``
for ``--accum`` and in ``adam_jax.shard_state`` for ``--zero1``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from common import checkpoints, parallel
from common.errors import DivergedError, ResumeError, RunError, SetupError
from common.plotting import Panel, Series, peak_rss_bytes, plot_panels, write_json
from common.progress import Progress, log
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import adam_jax

from .config import RESUMABLE_CHANGES, Config
from .data import Corpus, DataError, check_size, limit, load_corpus, val_windows
from .model import CharTransformer

__all__ = ["DataError", "ResumeError", "RunError", "SetupError", "train_and_evaluate"]

LOG_EVERY = 10  # steps per point of the train-loss curve (and per progress-bar refresh);
# an evaluation step adds a point too (the mean since the previous point)
OUTPUTS = (checkpoints.CHECKPOINTS, "metrics.json", "curves.png")  # what a run writes
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
DATA_FIELDS = ("data", "data_limit")  # what the data is; the compiled steps do not depend on it


class TrainState(NamedTuple):
    """Params (a pure dict, or packed buffers) and the optimizer state over them."""

    params: Any
    opt_state: Any


class Result(NamedTuple):
    """What a run returns: the final validation loss, the curves, the sample, the params."""

    val_loss: float
    history: dict[str, Any]
    sample: bytes
    params: Any  # a nested dict of NumPy arrays (unpacked)
    wall_time_s: float


# ----------------------------------------------------------------------------- optimizer


def decays(path: tuple, leaf: Any = None) -> bool:
    """Weight decay on the Linear kernels only: not embeddings, norms or biases."""
    return getattr(path[-1], "key", None) == "kernel"


def decay_mask(params: Any) -> Any:
    """A tree of bools: which leaves of ``params`` decay (:func:`decays`)."""
    return jax.tree_util.tree_map_with_path(decays, params)


def make_schedule(cfg: Config) -> optax.Schedule:
    """Linear warmup to ``lr``, then cosine decay to ``lr * final_lr_fraction``."""
    return optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, cfg.warmup_steps, cfg.steps, end_value=cfg.lr * cfg.final_lr_fraction
    )


def make_optimizer(cfg: Config, mask: Any, mesh: Any = None) -> optax.GradientTransformation:
    """``chain(clip, adamw[, kahan | stochastic rounding])``, accumulated and sharded as asked.

    ``mask`` selects the leaves that decay (:func:`decay_mask`, or one flag per packed
    buffer). The low-precision transform goes last in the chain, after the learning rate:
    it chooses the update that lands the bfloat16 param on its compensated or
    stochastically rounded value.
    """
    hyper = {"b1": cfg.b1, "b2": cfg.b2, "eps": 1e-8, "weight_decay": cfg.weight_decay}
    schedule = make_schedule(cfg)
    if cfg.optimizer == "optax":
        adamw = optax.adamw(schedule, mask=mask, **hyper)
    else:
        moments = None if cfg.moments == "fp32" else cfg.moments
        adamw = adam_jax.adamw(schedule, mask=mask, moments=moments, layout=cfg.layout, **hyper)
    parts = [optax.clip_by_global_norm(cfg.clip_norm), adamw]
    if cfg.kahan:
        parts.append(adam_jax.kahan_summation())
    if cfg.stochastic_rounding:
        key = jax.random.fold_in(jax.random.key(cfg.seed), 3)
        parts.append(adam_jax.stochastic_rounding(key))
    tx = optax.chain(*parts)
    if cfg.accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.accum).gradient_transformation()
    return adam_jax.shard_state(tx, mesh, "data") if cfg.zero1 else tx


# ----------------------------------------------------------------------------- the model


class Setup(NamedTuple):
    """What the jitted functions close over: the module's structure, the packer, the optimizer."""

    graphdef: nnx.GraphDef
    rest: nnx.State  # the module's non-Param state (empty)
    packer: adam_jax.ParamPacker | None
    tx: optax.GradientTransformation
    mask: Any
    mesh: Any
    n_params: int


class Compiled(NamedTuple):
    """A setup and its jitted functions, shared by every run of the same settings."""

    setup: Setup
    init: Callable[[jax.Array], TrainState]  # init_key -> the initial state
    step: Callable[..., tuple[TrainState, jax.Array]]  # see train_step (state donated)
    eval: Callable[..., jax.Array]  # see eval_step
    generators: dict  # (length, temperature) -> jitted generate, filled on demand


def create_model(cfg: Config, init_key: jax.Array) -> CharTransformer:
    """The transformer initialised from ``init_key``, params in ``cfg.param_dtype``."""
    return CharTransformer(
        d_model=cfg.d_model,
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        d_mlp=cfg.d_mlp,
        context=cfg.context,
        param_dtype=DTYPES[cfg.param_dtype],
        rngs=nnx.Rngs(params=init_key),
    )


def init_params(cfg: Config, packer: adam_jax.ParamPacker | None, init_key: jax.Array) -> Any:
    """The initial params as a pure dict (packed into buffers with a ``packer``)."""
    params = nnx.to_pure_dict(nnx.state(create_model(cfg, init_key), nnx.Param))
    return params if packer is None else packer.pack(params)


def init_state(cfg: Config, setup: Setup, init_key: jax.Array) -> TrainState:
    """The initial train state (jit it: one compilation instead of one per leaf shape).

    With a mesh the params are replicated over it, and the optimizer state follows them
    (partitioned by ``adam_jax.shard_state`` with ``--zero1``).
    """
    params = init_params(cfg, setup.packer, init_key)
    if setup.mesh is not None:
        params = jax.lax.with_sharding_constraint(
            params, NamedSharding(setup.mesh, PartitionSpec())
        )
    return TrainState(params, setup.tx.init(params))


def compile_key(cfg: Config) -> tuple:
    """The settings a :class:`Compiled` depends on (the data's are not among them)."""
    return tuple(sorted((k, v) for k, v in cfg.trajectory().items() if k not in DATA_FIELDS))


@functools.lru_cache(maxsize=8)
def _build(key: tuple) -> Compiled:
    cfg = Config(**dict(key))
    try:
        mesh = parallel.data_mesh(cfg.devices)
    except ValueError as err:
        raise SetupError(str(err)) from err
    abstract = nnx.eval_shape(lambda: create_model(cfg, jax.random.key(0)))
    graphdef, param_state, rest = nnx.split(abstract, nnx.Param, ...)
    params = nnx.to_pure_dict(param_state)
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    packer = None
    mask = decay_mask(params)
    if cfg.packed:
        packer = adam_jax.ParamPacker(params, group_fn=lambda path, leaf: decays(path))
        mask = packer.pack_mask(mask)  # one flag per buffer: a mask by name sees no names
    tx = make_optimizer(cfg, mask, mesh)
    setup = Setup(graphdef, rest, packer, tx, mask, mesh, n_params)
    jit = partial(jax.jit, compiler_options=compiler_options(cfg))
    return Compiled(
        setup,
        jit(partial(init_state, cfg, setup)),
        jit(partial(train_step, setup, cfg.batch_size, cfg.context), donate_argnums=(0,)),
        jit(partial(eval_step, setup)),
        {},
    )


def compiler_options(cfg: Config) -> dict | None:
    """XLA options for every jitted function: ``quick_compile`` skips backend optimization
    (CPU compilation 2.5x faster, steps slower: for short runs such as the tests)."""
    return {"xla_backend_optimization_level": 0} if cfg.quick_compile else None


def build(cfg: Config) -> Compiled:
    """The setup and jitted functions for ``cfg``; runs of the same settings share them
    (and their compilations) within a process."""
    return _build(compile_key(cfg))


def create(cfg: Config, init_key: jax.Array) -> tuple[Compiled, TrainState]:
    """The compiled functions for ``cfg`` and the initial state from ``init_key``."""
    run = build(cfg)
    return run, run.init(init_key)


def module(setup: Setup, params: Any) -> CharTransformer:
    """The transformer with ``params`` (unpacked first when packed); inside jit too."""
    if setup.packer is not None:
        params = setup.packer.unpack(params)
    return nnx.merge(setup.graphdef, params, setup.rest)


def unpacked(setup: Setup, params: Any) -> Any:
    """``params`` as the module's pure dict."""
    return params if setup.packer is None else setup.packer.unpack(params)


# ----------------------------------------------------------------------------- steps


def next_byte_loss(model: CharTransformer, windows: jax.Array) -> jax.Array:
    """Per-byte cross-entropy (nats) of predicting ``windows[:, 1:]`` from what precedes."""
    windows = windows.astype(jnp.int32)
    logits = model(windows[:, :-1]).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:])


def sample_windows(train: jax.Array, key: jax.Array, batch: int, length: int) -> jax.Array:
    """``batch`` windows of ``length`` bytes at random starts in ``train`` (inside jit)."""
    starts = jax.random.randint(key, (batch,), 0, train.shape[0] - length + 1)
    return train[starts[:, None] + jnp.arange(length)]


def train_step(
    setup: Setup,
    batch: int,
    context: int,
    state: TrainState,
    train: jax.Array,
    data_key: jax.Array,
    micro_step: jax.Array,
) -> tuple[TrainState, jax.Array]:
    """One micro-step: the windows of ``micro_step``, the gradient, the optimizer update.

    With ``--accum N`` the optimizer (``optax.MultiSteps``) applies the mean gradient of N
    micro-steps every N-th call and returns zero updates on the others.
    """
    windows = sample_windows(train, jax.random.fold_in(data_key, micro_step), batch, context + 1)
    windows = parallel.split_batch(windows, setup.mesh)

    def loss_fn(params):
        return next_byte_loss(module(setup, params), windows).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = setup.tx.update(grads, state.opt_state, state.params)
    return TrainState(optax.apply_updates(state.params, updates), opt_state), loss


def eval_step(setup: Setup, params: Any, windows: jax.Array, weights: jax.Array) -> jax.Array:
    """Summed per-byte loss of the windows with weight 1 (padding has weight 0)."""
    windows = parallel.split_batch(windows, setup.mesh)
    losses = next_byte_loss(module(setup, params), windows)
    return jnp.sum(losses.sum(axis=1) * parallel.split_batch(weights, setup.mesh))


def evaluate(eval_fn: Callable, params: Any, windows: np.ndarray, batch: int) -> float:
    """Mean loss in nats per byte over all ``windows``; the last batch is padded."""
    n = windows.shape[0]
    pad = -n % batch
    padded = np.concatenate([windows, np.zeros((pad, windows.shape[1]), windows.dtype)])
    weights = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
    total = 0.0
    for i in range(0, n + pad, batch):
        total += float(eval_fn(params, padded[i : i + batch], weights[i : i + batch]))
    return total / (n * (windows.shape[1] - 1))


def generate(
    setup: Setup,
    context: int,
    length: int,
    temperature: float,
    params: Any,
    prompt: jax.Array,
    key: jax.Array,
) -> jax.Array:
    """``prompt`` followed by ``length`` sampled bytes (jit with the first four static).

    Each byte is sampled from the model's distribution at ``temperature`` given the last
    ``context`` bytes, with the key ``fold_in(key, i)`` for the ``i``-th: the same key
    gives the same bytes.
    """
    model = module(setup, params)
    p = prompt.shape[0]
    buf = jnp.zeros(max(p + length, context), jnp.int32).at[:p].set(prompt)

    def body(i, buf):
        pos = p + i  # bytes known so far
        start = jnp.maximum(pos - context, 0)
        window = jax.lax.dynamic_slice(buf, (start,), (context,))
        logits = model(window[None])[0, pos - 1 - start].astype(jnp.float32)
        byte = jax.random.categorical(jax.random.fold_in(key, i), logits / temperature)
        return buf.at[pos].set(byte.astype(jnp.int32))

    return jax.lax.fori_loop(0, length, body, buf)[: p + length]


def sample_text(run: Compiled, cfg: Config, params: Any, key: jax.Array) -> bytes:
    """``cfg.sample_bytes`` bytes generated after ``cfg.prompt`` (the prompt included).

    Sampling runs on one device (a mesh would repeat it on every device).
    """
    spec = (cfg.sample_bytes, cfg.temperature)
    if spec not in run.generators:
        local = run.setup._replace(mesh=None)
        fn = partial(generate, local, cfg.context, *spec)
        run.generators[spec] = jax.jit(fn, compiler_options=compiler_options(cfg))
    params = jax.device_put(params, jax.devices()[0])
    prompt = jnp.asarray(np.frombuffer(cfg.prompt.encode(), np.uint8).astype(np.int32))
    return bytes(np.asarray(run.generators[spec](params, prompt, key)).astype(np.uint8).tolist())


# ----------------------------------------------------------------------------- checkpoints


def settings(cfg: Config) -> dict[str, Any]:
    """The settings a resumed run may change (recorded in each checkpoint)."""
    return {k: getattr(cfg, k) for k in RESUMABLE_CHANGES}


def save(manager, step: int, state: TrainState, cfg: Config, history: dict) -> None:
    parts = {"params": state.params, "opt_state": state.opt_state, "step": np.int32(step)}
    meta = {"config": cfg.trajectory(), "settings": settings(cfg), "history": history}
    checkpoints.save(manager, step, parts, meta)


def restore(manager, cfg: Config, setup: Setup, state: TrainState) -> tuple[TrainState, int, dict]:
    """The latest checkpoint, restored into this run's state: (state, step, history).

    The layout-free optimizer state is read into this run's placement and converted to
    its layout, storage and optimizer (:func:`common.checkpoints.continue_state`).
    """
    step = checkpoints.latest(manager)
    meta = checkpoints.restore_meta(manager, step)
    checkpoints.check_resumable(
        meta["config"], cfg.trajectory(), manager.directory, RESUMABLE_CHANGES
    )
    saved = meta["settings"]
    saved_cfg = dataclasses.replace(
        cfg, optimizer=saved["optimizer"], layout="per_leaf", devices=1, zero1=False
    )
    saved_tx = make_optimizer(saved_cfg, setup.mask)
    target = {
        "params": checkpoints.abstract(state.params),
        "opt_state": checkpoints.opt_state_target(saved_tx, state.params),
        "step": np.asarray(0, np.int32),
    }
    tree = checkpoints.restore_arrays(manager, step, target)
    opt_state = checkpoints.continue_state(
        tree["opt_state"], saved["optimizer"], cfg.optimizer, state.opt_state
    )
    restored = parallel.place_like(TrainState(tree["params"], opt_state), state)
    changed = checkpoints.setting_differences(saved, settings(cfg))
    other = f", into other settings ({'; '.join(changed)})" if changed else ""
    log(f"resumed from {manager.directory} at step {int(tree['step'])}/{cfg.steps}{other}")
    return restored, int(tree["step"]), meta["history"]


# ----------------------------------------------------------------------------- outputs


def state_bytes(tree: Any) -> int:
    """Bytes of all arrays in ``tree`` (global sizes, not per device)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def describe_run(cfg: Config, corpus: Corpus, setup: Setup, state: TrainState) -> list:
    """The header lines printed before training."""
    n = setup.n_params
    name = "adam_jax.adamw" if cfg.optimizer == "adam_jax" else "optax.adamw"
    extras = (
        [f"moments {cfg.moments}", f"layout {cfg.layout}"] if cfg.optimizer == "adam_jax" else []
    )
    extras += ["kahan_summation"] * cfg.kahan + ["stochastic_rounding"] * cfg.stochastic_rounding
    extras += [f"MultiSteps({cfg.accum})"] * (cfg.accum > 1)
    tokens = cfg.steps * cfg.tokens_per_step
    packed = []
    if setup.packer is not None:
        sizes = [f"{b.size:,} {b.dtype}" for b in state.params]
        packed = [f"packed params (adam_jax.ParamPacker): {len(sizes)} buffers: {', '.join(sizes)}"]
    return [
        f"data: {corpus.description}",
        f"model: decoder-only transformer, pre-norm, d_model {cfg.d_model}, {cfg.n_layers} layers "
        f"x {cfg.n_heads} heads, MLP {cfg.d_mlp}, context {cfg.context}, tied embeddings "
        f"({n:,} params, {cfg.param_dtype})",
        f"optimizer: clip {cfg.clip_norm:g} + {name} ({', '.join(extras) or 'plain'}), lr "
        f"{cfg.lr:g} warmup {cfg.warmup_steps} cosine to {cfg.lr * cfg.final_lr_fraction:g}, "
        f"b1 {cfg.b1:g} b2 {cfg.b2:g}, weight decay {cfg.weight_decay:g} on kernels",
        f"training: {cfg.steps} steps x {cfg.batch_size} x {cfg.accum} windows of "
        f"{cfg.context} bytes = {tokens / 1e6:.2f}M bytes "
        f"({tokens / corpus.train.size:.2f} epochs); seed {cfg.seed}",
        f"optimizer state: {state_bytes(state.opt_state):,} bytes "
        f"({state_bytes(state.opt_state) / n:.2f} B/param); params "
        f"{state_bytes(state.params) / n:.0f} B/param",
        *packed,
        f"device: {jax.devices()[0]}",
        *([parallel.describe(cfg.devices, cfg.zero1)] if cfg.devices > 1 else []),
    ]


def plot(path: Path, cfg: Config, history: dict, title: str) -> None:
    """Train and validation loss (nats/byte) and the learning rate against the step."""
    train, val = np.asarray(history["train"]), np.asarray(history["val"])
    steps = np.arange(cfg.steps + 1)
    loss = Panel(
        [
            Series(train[:, 0], train[:, 1], f"train (mean of {LOG_EVERY} steps)", {"alpha": 0.6}),
            Series(val[:, 0], val[:, 1], "validation", {"marker": "o"}),
        ],
        "loss",
        "step",
        "nats / byte",
        {"ylim": (None, min(4.0, float(np.max(train[:, 1])) + 0.1))},
    )
    lr = Panel([Series(steps, make_schedule(cfg)(steps), "")], "learning rate", "step", "lr")
    plot_panels(path, [loss, lr], title)


def step_time(history: dict) -> float:
    """Median seconds per optimizer step over the timed intervals after the first (compile)."""
    intervals = history["intervals"]
    use = intervals[1:] or intervals
    return float(np.median([s / n for n, s in use])) if use else float("nan")


def metrics(cfg: Config, corpus: Corpus, history: dict, extra: dict) -> dict[str, Any]:
    return {
        "config": dataclasses.asdict(cfg),
        "data": corpus.description,
        "jax": jax.__version__,
        "device": str(jax.devices()[0]),
        "step_time_s": step_time(history),
        "tokens_per_s": cfg.tokens_per_step / step_time(history),
        "peak_rss_bytes": peak_rss_bytes(),
        "history": history,
        **extra,
    }


# ----------------------------------------------------------------------------- the run


def check_finite(history: dict, cfg: Config) -> None:
    step, loss = history["train"][-1]
    if not math.isfinite(loss):
        raise DivergedError(
            f"training diverged: mean loss {loss} over the steps up to {step} "
            f"(--lr {cfg.lr:g}); nothing after the last checkpoint was saved"
        )


def train_and_evaluate(cfg: Config, corpus: Corpus | None = None) -> Result:
    """Trains the model as ``cfg`` says, evaluating and checkpointing every ``eval_every`` steps.

    Raises:
      DataError: the data could not be read or is too small.
      SetupError: ``cfg.out`` or the devices do not fit ``cfg`` (before training).
      ResumeError: ``cfg.resume`` without a matching checkpoint.
      DivergedError: a training loss was NaN or infinite.
    """
    start, cpu_start = time.perf_counter(), time.process_time()
    checkpoints.check_out(Path(cfg.out), OUTPUTS, resume=cfg.resume, overwrite=cfg.overwrite)
    corpus = limit(corpus if corpus is not None else load_corpus(cfg.data), cfg.data_limit)
    check_size(corpus, cfg.context)
    if cfg.eval_batch_size % cfg.devices:
        raise SetupError(
            f"eval_batch_size {cfg.eval_batch_size} must be a multiple of devices {cfg.devices}"
        )
    init_key, data_key, sample_key = jax.random.split(jax.random.key(cfg.seed), 3)
    run, state = create(cfg, init_key)
    setup = run.setup
    for line in describe_run(cfg, corpus, setup, state):
        log(line)
    train = parallel.replicate(jnp.asarray(corpus.train), setup.mesh)
    windows = val_windows(corpus.val, cfg.eval_windows, cfg.context + 1)
    history: dict[str, Any] = {
        "train": [],
        "val": [],
        "intervals": [],
        "val_time": [],
        "val_cpu_time": [],
    }
    manager = checkpoints.open_checkpoints(Path(cfg.out), cfg.keep_checkpoints, resume=cfg.resume)
    done = 0
    try:
        if cfg.resume:
            state, done, history = restore(manager, cfg, setup, state)
        last = cfg.steps if cfg.stop_after is None else max(cfg.stop_after, done)
        bar = Progress(cfg.steps, initial=done, enabled=cfg.progress)
        pending, t0, since = [], time.perf_counter(), done
        for step in range(done + 1, last + 1):
            for j in range(cfg.accum):
                state, loss = run.step(state, train, data_key, (step - 1) * cfg.accum + j)
                pending.append(loss)
            bar.step(loss, cfg.tokens_per_step)
            evaluate_now = step % cfg.eval_every == 0 or step == last
            if step % LOG_EVERY == 0 or evaluate_now:
                mean = float(np.mean(jax.device_get(pending)))
                history["train"].append([step, mean])
                pending = []
                check_finite(history, cfg)
            if evaluate_now:
                jax.block_until_ready(state)
                history["intervals"].append([step - since, time.perf_counter() - t0])
                history["val_time"].append([step, time.perf_counter() - start])
                history["val_cpu_time"].append([step, time.process_time() - cpu_start])
                val = evaluate(run.eval, state.params, windows, cfg.eval_batch_size)
                history["val"].append([step, val])
                bar.write(
                    f"step {step:5d}/{cfg.steps}  train_loss={history['train'][-1][1]:.4f}  "
                    f"val_loss={val:.4f} nats/byte  ({val / math.log(2):.3f} bits/byte)"
                )
                save(manager, step, state, cfg, history)
                bar.pause()
                t0, since = time.perf_counter(), step
        bar.close()
    finally:
        manager.wait_until_finished()
        manager.close()
    return finish(cfg, corpus, run, state, history, sample_key, (start, cpu_start))


def finish(cfg, corpus, run, state, history, sample_key, start) -> Result:
    """Samples, writes the metrics and the curves, and returns the result."""
    setup = run.setup
    val_loss = history["val"][-1][1] if history["val"] else float("nan")
    finished = bool(history["val"]) and history["val"][-1][0] == cfg.steps
    sample = b""
    if cfg.sample_bytes and finished:
        sample = sample_text(run, cfg, state.params, sample_key)
        log(
            f"sample ({cfg.sample_bytes} bytes after {cfg.prompt!r}, temperature "
            f"{cfg.temperature:g}):"
        )
        log(sample.decode("utf-8", errors="replace"))
        log("-" * 40)
    wall, cpu = time.perf_counter() - start[0], time.process_time() - start[1]
    out = Path(cfg.out)
    extra = {
        "val_loss": val_loss,
        "finished": finished,
        "wall_time_s": wall,
        "cpu_time_s": cpu,
        "load_average": list(os.getloadavg()),
        "params": setup.n_params,
        "opt_state_bytes": state_bytes(state.opt_state),
        "param_bytes": state_bytes(state.params),
        "sample": sample.decode("utf-8", errors="replace"),
    }
    write_json(out / "metrics.json", metrics(cfg, corpus, history, extra))
    if history["val"]:
        title = (
            f"byte-level LM, {cfg.optimizer}, seed {cfg.seed}: val loss {val_loss:.4f} nats/byte"
        )
        plot(out / "curves.png", cfg, history, title)
    if not finished:
        log(
            f"stopped after step {history['val'][-1][0] if history['val'] else 0}/{cfg.steps}; "
            "continue with --resume"
        )
    log(
        f"wrote {out / 'metrics.json'}, {out / 'curves.png'}, checkpoints in "
        f"{out / checkpoints.CHECKPOINTS}"
    )
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    log(f"total time {wall:.1f}s (including compilation), CPU time {cpu:.1f}s, load average {load}")
    params = jax.tree.map(np.asarray, unpacked(setup, state.params))
    return Result(val_loss, history, sample, params, wall)
