"""The MNIST CNN whose params and train step are benchmarked.

Uses the model of ``examples/mnist_cnn`` when that package is importable and
maps a batch of 28x28 digits to 10 logits (called without a dropout key, so
deterministic); otherwise the local definition below, the same architecture:
conv 1→32 3x3, conv 32→64 3x3, each followed by ReLU and 2x2 pooling, dense
3136→128, dense 128→10: 421,642 params in 8 leaves either way.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

_CANDIDATE_MODULES = ("examples.mnist_cnn.model", "examples.mnist_cnn.train", "examples.mnist_cnn")
_CANDIDATE_CLASSES = ("CNN", "Cnn", "MnistCNN", "MNISTCNN", "Model")
BATCH = 128


class CNN(nnx.Module):
    """Local fallback: a small LeNet-style CNN for 28x28x1 inputs."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 32, kernel_size=(3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(32, 64, kernel_size=(3, 3), rngs=rngs)
        self.linear1 = nnx.Linear(7 * 7 * 64, 128, rngs=rngs)
        self.linear2 = nnx.Linear(128, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        pool = lambda y: nnx.avg_pool(y, window_shape=(2, 2), strides=(2, 2))
        x = pool(nnx.relu(self.conv1(x)))
        x = pool(nnx.relu(self.conv2(x)))
        x = x.reshape(x.shape[0], -1)
        return self.linear2(nnx.relu(self.linear1(x)))


_IMAGE_SHAPES = ((28, 28, 1), (28, 28))  # NHWC, or NHW with the channel added by the model


def _image_shape(factory: Callable[[], nnx.Module]) -> tuple[int, ...]:
    """The per-example input shape that the model maps to 10 logits; raises if none does."""
    model = nnx.eval_shape(factory)
    for shape in _IMAGE_SHAPES:
        try:
            out = nnx.eval_shape(lambda m, s=shape: m(jnp.zeros((2, *s), jnp.float32)), model)
        except Exception:
            continue
        if tuple(out.shape) == (2, 10):
            return shape
    raise ValueError("the model maps no 28x28 input to (batch, 10) logits")


class Resolved(NamedTuple):
    factory: Callable[[], nnx.Module]
    source: str
    image_shape: tuple[int, ...]


@functools.cache
def resolve() -> Resolved:
    """The examples/mnist_cnn model if it is importable and usable, else the local one."""
    for mod_name in _CANDIDATE_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except Exception:
            continue
        for cls_name in _CANDIDATE_CLASSES:
            cls = getattr(mod, cls_name, None)
            if not isinstance(cls, type) or not issubclass(cls, nnx.Module):
                continue
            factory = lambda cls=cls: cls(rngs=nnx.Rngs(0))
            try:
                shape = _image_shape(factory)
            except Exception:
                continue
            return Resolved(factory, f"{mod_name}.{cls_name}", shape)
    factory = lambda: CNN(rngs=nnx.Rngs(0))
    return Resolved(factory, "benchmarks.mnist_model.CNN (local fallback)", _image_shape(factory))


def param_shapes() -> dict[str, Any]:
    """The CNN's params as a plain dict of ``jax.ShapeDtypeStruct``."""
    model = nnx.eval_shape(resolve().factory)
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _initial_split(factory: Callable[[], nnx.Module]) -> tuple[Any, Any, Any]:
    """``nnx.split(model, nnx.Param, ...)`` with deterministic params, cheaply.

    Timing does not depend on the init scheme, and the model's own init costs
    seconds of op-by-op compilation; so when the model has no state besides
    its params, they are drawn uniform in [-0.05, 0.05) with a fixed seed.
    """
    graphdef, params, rest = nnx.split(nnx.eval_shape(factory), nnx.Param, ...)
    if jax.tree.leaves(rest):
        return nnx.split(factory(), nnx.Param, ...)
    rng = np.random.default_rng(0)
    draw = lambda s: jnp.asarray((rng.random(s.shape, np.float32) - 0.5) * 0.1, s.dtype)
    return graphdef, jax.tree.map(draw, params), rest


def make_train_step(tx: optax.GradientTransformation):
    """Returns ``(step, params, opt_state, batch)`` for a jitted, donated train step.

    ``step(params, opt_state, x, y) -> (params, opt_state, loss)`` does the
    forward pass, backward pass and the optimizer update (cross-entropy loss).
    """
    resolved = resolve()
    graphdef, params, rest = _initial_split(resolved.factory)

    def loss_fn(p, x, y):
        logits = nnx.merge(graphdef, p, rest)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def step(p, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.random((BATCH, *resolved.image_shape), np.float32))
    y = jnp.asarray(rng.integers(0, 10, BATCH, np.int32))
    return jax.jit(step, donate_argnums=(0, 1)), params, tx.init(params), (x, y)
