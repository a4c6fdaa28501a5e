"""Adam step benchmark: adam_jax vs optax vs torch, against the memory-bandwidth roofline.

Run from the repository root::

    python -m benchmarks.adam_bench            # full run for this machine
    python -m benchmarks.adam_bench --quick    # small shapes, a smoke run
    python -m benchmarks.adam_bench --list     # shapes and methods

Results go to ``benchmarks/results/<machine>/`` (results.md, results.json,
throughput.png). See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import pathlib
import shlex
import sys

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
# JAX must not grab most of a GPU up front: torch shares the device in the same process.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax

from benchmarks import harness, report, shapes
from benchmarks import methods as methods_mod

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
# Variables a user may set that change timings; echoed in the recorded command.
USER_ENV_KEYS = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "XLA_FLAGS", "JAX_PLATFORMS")
QUICK_TRIAD_N = 4_000_000


def _split(text: str | None) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()] if text else []


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.adam_bench", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--shapes", help="comma-separated shape names (see --list); default: all")
    p.add_argument("--methods", help="comma-separated method names or glob patterns; default: all")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 7; quick 5)")
    p.add_argument(
        "--min-repeat-ms",
        type=float,
        default=None,
        help="each repeat runs enough steps to last this long (default 50; quick 20)",
    )
    p.add_argument("--quick", action="store_true", help="small shapes only: a smoke run")
    p.add_argument(
        "--out",
        type=pathlib.Path,
        help="output folder (default benchmarks/results/<machine>/, <machine>-quick/ with --quick)",
    )
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    p.add_argument("--triad-n", type=int, default=None, help="triad array length")
    p.add_argument(
        "--torch-threads", type=int, help="torch.set_num_threads (default: the number of cores)"
    )
    p.add_argument("--layouts", help="adam_jax layout= values to run (default: detected)")
    p.add_argument("--no-e2e", action="store_true", help="skip the MNIST CNN train step")
    p.add_argument("--no-plot", action="store_true", help="do not write throughput.png")
    p.add_argument("--note", default="", help="free text written into results.md")
    p.add_argument("--list", action="store_true", help="list shapes and methods, then exit")
    p.add_argument(
        "--rerender",
        type=pathlib.Path,
        metavar="DIR",
        help="rewrite DIR/results.md and DIR/throughput.png from DIR/results.json, then exit",
    )
    return p.parse_args(argv)


def _select_shapes(args: argparse.Namespace, device: str) -> list[shapes.Shape]:
    names = _split(args.shapes)
    if names:
        unknown = [n for n in names if n not in shapes.SHAPES_BY_NAME]
        if unknown:
            raise SystemExit(f"unknown shapes {unknown}; known: {list(shapes.SHAPES_BY_NAME)}")
        return [shapes.SHAPES_BY_NAME[n] for n in names]
    return [
        s
        for s in shapes.SHAPES
        if (device == "gpu" or not s.gpu_only) and (s.quick or not args.quick)
    ]


def _select_methods(args: argparse.Namespace, available: list[methods_mod.Method], skipped):
    patterns = _split(args.methods)
    if not patterns:
        return available, skipped
    known = [m.name for m in available] + list(skipped)
    chosen = []
    for pat in patterns:
        hits = [n for n in known if n == pat] or fnmatch.filter(known, pat)
        if not hits:
            raise SystemExit(f"unknown method {pat!r}; known: {known}")
        chosen += [h for h in hits if h not in chosen]
    return (
        [m for m in available if m.name in chosen],
        {k: v for k, v in skipped.items() if k in chosen},
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.rerender:
        for path in report.rerender(args.rerender, png=not args.no_plot):
            print(f"wrote {path}")
        return 0
    if args.device == "cpu":
        jax.config.update("jax_platforms", "cpu")
    device = harness.detect_device() if args.device == "auto" else args.device
    if device == "gpu" and harness.detect_device() != "gpu":
        raise SystemExit("--device gpu: JAX sees no GPU")
    layouts = _split(args.layouts) or None
    available, skipped = methods_mod.all_methods(layouts)
    if args.list:
        for s in shapes.SHAPES:
            tree = s.build()
            n, leaves = shapes.count_params(tree), shapes.count_leaves(tree)
            extra = " (GPU only by default)" if s.gpu_only else ""
            print(f"shape  {s.name:16} {leaves:5d} leaves {n:>14,} params{extra}")
        for m in available:
            print(f"method {m.name:24} {m.description}")
        for name, why in skipped.items():
            print(f"method {name:24} unavailable: {why}")
        return 0
    chosen, skipped = _select_methods(args, available, skipped)
    repeats = args.repeats or (5 if args.quick else 7)
    if repeats < 5:
        print(f"warning: {repeats} repeats (< 5): for smoke runs only", file=sys.stderr)
    min_ms = args.min_repeat_ms or (20.0 if args.quick else 50.0)
    triad_n = args.triad_n or (QUICK_TRIAD_N if args.quick else 50_000_000)
    if device == "gpu" and not args.triad_n:
        triad_n = 250_000_000
    cfg = harness.Config(
        shapes=_select_shapes(args, device),
        methods=chosen,
        skipped_methods=skipped,
        device=device,
        repeats=repeats,
        min_repeat_s=min_ms / 1e3,
        triad_n=triad_n,
        e2e=not args.no_e2e,
        torch_threads=args.torch_threads,
        e2e_layouts=methods_mod.adam_jax_layouts(layouts),
        command=shlex.join(
            [
                *(f"{k}={os.environ[k]}" for k in USER_ENV_KEYS if k in os.environ),
                *("python", "-m", "benchmarks.adam_bench"),
                *(sys.argv[1:] if argv is None else argv),
            ]
        ),
        note=args.note,
        log=lambda msg: print(msg, flush=True),
    )
    results = harness.run(cfg)
    # A smoke run must not overwrite a full run's results.
    slug = results["machine"]["slug"] + ("-quick" if args.quick else "")
    out = args.out or RESULTS_DIR / slug
    for path in report.write(results, out, png=not args.no_plot):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
