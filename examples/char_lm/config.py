"""Defaults for the byte-level language model example, in one place.

``Config()`` is the tuned CPU run; ``preset("gpu")`` a larger model for an accelerator.
``main.py`` reads its defaults from here.
"""

from __future__ import annotations

import dataclasses
import math

OPTIMIZERS = ("adam_jax", "optax")
MOMENTS = ("fp32", "8bit", "4bit")
PARAM_DTYPES = ("float32", "bfloat16")
LAYOUTS = ("per_leaf", "grouped")

# Settings a resumed run may change: the checkpoint holds the optimizer state layout-free
# (adam_jax.state_to_tree), so it restores on any device count, with or without ZeRO-1,
# into either layout and into either optimizer; the run continues to float32 rounding.
RESUMABLE_CHANGES = ("optimizer", "devices", "zero1", "layout")

# Settings that do not change the params reached (where the outputs go, how often and on
# how much the run is evaluated, what is shown and sampled): a resumed run may change them.
NOT_TRAJECTORY = (
    "out",
    "resume",
    "overwrite",
    "stop_after",
    "progress",
    "preset",
    "eval_every",
    "eval_windows",
    "eval_batch_size",
    "sample_bytes",
    "prompt",
    "temperature",
    "keep_checkpoints",
)

MAX_SEED = 2**32 - 1


@dataclasses.dataclass(frozen=True)
class Config:
    """Hyperparameters and run options; the defaults are the tuned, measured CPU run.

    Attributes:
      preset: the name of the preset these values started from (``"cpu"`` or ``"gpu"``).
      steps: optimizer steps (each of ``accum`` micro-batches).
      batch_size: sequences per micro-batch.
      context: bytes per sequence (the model's context length).
      accum: micro-batches per optimizer step (``optax.MultiSteps``).
      d_model, n_layers, n_heads, d_mlp: the transformer's width, depth, heads, MLP width.
      lr: peak learning rate; linear warmup over ``warmup_steps``, then cosine decay to
        ``lr * final_lr_fraction``.
      b1, b2: Adam's decay rates.
      weight_decay: decoupled weight decay on the Linear kernels (not on embeddings,
        norms or biases).
      clip_norm: gradients are clipped to this global norm first.
      seed: seeds initialisation, the training windows and sampling (not the data split).
      optimizer: ``"adam_jax"`` (``adam_jax.adamw``) or ``"optax"`` (``optax.adamw``).
      moments: ``"fp32"``, ``"8bit"`` or ``"4bit"`` storage of Adam's moments (adam_jax).
      param_dtype: ``"float32"`` or ``"bfloat16"`` params (the forward pass is float32).
      kahan: Kahan-compensated updates of bfloat16 params (``adam_jax.kahan_summation``).
      stochastic_rounding: stochastically rounded updates of bfloat16 params.
      layout: ``"per_leaf"`` or ``"grouped"`` moments (adam_jax).
      packed: params in a few flat buffers (``adam_jax.ParamPacker``).
      devices: data-parallel devices (the batch is split over them).
      zero1: partition the optimizer state over the devices (``adam_jax.shard_state``).
      data: a text file or folder to train on instead of the stdlib's ``.py`` sources.
      data_limit: use only the first ``data_limit`` bytes of each split (tests).
      eval_every: optimizer steps between validation evaluations (and checkpoints).
      eval_windows: validation windows of ``context`` bytes evaluated each time.
      eval_batch_size: windows per evaluation batch.
      sample_bytes: bytes generated at the end from ``prompt``.
      prompt: the generation prompt.
      temperature: sampling temperature of the generation.
      out: where metrics, curves and checkpoints go.
      resume: continue from the last checkpoint in ``out``.
      overwrite: replace an earlier run's outputs in ``out``.
      stop_after: stop after this step as if interrupted (it is checkpointed).
      keep_checkpoints: how many checkpoints to keep.
      progress: show a tqdm bar.
      quick_compile: compile without XLA's backend optimizations (faster compilation,
        slower steps; the tests use it).
    """

    preset: str = "cpu"
    steps: int = 500
    batch_size: int = 32
    context: int = 64
    accum: int = 1
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_mlp: int = 512
    lr: float = 3e-3
    warmup_steps: int = 50
    final_lr_fraction: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    seed: int = 0
    optimizer: str = "adam_jax"
    moments: str = "fp32"
    param_dtype: str = "float32"
    kahan: bool = False
    stochastic_rounding: bool = False
    layout: str = "per_leaf"
    packed: bool = False
    devices: int = 1
    zero1: bool = False
    data: str | None = None
    data_limit: int | None = None
    eval_every: int = 100
    eval_windows: int = 512
    eval_batch_size: int = 128
    sample_bytes: int = 300
    prompt: str = "def "
    temperature: float = 0.8
    out: str = "runs/char_lm"
    resume: bool = False
    overwrite: bool = False
    stop_after: int | None = None
    keep_checkpoints: int = 2
    progress: bool = True
    quick_compile: bool = False

    def __post_init__(self) -> None:
        for name, choices in (
            ("optimizer", OPTIMIZERS),
            ("moments", MOMENTS),
            ("param_dtype", PARAM_DTYPES),
            ("layout", LAYOUTS),
            ("preset", tuple(PRESETS)),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        for name in (
            "steps",
            "batch_size",
            "context",
            "accum",
            "d_model",
            "n_layers",
            "n_heads",
            "d_mlp",
            "eval_every",
            "eval_windows",
            "eval_batch_size",
            "keep_checkpoints",
            "devices",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} must be a multiple of n_heads {self.n_heads}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be in 0..{MAX_SEED}, got {self.seed}")
        for name in ("lr", "clip_norm", "temperature"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be finite and > 0, got {value}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be finite and >= 0, got {self.weight_decay}")
        if not 0 <= self.final_lr_fraction <= 1:
            raise ValueError(f"final_lr_fraction must be in [0, 1], got {self.final_lr_fraction}")
        for name in ("b1", "b2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(
                f"warmup_steps must be in 0..steps-1 ({self.steps - 1}), got {self.warmup_steps}"
            )
        if self.sample_bytes < 0:
            raise ValueError(f"sample_bytes must be >= 0, got {self.sample_bytes}")
        if not self.prompt.encode():
            raise ValueError("prompt must not be empty")
        if len(self.prompt.encode()) >= self.context:
            raise ValueError(f"prompt must be shorter than the context ({self.context} bytes)")
        if self.data_limit is not None and self.data_limit < self.context + 1:
            raise ValueError(
                f"data_limit must be > context ({self.context}), got {self.data_limit}"
            )
        if self.kahan and self.stochastic_rounding:
            raise ValueError("kahan and stochastic_rounding both round the update: choose one")
        if (self.kahan or self.stochastic_rounding) and self.param_dtype == "float32":
            raise ValueError(
                "kahan and stochastic_rounding act on bfloat16 params: add --param-dtype bfloat16"
            )
        if self.optimizer == "optax" and (self.moments != "fp32" or self.layout != "per_leaf"):
            raise ValueError("moments and layout are adam_jax options: use --optimizer adam_jax")
        if self.batch_size % self.devices:
            raise ValueError(
                f"batch_size {self.batch_size} must be a multiple of devices {self.devices}"
            )
        if self.zero1 and self.devices == 1:
            raise ValueError("zero1 partitions the optimizer state over devices: use devices > 1")
        if self.stop_after is not None and not 1 <= self.stop_after <= self.steps:
            raise ValueError(
                f"stop_after must be in 1..steps ({self.steps}), got {self.stop_after}"
            )
        if self.resume and self.overwrite:
            raise ValueError("resume continues the earlier run, overwrite replaces it: not both")

    @property
    def tokens_per_step(self) -> int:
        """Bytes predicted per optimizer step."""
        return self.batch_size * self.accum * self.context

    def trajectory(self) -> dict:
        """The fields that determine the parameters reached, as JSON-friendly values."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in NOT_TRAJECTORY}


# The CPU preset is Config's defaults. The GPU preset: a ~10.8M-param model with a longer
# context and bigger batches, for an accelerator.
PRESETS: dict[str, dict] = {
    "cpu": {},
    "gpu": {
        "steps": 3000,
        "batch_size": 64,
        "context": 256,
        "d_model": 384,
        "n_layers": 6,
        "n_heads": 6,
        "d_mlp": 1536,
        "lr": 1e-3,
        "warmup_steps": 200,
        "eval_every": 500,
        "eval_windows": 512,
        "eval_batch_size": 128,
    },
}


def preset(name: str, **overrides) -> Config:
    """The ``name`` preset with ``overrides`` applied."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {name!r}")
    return Config(**{**PRESETS[name], "preset": name, **overrides})
