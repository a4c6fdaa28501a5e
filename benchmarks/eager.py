"""Eager (un-jitted) ``update`` per step: adam_jax's layouts against ``optax.adam``.

Run as ``python -m benchmarks.eager [--leaves 1000,5000] [--repeats 5]``. Eagerly
every jnp operation dispatches on its own, so the cost is per op and per leaf,
not per byte. Each method is warmed up (one step, which also fills JAX's
per-primitive caches), then timed over ``--repeats`` steps with
``block_until_ready``; the median step is reported, side by side in one
process, with the ratio to optax. Leaves are 10..16 floats, as in a model with
many biases and norms.

Writes ``eager.md`` and ``eager.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

import adam_jax
from benchmarks import report

METHODS = {
    "optax.adam": lambda: optax.adam(1e-3),
    "adam_jax per_leaf": lambda: adam_jax.adam(1e-3, layout="per_leaf"),
    "adam_jax grouped": lambda: adam_jax.adam(1e-3, layout="grouped"),
}


def many_leaves(n: int) -> dict[str, jax.Array]:
    return {f"p{i:05d}": jnp.full((10 + i % 7,), 1.0 + i / n) for i in range(n)}


def time_eager_steps(tx: optax.GradientTransformation, params, grads, repeats: int) -> float:
    """Median seconds of one eager ``tx.update`` (after one warm-up step)."""
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)
    jax.block_until_ready(updates)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        updates, state = tx.update(grads, state, params)
        jax.block_until_ready((updates, state))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(leaf_counts: list[int], repeats: int) -> dict:
    rows = []
    for n in leaf_counts:
        params = many_leaves(n)
        grads = jax.tree.map(lambda p: 0.1 * p, params)
        times = {
            name: time_eager_steps(make(), params, grads, repeats) for name, make in METHODS.items()
        }
        rows.append({"leaves": n, "seconds": times})
    return {
        "machine": f"{platform.machine()}, {jax.devices()[0].platform}, jax {jax.__version__}",
        "repeats": repeats,
        "rows": rows,
    }


def markdown(results: dict) -> str:
    names = list(METHODS)
    lines = [
        "# Eager (un-jitted) update step",
        "",
        f"Machine: {results['machine']}; median of {results['repeats']} steps after a "
        "warm-up step. Ratio = method / optax.adam (lower is faster).",
        "",
        "| leaves | " + " | ".join(names) + " |",
        "| ---: | " + " | ".join("---:" for _ in names) + " |",
    ]
    for row in results["rows"]:
        base = row["seconds"]["optax.adam"]
        cells = [f"{row['seconds'][n]:.3f} s ({row['seconds'][n] / base:.2f}x)" for n in names]
        lines.append(f"| {row['leaves']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leaves", default="1000,5000", help="comma-separated leaf counts")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/cpu-2core")
    args = parser.parse_args(argv)
    counts = [int(x) for x in args.leaves.split(",")]
    results = run(counts, args.repeats)
    report.write_pair(results, markdown(results), Path(args.out), "eager")


if __name__ == "__main__":
    main()
