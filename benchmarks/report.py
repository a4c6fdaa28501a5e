"""Writes a run's results as ``results.json``, ``results.md`` and ``throughput.png``.

:func:`write_pair` is the same for the smaller studies (``distributed``,
``compile_time``): ``<stem>.json`` and ``<stem>.md`` side by side.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable
from typing import Any

_GIB = 1024**3


def _num(x: float | None) -> str:
    if x is None:
        return "—"
    ax = abs(x)
    if ax >= 100:
        return f"{x:.0f}"
    if ax >= 10:
        return f"{x:.1f}"
    if ax >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def _method_names(results: dict[str, Any]) -> list[str]:
    names = list(results["methods"])
    return [n for n in names if any(n in s["results"] for s in results["shapes"])]


def _table(headers: list[str], rows: list[list[str]], align_right_from: int = 1) -> str:
    sep = ["---" if i < align_right_from else "---:" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _shape_table(
    results: dict[str, Any], cell: Callable[[dict[str, Any]], str], *, bold_best: str | None = None
) -> str:
    names = _method_names(results)
    headers = ["shape", "leaves", "params", *names]
    rows = []
    for s in results["shapes"]:
        cells = []
        best = None
        if bold_best is not None and s["results"]:
            best = max(s["results"], key=lambda n: s["results"][n][bold_best])
        for n in names:
            r = s["results"].get(n)
            text = cell(r) if r is not None else "—"
            cells.append(f"**{text}**" if n == best else text)
        rows.append([s["label"], str(s["leaves"]), f"{s['params']:,}", *cells])
    return _table(headers, rows, align_right_from=1)


def _paired_cell(r: dict[str, Any]) -> str:
    p = r.get("paired_vs_optax")
    if p is None:
        return "—"
    return f"{_num(p['median'])} [{_num(p['lo'])}, {_num(p['hi'])}]"


def _bytes(x: int | None) -> str:
    return "—" if x is None else f"{x / _GIB:.2f} GiB"


def markdown(results: dict[str, Any]) -> str:
    m, v, tr = results["machine"], results["versions"], results["triad"]
    names = _method_names(results)
    out: list[str] = []
    add = out.append
    add(f"# Adam step benchmark — {m['slug']}\n")
    add(f"- Date (UTC): {results['started_utc']} → {results['finished_utc']}")
    add(f"- Command: `{results['command']}`")
    dev = m.get("gpu") or f"{m['cpu_model']}, {m['cpu_cores']} cores"
    ram = _bytes(m["ram_bytes"])
    add(f"- Machine: {m['device'].upper()}: {dev}; RAM {ram}; {m['platform']}")
    add(
        "- Versions: "
        + ", ".join(f"{k} {val}" for k, val in v.items() if val is not None)
        + f", Python {m['python']}"
    )
    la, lb = results["loadavg_start"], results["loadavg_end"]
    add(
        f"- Load average (1/5/15 min) at start {la[0]:.2f}/{la[1]:.2f}/{la[2]:.2f}, "
        f"at end {lb[0]:.2f}/{lb[1]:.2f}/{lb[2]:.2f}"
    )
    if results.get("note"):
        add(f"- Note: {results['note']}")
    cfg = results["config"]
    add(
        f"- Timing: {cfg['timing']}; {cfg['repeats']} repeats of ≥ {cfg['min_repeat_s'] * 1e3:.0f}"
        " ms each; compile time excluded (reported below); torch threads: "
        f"{cfg['torch_threads']}"
    )
    add(
        f"- Memory bandwidth (STREAM triad, best variant `{tr['best']}`): **{tr['gbps']:.1f} GB/s**"
        f" → fp32 Adam roofline {tr['gbps']:.1f} GB/s / {tr['adam_bytes_per_param']} B/param = "
        f"**{tr['roofline_mparams_per_s']:.0f} Mparam/s**"
    )
    if "env" in cfg:
        env = ", ".join(f"`{k}={val}`" for k, val in cfg["env"].items() if val is not None)
        add(f"- Environment: {env or 'none of ' + ', '.join(cfg['env']) + ' set'}")
    if results["skipped_methods"]:
        add(f"- Methods not available: {results['skipped_methods']}")
    add("")
    add("## Throughput, Mparam/s (higher is better; best per row in bold)\n")
    add(_shape_table(results, lambda r: _num(r["mparams_per_s"]), bold_best="mparams_per_s"))
    add("\n## Speed-up vs optax (time_optax / time_method; > 1 is faster than optax.adam)\n")
    add(_shape_table(results, lambda r: _num(r.get("ratio_vs_optax"))))
    add(
        "\n## Paired speed-up vs optax, with a 95 % interval\n\n"
        "Median over repeats of the per-repeat ratio time_optax / time_method (methods run "
        "round-robin within a repeat, so this cancels drift between repeats), and in "
        "brackets the 2.5-97.5 percentile bootstrap interval of that median. "
        "`optax_again`, when present, is a second optax.adam runner: its row is the "
        "noise of this run (an A/A control).\n"
    )
    add(_shape_table(results, _paired_cell))
    add("\n## Speed-up vs torch fused (time_torch_fused / time_method)\n")
    add(_shape_table(results, lambda r: _num(r.get("ratio_vs_torch_fused"))))
    add(
        f"\n## Fraction of the roofline ({tr['roofline_mparams_per_s']:.0f} Mparam/s)\n\n"
        "Above 1 where the working set fits in cache (small shapes), and for in-place kernels "
        "such as torch fused: the triad writes a separate array and pays a write-allocate read "
        "that STREAM does not count, which an in-place Adam update does not pay "
        "(see benchmarks/README.md).\n"
    )
    add(_shape_table(results, lambda r: f"{r['roofline_fraction']:.2f}"))
    add("\n## ms per step (median; ± half the interquartile range, % of the median)\n")
    add(
        _shape_table(
            results,
            lambda r: f"{_num(r['ms_per_step'])} ±{r['iqr_pct'] / 2:.0f}%",
        )
    )
    add(
        "\n## Compile and first-call time, s\n\n"
        "JAX methods: trace + lower + compile of the jitted step (`jit(...).lower(...).compile()`)."
        " Torch methods: the first `opt.step()`, which allocates the moments.\n"
    )

    def setup_cell(r: dict[str, Any]) -> str:
        s = r["setup"]
        return _num(s.get("lower_compile_s", s.get("first_step_s")))

    add(_shape_table(results, setup_cell))
    add("\n## Peak memory per shape\n")
    if m["device"] == "cpu":
        scope = results["shapes"][0]["memory"]["peak_scope"] if results["shapes"] else ""
        add(
            "Process peak RSS while the shape ran (all its methods live at once, as they are "
            f"interleaved; scope: {scope}), and RSS after its buffers were freed. A per-method "
            "peak cannot be separated in one process.\n"
        )
        columns = {"peak RSS": "peak_rss_bytes", "RSS after free": "rss_or_in_use_after_free_bytes"}
    else:
        add("JAX `peak_bytes_in_use` (process lifetime) and torch peak allocated (per shape).\n")
        columns = {"JAX peak": "jax_peak_bytes_in_use", "torch peak": "torch_peak_bytes"}
    rows = [
        [s["label"], f"{s['params']:,}"]
        + [_bytes(s["memory"].get(key)) for key in columns.values()]
        + [str(len(s["groups"]))]
        for s in results["shapes"]
    ]
    add(_table(["shape", "params", *columns, "method groups"], rows))
    skipped = {s["name"]: s["skipped"] for s in results["shapes"] if s["skipped"]}
    if skipped:
        add(f"\nSkipped per shape: {skipped}")
    e2e = results.get("end_to_end")
    if e2e:
        add(
            f"\n## End to end: MNIST CNN train step (forward + backward + update), "
            f"batch {e2e['batch']}, jitted\n\nModel: `{e2e['model']}`, {e2e['params']:,} params.\n"
        )
        rows = [
            [
                n,
                _num(r["ms_per_step"]),
                f"±{r['iqr_pct'] / 2:.0f}%",
                _num(r["ratio_vs_optax"]),
                _num(r["compile_s"]),
            ]
            for n, r in e2e["results"].items()
        ]
        add(_table(["optimizer", "ms/step", "± IQR/2", "speed-up vs optax", "compile s"], rows))
    add("\n## Memory bandwidth (triad) variants, GB/s (median repeat; best repeat)\n")
    rows = []
    for when in ("start", "end"):
        for name, var in tr[when]["variants"].items():
            rows.append(
                [
                    when,
                    f"`{name}`",
                    var["description"],
                    f"{var['gbps_median']:.1f}",
                    f"{var['gbps_best']:.1f}",
                ]
            )
    add(_table(["when", "variant", "what", "GB/s", "best GB/s"], rows, align_right_from=3))
    add(f"\nArray length n = {tr['start']['n']:,}; bytes counted per call = 3 × 4 × n.")
    add("\n## Methods\n")
    for n in names:
        add(f"- `{n}`: {results['methods'][n]}")
    add("")
    return "\n".join(out)


def plot(results: dict[str, Any], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = _method_names(results)
    fig, ax = plt.subplots(figsize=(11.5, 6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    tree_markers = "sDv^P*Xph"
    trees = [s for s in results["shapes"] if s["kind"] == "tree"]
    for i, n in enumerate(names):
        color = colors[i % len(colors)]
        leaf = [s for s in results["shapes"] if s["kind"] == "leaf" and n in s["results"]]
        leaf.sort(key=lambda s: s["params"])
        xs = [s["params"] for s in leaf]
        ys = [s["results"][n]["mparams_per_s"] for s in leaf]
        ax.plot(xs, ys, "o-", color=color, label=n)
        for j, s in enumerate(trees):
            if n in s["results"]:
                y = s["results"][n]["mparams_per_s"]
                ax.plot(s["params"], y, tree_markers[j % len(tree_markers)], color=color, ms=8)
    for j, s in enumerate(trees):
        ax.plot([], [], tree_markers[j % len(tree_markers)], color="gray", label=s["label"])
    tr = results["triad"]
    ax.axhline(
        tr["roofline_mparams_per_s"],
        color="black",
        ls="--",
        label=f"roofline: triad {tr['gbps']:.1f} GB/s / 28 B",
    )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("params in the tree")
    ax.set_ylabel("Mparam/s (one full Adam step)")
    ax.set_title(
        f"Adam step throughput — {results['machine']['slug']}\n"
        "lines: one leaf of n params; markers: multi-leaf trees"
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def rerender(out_dir: pathlib.Path, *, png: bool = True) -> list[pathlib.Path]:
    """Rewrites results.md (and the plot) from an existing results.json."""
    results = json.loads((out_dir / "results.json").read_text())
    return write(results, out_dir, png=png)


def write(
    results: dict[str, Any], out_dir: pathlib.Path, *, png: bool = True
) -> list[pathlib.Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "results.json", out_dir / "results.md"]
    paths[0].write_text(json.dumps(results, indent=1) + "\n")
    paths[1].write_text(markdown(results))
    if png:
        paths.append(out_dir / "throughput.png")
        plot(results, paths[-1])
    return paths


def write_pair(
    results: dict[str, Any], markdown_text: str, out_dir: pathlib.Path, stem: str
) -> None:
    """Writes ``<stem>.json`` and ``<stem>.md`` to ``out_dir`` and prints the markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(results, indent=2))
    (out_dir / f"{stem}.md").write_text(markdown_text)
    print(markdown_text)
