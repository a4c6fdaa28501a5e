"""Per-device optimizer-state bytes with and without ZeRO-1, and what XLA communicates.

Run as ``python -m benchmarks.distributed`` (sets 8 virtual CPU devices itself,
before importing jax; on a machine with 8 real devices it uses them). Reports:

* bytes of Adam state on one device for GPT-2-like trees on an 8-way
  data-parallel mesh, plain (state follows the replicated params) and with
  ``adam_jax.shard_state`` (ZeRO-1). The d=512 tree is materialised and its
  bytes are read from the arrays' shards on device 0; GPT-2 small (124M) is
  laid out abstractly (``state_shardings`` on ``ShapeDtypeStruct`` params);
* the collectives in the compiled step (counted in the HLO text);
* the largest difference from a single-device run: the GPT-2 d=512 tree with 5
  steps of identical synthetic gradients, and the test MLP trained on batches
  split over the mesh (``tests/distributed_model.py``).

Writes ``distributed.md`` and ``distributed.json`` to ``--out``.
"""

from __future__ import annotations

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import argparse
import math
import re
from pathlib import Path

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import adam_jax
from benchmarks import report
from benchmarks.shapes import GPT2_D512, count_leaves, count_params, gpt2_like, materialize
from tests.distributed_model import (
    bytes_on_device0,
    make_batches,
    make_params,
    make_step,
    max_abs_diff,
    train,
)

COLLECTIVES = ("all-reduce", "reduce-scatter", "all-gather", "all-to-all", "collective-permute")
STEPS = 5


def count_collectives(hlo: str) -> dict[str, int]:
    return {c: len(re.findall(rf"\s{c}(?:-start)?\(", hlo)) for c in COLLECTIVES}


def abstract_bytes_on_device0(abstract, shardings) -> int:
    """Bytes per device from shapes and shardings alone (nothing allocated)."""
    return sum(
        math.prod(sh.shard_shape(a.shape)) * a.dtype.itemsize
        for a, sh in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings), strict=True)
    )


def optimizer(mesh, zero: bool) -> optax.GradientTransformation:
    tx = adam_jax.adamw(1e-3, weight_decay=0.1)
    return adam_jax.shard_state(tx, mesh, "data") if zero else tx


def measure_materialised(mesh) -> dict:
    """GPT-2 d=512: real arrays, bytes from the shards, collectives, equality."""
    tree = gpt2_like(**GPT2_D512)
    params_np = materialize(tree, seed=0, scale=0.1)
    grads_np = [materialize(tree, seed=1 + i, scale=0.01) for i in range(STEPS)]
    replicated = NamedSharding(mesh, P())
    out = {"tree": "GPT-2-like d=512 ff=1024", "leaves": count_leaves(tree)}
    out["params"] = count_params(tree)

    ref_tx = optimizer(mesh, zero=False)
    ref_params = jax.tree.map(np.asarray, params_np)
    ref_state = ref_tx.init(ref_params)
    step = jax.jit(lambda p, s, g: _apply(ref_tx, p, s, g))
    for g in grads_np:
        ref_params, ref_state = step(ref_params, ref_state, g)

    for zero in (False, True):
        tx = optimizer(mesh, zero)
        with jax.set_mesh(mesh):
            params = jax.device_put(params_np, replicated)
            state = tx.init(params)
            key = "zero1" if zero else "plain"
            out[f"{key}_state_bytes_device0"] = bytes_on_device0(state)
            sharded_step = jax.jit(
                lambda p, s, g, tx=tx: _apply(tx, p, s, g), donate_argnums=(0, 1)
            )
            grads0 = jax.device_put(grads_np[0], replicated)
            hlo = sharded_step.lower(params, state, grads0).compile().as_text()
            out[f"{key}_collectives"] = count_collectives(hlo)
            for g in grads_np:
                params, state = sharded_step(params, state, jax.device_put(g, replicated))
            out[f"{key}_max_abs_diff_vs_single_device"] = max(
                float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=True)
            )
    return out


def _apply(tx, params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state


def measure_abstract(mesh) -> dict:
    """GPT-2 small (124M): layout only, from ``state_shardings`` on abstract params."""
    replicated = NamedSharding(mesh, P())
    tree = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), gpt2_like()
    )
    out = {"tree": "GPT-2 small-like", "leaves": count_leaves(tree), "params": count_params(tree)}
    for zero in (False, True):
        tx = optimizer(mesh, zero)
        with jax.set_mesh(mesh):
            abstract = jax.eval_shape(tx.init, tree)
            shardings = adam_jax.state_shardings(tx, tree)
        key = "zero1" if zero else "plain"
        out[f"{key}_state_bytes_device0"] = abstract_bytes_on_device0(abstract, shardings)
    return out


def measure_mlp_training(mesh) -> dict:
    """The test MLP: batches split over "data", ZeRO-1, against one device."""
    tx = adam_jax.adamw(1e-2, weight_decay=0.1)
    want, _, _ = train(tx, make_params(), make_batches(STEPS))
    split = NamedSharding(mesh, P("data"))
    with jax.set_mesh(mesh):
        params = jax.device_put(make_params(), NamedSharding(mesh, P()))
        place = lambda b: tuple(jax.device_put(x, split) for x in b)
        got, state, _ = train(
            adam_jax.shard_state(tx, mesh, "data"), params, make_batches(STEPS), place
        )
        hlo = (
            make_step(adam_jax.shard_state(tx, mesh, "data"))
            .lower(params, state, *place(make_batches(1)[0]))
            .compile()
            .as_text()
        )
    return {
        "max_abs_diff_vs_single_device": max_abs_diff(got, want),
        "collectives": count_collectives(hlo),
    }


def render(results: dict) -> str:
    n = results["devices"]
    lines = [
        f"# Distributed: Adam state per device, {n} devices ({results['platform']})",
        "",
        "`python -m benchmarks.distributed`. Data parallelism on an "
        f"{n}-way `data` mesh: params replicated; adam_jax.adamw state plain (follows the "
        "params) or partitioned with `adam_jax.shard_state(tx, mesh, 'data')` (ZeRO-1).",
        "",
        "| tree | leaves | params | state bytes / device, plain | with ZeRO-1 | ratio |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for key in ("gpt2_d512", "gpt2_small"):
        r = results[key]
        plain, zero = r["plain_state_bytes_device0"], r["zero1_state_bytes_device0"]
        lines.append(
            f"| {r['tree']} | {r['leaves']} | {r['params']:,} | {plain:,} | {zero:,} "
            f"| {zero / plain:.4f} |"
        )
    m, mlp = results["gpt2_d512"], results["mlp"]
    lines += [
        "",
        "The d=512 figures are read from the shards on device 0; GPT-2 small's from the "
        "shardings `state_shardings` returns for abstract params (nothing allocated).",
        "",
        "Largest absolute difference from one device after "
        f"{STEPS} steps: GPT-2 d=512 with identical gradients, plain "
        f"{m['plain_max_abs_diff_vs_single_device']:.3g}, ZeRO-1 "
        f"{m['zero1_max_abs_diff_vs_single_device']:.3g}; the test MLP trained on batches "
        f"split over the mesh, ZeRO-1: {mlp['max_abs_diff_vs_single_device']:.3g}.",
        "",
        "Collectives in the compiled step (HLO ops):",
        "",
        "| step | " + " | ".join(COLLECTIVES) + " |",
        "| --- |" + " --- |" * len(COLLECTIVES),
    ]
    rows = [
        ("GPT-2 d=512, gradients given replicated, plain", m["plain_collectives"]),
        ("GPT-2 d=512, gradients given replicated, ZeRO-1", m["zero1_collectives"]),
        ("MLP, loss + grad on split batches, ZeRO-1", mlp["collectives"]),
    ]
    for name, counts in rows:
        lines.append(f"| {name} | " + " | ".join(str(counts[c]) for c in COLLECTIVES) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/cpu-2core")
    args = parser.parse_args()
    devices = jax.devices()
    mesh = jax.make_mesh((len(devices),), ("data",))
    results = {"devices": len(devices), "platform": devices[0].platform}
    results["gpt2_d512"] = measure_materialised(mesh)
    results["gpt2_small"] = measure_abstract(mesh)
    results["mlp"] = measure_mlp_training(mesh)
    report.write_pair(results, render(results), Path(args.out), "distributed")


if __name__ == "__main__":
    main()
