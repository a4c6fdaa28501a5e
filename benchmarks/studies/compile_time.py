"""Where the compile time of a many-leaf Adam step goes on XLA:CPU.

Issue 5 asks for a 1000-leaf step that compiles in under 1 s on CPU. This script
measures, in one run:

* **Adam steps vs leaf count.** ``trace``, ``lower`` and XLA ``compile`` of one
  jitted, donated step (update + apply) on ``n`` float32 leaves of 1000, for
  ``adam_jax.adam(layout="grouped")``, ``layout="per_leaf"`` (the default),
  ``optax.adam``, and packed params (one buffer of ``n * 1000``, the
  ``ParamPacker`` step).
* **The kernel model behind it**, on 1000 outputs of 1000 floats:
  ``identical`` (``a * 1.5`` per leaf: the same fused kernel 1000 times),
  ``distinct_constants`` (``a * (1 + i * 1e-6)``: 1000 kernels that differ only
  in a constant), ``static_slices`` (``p_i + u[i*k:(i+1)*k]`` of one flat buffer:
  what the grouped layout emits off CPU, and emitted on CPU before), ``runtime_offsets``
  (the same slices as ``dynamic_slice`` with each offset passed in, and returned, as
  its own int32 scalar, as optimizer state would carry them, so the 1000 fused
  kernels are identical) and ``opaque_while`` (the same ``dynamic_slice`` kernels,
  the offsets made runtime values inside the program as the carry of a
  ``while_loop`` that runs 0 times: ``adam_jax._layout.opaque_int32``, what the
  grouped layout emits on CPU). For the three slice variants the run time of the
  compiled program is measured too.

* **A whole train step** (loss ``sum(tanh(w_i * x))`` over the ``n`` leaves, its
  gradient, update, apply; donated) on the params tree with ``adam_jax.adam`` and
  ``optax.adam``, and on params packed with ``adam_jax.ParamPacker`` (``unpack``
  inside the loss): compile phases and run time per step. This is where the
  gradient through ``unpack`` shows: it must be one ``concatenate``, not a
  buffer-sized ``pad`` per leaf.

* **Where XLA's compile goes** at the largest leaf count: a child process with
  XLA's pass log on (``TF_CPP_VMODULE=hlo_pass_pipeline=1``) splits each step's
  XLA compile into the HLO pass pipelines and the rest (buffer assignment and
  LLVM code generation of the kernels).

XLA:CPU compiles each distinct fused kernel separately (several ms each on this
machine) and compiles identical kernels once, which is what the rows show. Writes
``compile_time.md`` and ``compile_time.json`` to ``--out``.

    python -m benchmarks.studies.compile_time            # about 2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import adam_jax
from adam_jax._layout import opaque_int32
from benchmarks import harness, report

LEAF = 1000


def _tree(n: int) -> dict[str, jax.Array]:
    return {f"p{i:04d}": jnp.zeros((LEAF,), jnp.float32) for i in range(n)}


def _compile(fn: Callable, *args: Any, donate: Sequence[int] = ()) -> tuple[dict[str, float], Any]:
    """Trace, lower and XLA-compile ``jax.jit(fn)`` on ``args``: seconds per phase, executable."""
    jitted = jax.jit(fn, donate_argnums=tuple(donate))
    t0 = time.perf_counter()
    traced = jitted.trace(*args)
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    compiled = lowered.compile()
    t3 = time.perf_counter()
    return {"trace": t1 - t0, "lower": t2 - t1, "compile": t3 - t2, "total": t3 - t0}, compiled


def _phases(fn: Callable, *args: Any, donate: Sequence[int] = ()) -> dict[str, float]:
    """Seconds for trace, lower and XLA compile of ``jax.jit(fn)`` on ``args``."""
    return _compile(fn, *args, donate=donate)[0]


def _median_ms(advance: Callable[[Any], Any], carry: Any, repeats: int, steps: int) -> float:
    """Median over ``repeats`` of the ms per ``carry = advance(carry)`` over ``steps`` calls."""
    times = []
    for _ in range(repeats):
        jax.block_until_ready(carry)
        t0 = time.perf_counter()
        for _ in range(steps):
            carry = advance(carry)
        jax.block_until_ready(carry)
        times.append((time.perf_counter() - t0) / steps)
    return 1e3 * statistics.median(times)


def _step_fn(tx: optax.GradientTransformation) -> Callable:
    """One update + apply step; jitted, its module is ``jit_step``."""

    def step(p, s, g):
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    return step


def adam_step_compile(tx: optax.GradientTransformation, params: Any) -> dict[str, float]:
    """Compile phases of one donated update + apply step of ``tx`` on ``params``."""
    return _phases(_step_fn(tx), params, tx.init(params), params, donate=(0, 1))


def adam_rows(leaf_counts: Sequence[int]) -> list[dict[str, Any]]:
    rows = []
    for n in leaf_counts:
        tree = _tree(n)
        packed = {"flat": jnp.zeros((n * LEAF,), jnp.float32)}
        cases = {
            "adam_jax[grouped]": (adam_jax.adam(1e-3, layout="grouped"), tree),
            "adam_jax[per_leaf]": (adam_jax.adam(1e-3, layout="per_leaf"), tree),
            "optax": (optax.adam(1e-3), tree),
            "packed (1 buffer)": (adam_jax.adam(1e-3), packed),
        }
        for name, (tx, params) in cases.items():
            rows.append({"leaves": n, "method": name, **adam_step_compile(tx, params)})
            print(f"[adam] n={n} {name}: {rows[-1]['total']:.2f} s", flush=True)
    return rows


def _toy_loss(tree: dict[str, jax.Array]) -> jax.Array:
    x = jnp.linspace(-1.0, 1.0, LEAF, dtype=jnp.float32)
    return sum(jnp.sum(jnp.tanh(w * x)) for w in jax.tree.leaves(tree))


def _train_step_fn(tx: optax.GradientTransformation, loss: Callable) -> Callable:
    def step(p, s):
        grads = jax.grad(loss)(p)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s

    return step


def _step_run_ms(compiled: Any, params: Any, state: Any) -> float:
    """Median ms per call of the compiled, donated ``step(params, state)``."""
    carry = compiled(*jax.tree.map(lambda a: a + 0, (params, state)))
    return _median_ms(lambda c: compiled(*c), carry, repeats=7, steps=10)


def train_rows(n: int) -> list[dict[str, Any]]:
    """Compile phases and ms/step of a toy train step on ``n`` leaves: tree vs packed."""
    tree = {k: v + 0.01 for k, v in _tree(n).items()}
    packer = adam_jax.ParamPacker(tree)
    cases = {
        "tree, adam_jax[grouped]": (adam_jax.adam(1e-3, layout="grouped"), _toy_loss, tree),
        "tree, optax": (optax.adam(1e-3), _toy_loss, tree),
        "packed, adam_jax": (
            adam_jax.adam(1e-3),
            lambda q: _toy_loss(packer.unpack(q)),
            packer.pack(tree),
        ),
    }
    rows = []
    for name, (tx, loss, params) in cases.items():
        step = _train_step_fn(tx, loss)
        state = tx.init(params)
        phases, compiled = _compile(step, params, state, donate=(0, 1))
        row = {"leaves": n, "method": name, **phases}
        row["run_ms"] = _step_run_ms(compiled, params, state)
        rows.append(row)
        print(f"[train] n={n} {name}: {row['total']:.2f} s, {row['run_ms']:.2f} ms", flush=True)
    return rows


def _static_slices(ps, flat, extra):
    del extra
    return [p + flat[i * LEAF : (i + 1) * LEAF] for i, p in enumerate(ps)]


def _runtime_offsets(ps, flat, offsets):
    """Offsets as one int32 argument each, returned again, as optimizer state would be."""
    pairs = zip(offsets, ps, strict=True)
    return [p + lax.dynamic_slice(flat, (o,), (LEAF,)) for o, p in pairs], offsets


def _opaque_while(ps, flat, count):
    offsets = opaque_int32([i * LEAF for i in range(len(ps))], count)
    pairs = zip(offsets, ps, strict=True)
    return [p + lax.dynamic_slice(flat, (o,), (LEAF,)) for o, p in pairs]


def _run_ms(compiled: Any, name: str, ps, flat, extra) -> float:
    """Median ms per call of the compiled slice case (params donated), checked once."""

    def call(params):
        out = compiled(params, flat, extra)
        return out[0] if isinstance(out, tuple) else out

    out = call([p + 0 for p in ps])
    expect = np.asarray(flat).reshape(len(ps), LEAF)
    if not all(np.array_equal(np.asarray(o), expect[i]) for i, o in enumerate(out)):
        raise AssertionError(f"{name} computed the wrong slices")
    return _median_ms(call, out, repeats=7, steps=20)


def kernel_rows(n: int) -> list[dict[str, Any]]:
    ps = [jnp.zeros((LEAF,), jnp.float32) for _ in range(n)]
    flat = jnp.arange(n * LEAF, dtype=jnp.float32)
    rows = [
        {"case": "identical", **_phases(lambda p: [a * 1.5 for a in p], ps)},
        {
            "case": "distinct_constants",
            **_phases(lambda p: [a * (1.0 + i * 1e-6) for i, a in enumerate(p)], ps),
        },
    ]
    slice_cases = [
        ("static_slices", _static_slices, ()),
        ("runtime_offsets", _runtime_offsets, [jnp.int32(i * LEAF) for i in range(n)]),
        ("opaque_while", _opaque_while, jnp.int32(0)),
    ]
    for case, fn, extra in slice_cases:
        phases, compiled = _compile(fn, ps, flat, extra, donate=(0,))
        row = {"case": case, **phases}
        row["run_ms"] = _run_ms(compiled, case, ps, flat, extra)
        rows.append(row)
    for row in rows:
        print(f"[kernels] {row['case']}: {row['total']:.2f} s", flush=True)
    return rows


_PASS_LOG_ENV = {"TF_CPP_MIN_LOG_LEVEL": "0", "TF_CPP_VMODULE": "hlo_pass_pipeline=1"}
_MARK = "### adam_jax compile_time case: "
_GLOG = re.compile(r"^[IWEF]\d{4} (\d\d):(\d\d):(\d\d\.\d+)\s")


def _pass_log_child(n: int) -> None:
    """Child process: compiles each step case once, XLA's pass log on stderr."""
    tree = _tree(n)
    for name, tx in _split_cases().items():
        jitted = jax.jit(_step_fn(tx), donate_argnums=(0, 1))
        lowered = jitted.trace(tree, tx.init(tree), tree).lower()
        print(_MARK + name, file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        lowered.compile()
        print(
            f"{_MARK}{name} compile_s={time.perf_counter() - t0:.4f}", file=sys.stderr, flush=True
        )


def _split_cases() -> dict[str, optax.GradientTransformation]:
    return {
        "adam_jax[grouped]": adam_jax.adam(1e-3, layout="grouped"),
        "adam_jax[per_leaf]": adam_jax.adam(1e-3, layout="per_leaf"),
        "optax": optax.adam(1e-3),
    }


def parse_pass_log(text: str) -> list[dict[str, Any]]:
    """Splits each case's XLA compile into the HLO pass pipelines and the rest.

    ``hlo_passes`` is the wall time from the first to the last pass-pipeline log
    line of the step's module (``jit_step``); the rest of the compile is buffer
    assignment, LLVM code generation of the kernels and thunk emission. The two
    passes that took longest are listed (nested pipelines excluded).
    """
    rows: list[dict[str, Any]] = []
    case, in_step, pipe = None, False, ""
    first = last = None
    passes: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(_MARK):
            rest = line[len(_MARK) :]
            if " compile_s=" not in rest:  # a case starts
                case, in_step, first, last, passes = rest, False, None, None, {}
                continue
            name, value = rest.rsplit(" compile_s=", 1)
            span = 0.0 if first is None else last - first
            top = sorted(passes.items(), key=lambda kv: -kv[1])[:2]
            rows.append(
                {
                    "method": name,
                    "compile": float(value),
                    "hlo_passes": span,
                    "rest": float(value) - span,
                    "top_passes": [list(kv) for kv in top],
                }
            )
            case = None
            continue
        if case is None:
            continue
        header = re.search(r"Running HLO pass pipeline on module (\S+): (.*)$", line)
        if header:
            in_step, pipe = header.group(1) == "jit_step", header.group(2)
        if not in_step:
            continue
        stamp = _GLOG.match(line)
        if stamp:
            t = int(stamp.group(1)) * 3600 + int(stamp.group(2)) * 60 + float(stamp.group(3))
            first = t if first is None else first
            last = t
        timed = re.search(r"HLO pass: (.+?) time: ([\d.]+) (us|ms|s) ", line)
        if timed and timed.group(1) != pipe:  # a nested pipeline's total would count twice
            scale = {"us": 1e-6, "ms": 1e-3, "s": 1.0}[timed.group(3)]
            passes[timed.group(1)] = passes.get(timed.group(1), 0.0) + float(timed.group(2)) * scale
    return rows


def pass_split_rows(n: int) -> list[dict[str, Any]]:
    """Runs :func:`_pass_log_child` in a child process with XLA's pass log on."""
    env = {**os.environ, **_PASS_LOG_ENV}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.studies.compile_time", "--_pass-log-child", str(n)],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    rows = parse_pass_log(proc.stderr)
    for row in rows:
        print(
            f"[passes] {row['method']}: compile {row['compile']:.2f} s, "
            f"HLO passes {row['hlo_passes']:.2f} s",
            flush=True,
        )
    return rows


def render(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        "# Compile time of many-leaf steps — " + m["slug"],
        "",
        f"- Command: `python -m benchmarks.studies.compile_time` ({results['date']})",
        f"- Machine: {m['cpu_model']}, {m['cpu_cores']} cores; {m['platform']}",
        "- Versions: "
        + ", ".join(f"{k} {v}" for k, v in results["versions"].items() if v is not None),
        "",
        f"## Adam step (update + apply, donated) on n float32 leaves of {LEAF}, seconds",
        "",
        "| leaves | method | trace | lower | XLA compile | total |",
        "| ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in results["adam"]:
        lines.append(
            f"| {r['leaves']} | {r['method']} | {r['trace']:.2f} | {r['lower']:.2f} "
            f"| {r['compile']:.2f} | {r['total']:.2f} |"
        )
    n = results["kernel_leaves"]
    lines += [
        "",
        f"## The kernel model: {n} outputs of {LEAF} floats, seconds (and run time)",
        "",
        "The grouped layout cuts its leaves from the flat update as `opaque_while` "
        "does on CPU (`adam_jax._layout.opaque_int32`) and as `static_slices` does "
        "on other platforms.",
        "",
        "| case | XLA compile | total | run ms |",
        "| --- | ---: | ---: | ---: |",
    ]
    for r in results["kernels"]:
        run = f"{r['run_ms']:.2f}" if "run_ms" in r else "—"
        lines.append(f"| {r['case']} | {r['compile']:.2f} | {r['total']:.2f} | {run} |")
    if results.get("train"):
        lines += [
            "",
            f"## A train step (loss, gradient, update, apply) on n leaves of {LEAF}",
            "",
            "Toy loss `sum(tanh(w_i * x))`; `packed` keeps the params in one buffer "
            "(`adam_jax.ParamPacker`) and unpacks it inside the loss.",
            "",
            "| leaves | method | trace | lower | XLA compile | total | run ms/step |",
            "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in results["train"]:
            lines.append(
                f"| {r['leaves']} | {r['method']} | {r['trace']:.2f} | {r['lower']:.2f} "
                f"| {r['compile']:.2f} | {r['total']:.2f} | {r['run_ms']:.3f} |"
            )
    if results.get("pass_split"):
        lines += [
            "",
            f"## Where the XLA compile goes, {n} leaves: HLO passes vs the rest, seconds",
            "",
            "A child process with `TF_CPP_VMODULE=hlo_pass_pipeline=1` (XLA's pass log); "
            "HLO passes = first to last pass-pipeline log line of the step's module; the "
            "rest = buffer assignment, LLVM code generation of the kernels, thunks.",
            "",
            "| method | XLA compile | HLO passes | rest | longest passes |",
            "| --- | ---: | ---: | ---: | --- |",
        ]
        for r in results["pass_split"]:
            top = ", ".join(f"{k} {v:.2f}" for k, v in r["top_passes"])
            lines.append(
                f"| {r['method']} | {r['compile']:.2f} | {r['hlo_passes']:.2f} "
                f"| {r['rest']:.2f} | {top} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="default: benchmarks/studies/results/<machine>")
    parser.add_argument("--leaves", default="125,250,500,1000")
    parser.add_argument("--_pass-log-child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._pass_log_child:
        _pass_log_child(args._pass_log_child)
        return
    device = harness.detect_device()
    machine = harness.describe_machine(device)
    counts = [int(x) for x in args.leaves.split(",")]
    results = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine,
        "versions": harness.versions(),
        "adam": adam_rows(counts),
        "kernel_leaves": max(counts),
        "kernels": kernel_rows(max(counts)),
        "train": train_rows(max(counts)),
        "pass_split": pass_split_rows(max(counts)),
    }
    report.write_pair(
        results,
        render(results),
        Path(args.out or f"benchmarks/studies/results/{machine['slug']}"),
        "compile_time",
    )


if __name__ == "__main__":
    main()
