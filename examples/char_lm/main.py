"""Command line for the byte-level LM example: parse arguments, call ``train.train_and_evaluate``.

Usage (from anywhere)::

  python examples/char_lm/main.py [--preset {cpu,gpu}] [--steps N] [--seed S]
      [--moments {fp32,8bit,4bit}] [--param-dtype {float32,bfloat16}]
      [--kahan | --stochastic-rounding] [--layout {per_leaf,grouped}] [--packed]
      [--devices N [--zero1]] [--optimizer {adam_jax,optax}] [--accum N]
      [--data PATH] [--out DIR] [--resume | --overwrite] [--stop-after STEP]

The last line printed is ``val_loss=<float>`` (nats per byte). Bad arguments exit with
status 2 (argparse); a run that cannot start or continue prints ``error: ...`` and exits 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
# Import the example as the package ``char_lm`` (and the shared helpers as ``common``) and
# adam_jax from the repository even when it is not pip-installed; drop the script's own
# directory so that its modules (config, data, model, train) cannot shadow other modules.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
for _path in (str(_HERE.parents[1]), str(_HERE.parent)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from char_lm.config import (  # noqa: E402
    LAYOUTS,
    MOMENTS,
    OPTIMIZERS,
    PARAM_DTYPES,
    PRESETS,
    Config,
    preset,
)

# (flag, Config field, type, help): options whose default comes from the preset.
TUNED = [
    ("--steps", "steps", int, "optimizer steps"),
    ("--batch-size", "batch_size", int, "sequences per micro-batch"),
    ("--context", "context", int, "bytes per sequence"),
    ("--accum", "accum", int, "micro-batches per optimizer step (optax.MultiSteps)"),
    ("--lr", "lr", float, "peak learning rate (warmup-cosine)"),
    ("--warmup-steps", "warmup_steps", int, "linear warmup steps"),
    ("--eval-every", "eval_every", int, "steps between validation evaluations and checkpoints"),
]


def parse_args(argv: list[str] | None = None) -> Config:
    """Parses the command line into a :class:`Config` (defaults from the preset)."""
    d = Config()
    p = argparse.ArgumentParser(
        description="Train a small byte-level transformer LM on the Python stdlib with "
        "adam_jax.adamw.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--preset",
        choices=tuple(PRESETS),
        default="cpu",
        help="cpu: the ~0.84M-param default; gpu: a ~10.8M-param model for an accelerator",
    )
    for flag, _, kind, text in TUNED:
        p.add_argument(flag, type=kind, default=None, help=f"{text} (default: the preset's)")
    p.add_argument("--seed", type=int, default=d.seed, help="init/data-order/sampling seed")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer, help="adamw of")
    p.add_argument("--moments", choices=MOMENTS, default=d.moments, help="Adam moment storage")
    p.add_argument("--param-dtype", choices=PARAM_DTYPES, default=d.param_dtype)
    rounding = p.add_mutually_exclusive_group()
    rounding.add_argument(
        "--kahan", action="store_true", help="Kahan-compensated bf16 updates (adam_jax)"
    )
    rounding.add_argument(
        "--stochastic-rounding", action="store_true", help="stochastically rounded bf16 updates"
    )
    p.add_argument("--layout", choices=LAYOUTS, default=d.layout, help="moments per leaf/grouped")
    p.add_argument("--packed", action="store_true", help="params in flat buffers (ParamPacker)")
    p.add_argument("--devices", type=int, default=d.devices, help="data-parallel devices")
    p.add_argument("--zero1", action="store_true", help="partition the optimizer state (ZeRO-1)")
    p.add_argument("--data", default=None, help="a text file or folder (default: stdlib .py)")
    p.add_argument("--out", default=d.out, help="metrics JSON, curves PNG and checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
    p.add_argument("--stop-after", type=int, default=None, metavar="STEP", help="stop early")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    args = p.parse_args(argv)
    tuned = {f: getattr(args, f) for _, f, _, _ in TUNED if getattr(args, f) is not None}
    try:
        return preset(
            args.preset,
            **tuned,
            seed=args.seed,
            optimizer=args.optimizer,
            moments=args.moments,
            param_dtype=args.param_dtype,
            kahan=args.kahan,
            stochastic_rounding=args.stochastic_rounding,
            layout=args.layout,
            packed=args.packed,
            devices=args.devices,
            zero1=args.zero1,
            data=args.data,
            out=args.out,
            resume=args.resume,
            overwrite=args.overwrite,
            stop_after=args.stop_after,
            progress=not args.no_progress,
        )
    except ValueError as err:
        p.error(str(err))


def main(argv: list[str] | None = None) -> int:
    """Runs the example; returns the process exit status."""
    cfg = parse_args(argv)
    from common import parallel

    parallel.request_host_devices(cfg.devices)  # before jax is imported
    from char_lm import train  # after parsing, so --help is instant

    try:
        result = train.train_and_evaluate(cfg)
    except (train.DataError, train.RunError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"val_loss={result.val_loss:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
