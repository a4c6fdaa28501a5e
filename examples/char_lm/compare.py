"""Regenerates the comparison of the memory options: one chart and one markdown table.

Runs ``main.py`` once per variant (fp32; 8-bit and 4-bit moments; bfloat16 params with
Kahan summation, with stochastic rounding, and plain; optax.adamw), each in its own
process so that its peak memory is its own, then writes into ``--out``:

  compare.md    the table (final validation loss, its difference from fp32 and the target,
                optimizer-state and param bytes per param, step time, peak memory),
                with the machine and its load average
  compare.png   the validation curves of all variants
  compare.json  the numbers behind both

Usage::

  python examples/char_lm/compare.py [--steps N] [--out DIR] [--only NAME ...]
  python examples/char_lm/compare.py --report-only   # redraw from the runs in --out

Each variant is a full default run unless ``--steps`` shortens them all (same schedule
shape, fewer steps).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
for _path in (str(_HERE.parents[1]), str(_HERE.parent)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from common.plotting import Panel, Series, plot_panels  # noqa: E402

# (name, flags, target: max relative excess of the final validation loss over fp32's, or None)
VARIANTS = [
    ("fp32", [], None),
    ("8bit moments", ["--moments", "8bit"], 0.01),
    ("4bit moments", ["--moments", "4bit"], 0.02),
    ("bf16 + Kahan", ["--param-dtype", "bfloat16", "--kahan"], 0.01),
    ("bf16 + stochastic rounding", ["--param-dtype", "bfloat16", "--stochastic-rounding"], None),
    ("bf16 plain", ["--param-dtype", "bfloat16"], None),
    ("optax.adamw", ["--optimizer", "optax"], 0.005),
]


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def run_variant(name: str, flags: list[str], out: Path, steps: int | None) -> dict:
    """Runs one variant in a fresh process; returns its metrics.json record."""
    cmd = [sys.executable, str(_HERE / "main.py"), *flags, "--out", str(out / slug(name))]
    cmd += ["--overwrite", "--no-progress"]
    if steps is not None:
        cmd += ["--steps", str(steps), "--eval-every", str(max(1, steps // 6))]
        cmd += ["--warmup-steps", str(max(1, min(50, steps // 12)))]
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    print(f"[{name}] {' '.join(cmd[1:])}  (load {load:.2f})", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"[{name}] failed:\n{proc.stderr[-3000:]}")
    print(f"[{name}] {proc.stdout.strip().splitlines()[-1]} in {time.perf_counter() - t0:.0f}s")
    record = json.loads((out / slug(name) / "metrics.json").read_text())
    record["load_before"] = load
    return record


def table(rows: list[tuple[str, list[str], float | None, dict]]) -> list[str]:
    """The markdown table of the variants' results."""
    base = next(m for n, _, _, m in rows if n == "fp32")["val_loss"]
    lines = [
        "| variant | flags | final val loss (nats/byte) | vs fp32 | target | "
        "optimizer state B/param | params B/param | step time (ms) | peak RSS (MB) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, flags, target, m in rows:
        rel = m["val_loss"] / base - 1
        if name == "fp32":
            verdict = "reference"
        elif target is None:
            verdict = "reported as is"
        else:
            verdict = f"<= +{100 * target:g}%: {'met' if rel <= target else 'not met'}"
        lines.append(
            f"| {name} | `{' '.join(flags) or '(default)'}` | {m['val_loss']:.4f} | "
            f"{100 * rel:+.2f}% | {verdict} | {m['opt_state_bytes'] / m['params']:.2f} | "
            f"{m['param_bytes'] / m['params']:.0f} | {1000 * m['step_time_s']:.0f} | "
            f"{m['peak_rss_bytes'] / 2**20:.0f} |"
        )
    return lines


def report(rows, out: Path, started: float | None) -> None:
    """Writes compare.md, compare.png and compare.json into ``out``."""
    first = rows[0][3]
    steps = first["config"]["steps"]
    loads = [m.get("load_average", [float("nan")])[0] for *_, m in rows]
    header = [
        f"# Memory options on the byte-level LM ({steps} steps each)",
        "",
        f"Machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, "
        f"{first['device']}, jax {first['jax']}. 1-minute load average at the end of each run: "
        f"{', '.join(f'{x:.1f}' for x in loads)} (other jobs share the machine: step times "
        "and wall times are inflated by it, losses are not).",
        "",
        f"Data: {first['data']}.",
        "",
    ]
    if started is not None:
        header += [f"All runs took {time.time() - started:.0f} s.", ""]
    text = "\n".join(header + table(rows)) + "\n"
    (out / "compare.md").write_text(text)
    series = [
        Series([s for s, _ in m["history"]["val"]], [v for _, v in m["history"]["val"]], name, {})
        for name, _, _, m in rows
    ]
    last = [v for *_, m in rows for _, v in m["history"]["val"][-2:]]
    zoom = {"ylim": (min(last) - 0.02, max(last) + 0.05), "xlim": (steps * 0.45, None)}
    panels = [
        Panel(series, "validation loss", "step", "nats / byte"),
        Panel(
            [s._replace(style={"marker": "o"}) for s in series],
            "end of training",
            "step",
            "nats / byte",
            zoom,
        ),
    ]
    plot_panels(out / "compare.png", panels, f"byte-level LM, {steps} steps: memory options")
    record = {name: {"flags": flags, "target": target, **m} for name, flags, target, m in rows}
    (out / "compare.json").write_text(json.dumps(record, indent=1))
    print(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/char_lm_compare", help="runs and the report")
    p.add_argument("--steps", type=int, default=None, help="shorten every run to N steps")
    p.add_argument("--only", nargs="*", default=None, help="variant names to (re)run")
    p.add_argument("--report-only", action="store_true", help="redraw from existing runs")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = None if args.report_only else time.time()
    rows = []
    for name, flags, target in VARIANTS:
        path = out / slug(name) / "metrics.json"
        rerun = not args.report_only and (args.only is None or name in args.only)
        if rerun:
            metrics = run_variant(name, flags, out, args.steps)
        elif path.is_file():
            metrics = json.loads(path.read_text())
        else:
            print(f"[{name}] no run in {path.parent}, skipped", flush=True)
            continue
        rows.append((name, flags, target, metrics))
    if not any(n == "fp32" for n, *_ in rows):
        raise SystemExit("the fp32 run is needed as the reference")
    report(rows, out, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
