"""Timing harness: every method of a shape set up side by side, then timed round-robin.

Per shape: build the tree deterministically, set every method up (JAX:
lower + compile, timed and reported apart; torch: the first step, which
allocates the moments), warm up, choose for each method a number of steps
per repeat that lasts at least ``min_repeat_s``, then run ``repeats``
rounds; in each round every method runs once (in a seeded random order), so load
from elsewhere hits all methods alike. Reported: the median over repeats of
the per-step time.
"""

from __future__ import annotations

import ctypes
import dataclasses
import datetime
import gc
import math
import os
import pathlib
import platform
import re
import subprocess
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax

import adam_jax
from benchmarks import methods as methods_mod
from benchmarks import mnist_model, shapes, triad
from benchmarks.methods import Inputs, Method, Runner, median, torch

_GIB = 1024**3
# Environment that changes timings; recorded with the results.
_ENV_KEYS = (
    "OMP_WAIT_POLICY",
    "OMP_NUM_THREADS",
    "XLA_FLAGS",
    "JAX_PLATFORMS",
    "XLA_PYTHON_CLIENT_PREALLOCATE",
)


@dataclasses.dataclass
class Config:
    shapes: list[shapes.Shape]
    methods: list[Method]
    skipped_methods: dict[str, str]
    device: str = "cpu"
    repeats: int = 7
    min_repeat_s: float = 0.05
    max_steps: int = 100_000
    triad_n: int = 50_000_000
    e2e: bool = True
    e2e_layouts: list[Any] = dataclasses.field(default_factory=list)
    memory_fraction: float = 0.9
    torch_threads: int | None = None  # None: the number of cores
    command: str = ""
    note: str = ""
    log: Callable[[str], None] = print


# ---------------------------------------------------------------- machine


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def detect_device() -> str:
    return "gpu" if any(d.platform in ("gpu", "cuda", "rocm") for d in jax.devices()) else "cpu"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _proc_bytes(path: str, key: str) -> int | None:
    """A ``key: N kB`` line of a /proc file, in bytes (None where there is no /proc)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _meminfo(key: str) -> int | None:
    return _proc_bytes("/proc/meminfo", key)


def machine_slug(device: str) -> str:
    if device == "cpu":
        return f"cpu-{cpu_count()}core"
    kind = jax.devices()[0].device_kind
    return re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-") or "gpu"


def describe_machine(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": device,
        "slug": machine_slug(device),
        "cpu_model": _cpu_model(),
        "cpu_cores": cpu_count(),
        "ram_bytes": _meminfo("MemTotal"),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    if device == "gpu":
        info["gpu"] = jax.devices()[0].device_kind
    return info


def _git_describe() -> str | None:
    """The checkout's commit, with ``-dirty`` when the working tree has changes."""
    root = pathlib.Path(adam_jax.__file__).resolve().parents[1]
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def versions() -> dict[str, str | None]:
    import flax
    import jaxlib

    return {
        "adam_jax": adam_jax.__version__,
        "adam_jax_git": _git_describe(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "optax": optax.__version__,
        "flax": flax.__version__,
        "numpy": np.__version__,
        "torch": methods_mod.torch_version(),
    }


# ---------------------------------------------------------------- memory


class PeakMemory:
    """Peak memory per shape.

    CPU: the process's peak RSS (VmHWM), reset before each shape through
    ``/proc/self/clear_refs`` where the kernel allows it; otherwise the peak
    since the process started (``resource.ru_maxrss``). Methods of a shape
    share one process, so the peak is the shape's, not any one method's.
    GPU: torch's peak (reset per shape) and JAX's ``peak_bytes_in_use``
    (since the process started; JAX has no reset).
    """

    def __init__(self, device: str):
        self.device = device
        self.resettable = device == "cpu" and self._reset_hwm()

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    @staticmethod
    def _status(key: str) -> int | None:
        return _proc_bytes("/proc/self/status", key)

    def reset(self) -> None:
        if self.device == "cpu":
            if self.resettable:
                self._reset_hwm()
        elif torch is not None and torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def read(self) -> dict[str, Any]:
        if self.device == "cpu":
            peak = self._status("VmHWM") if self.resettable else None
            if peak is None:
                import resource

                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            return {
                "peak_rss_bytes": peak,
                "peak_scope": "shape" if self.resettable else "process lifetime",
            }
        stats = jax.devices()[0].memory_stats() or {}
        out: dict[str, Any] = {
            "jax_peak_bytes_in_use": stats.get("peak_bytes_in_use"),
            "peak_scope": "torch: shape; jax: process lifetime",
        }
        if torch is not None and torch.cuda.is_available():
            out["torch_peak_bytes"] = torch.cuda.max_memory_allocated()
        return out

    def current(self) -> int | None:
        if self.device == "cpu":
            return self._status("VmRSS")
        stats = jax.devices()[0].memory_stats() or {}
        return stats.get("bytes_in_use")

    def available(self) -> int:
        """Bytes that new buffers may use now (host RAM or device memory)."""
        if self.device == "cpu":
            return _meminfo("MemAvailable") or 8 * _GIB
        stats = jax.devices()[0].memory_stats() or {}
        in_use = stats.get("bytes_in_use", 0)
        if torch is not None and torch.cuda.is_available():
            # Device-free memory plus what JAX's pool holds but does not use.
            return torch.cuda.mem_get_info()[0] + max(stats.get("bytes_reserved", 0) - in_use, 0)
        return stats.get("bytes_limit", 16 * _GIB) - in_use


def _release_free_heap() -> None:
    """Returns freed heap pages to the OS (glibc), so the next shape's RSS starts clean."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


# ---------------------------------------------------------------- timing


def _time_run(runner: Any, steps: int) -> float:
    t0 = time.perf_counter()
    runner.run(steps)
    return time.perf_counter() - t0


def calibrate(runner: Any, min_repeat_s: float, max_steps: int) -> int:
    """Warms up, then returns a step count whose run lasts at least ``min_repeat_s``."""
    runner.run(1)
    steps, t = 1, _time_run(runner, 1)
    while t < min_repeat_s and steps < max_steps:
        steps = min(max_steps, max(2 * steps, math.ceil(steps * 1.2 * min_repeat_s / t)))
        t = _time_run(runner, steps)
    return steps


#: Untimed pause after each torch repeat. torch's OpenMP threads (libgomp, default
#: wait policy) spin for a while after a parallel region and take CPU from whatever
#: runs next: measured on 2 cores, the method timed right after torch_fused ran
#: 3-11 % slower than the same program elsewhere in the order (A/A: optax_again).
#: In a cyclic order that method is always the same one (the first of the list,
#: adam_jax), so the bias was systematic. Sleeping lets the threads park; torch's
#: own timing is untouched (its threads spin between its own steps).
TORCH_COOLDOWN_S = 0.1


def repeat_order(n: int, rep: int) -> list[int]:
    """The order of the runners in repeat ``rep``: a permutation fixed by ``rep``.

    Random, not cyclic, so no method always runs right after the same other one
    (whatever a method leaves behind, spinning threads or a cold cache, lands on
    a different successor every repeat); seeded, so a rerun uses the same orders.
    """
    return [int(i) for i in np.random.default_rng(rep).permutation(n)]


def round_robin(runners: list[Any], steps: dict[str, int], repeats: int) -> dict[str, list[float]]:
    """Seconds per step, one entry per repeat; each repeat runs every runner once."""
    times: dict[str, list[float]] = {r.name: [] for r in runners}
    for rep in range(repeats):
        for r in (runners[i] for i in repeat_order(len(runners), rep)):
            times[r.name].append(_time_run(r, steps[r.name]) / steps[r.name])
            if getattr(r, "family", None) == "torch":
                time.sleep(TORCH_COOLDOWN_S)
    return times


def _summary(seconds: list[float], n_params: int, steps: int) -> dict[str, Any]:
    t = median(seconds)
    q25, q75 = np.percentile(seconds, [25, 75])
    return {
        "ms_per_step": t * 1e3,
        "mparams_per_s": n_params / t / 1e6,
        "iqr_pct": float((q75 - q25) / t * 100),
        "steps_per_repeat": steps,
        "repeat_ms_per_step": [s * 1e3 for s in seconds],
    }


def plan_groups(runners: list[Runner], tree_bytes: int, budget: int) -> list[list[Runner]]:
    """Splits the runners into consecutive groups whose estimated memory fits ``budget``."""
    groups: list[list[Runner]] = [[]]
    used = 0
    for r in runners:
        need = r.bytes_needed(tree_bytes)
        if groups[-1] and used + need > budget:
            groups.append([])
            used = 0
        groups[-1].append(r)
        used += need
    return groups


# ---------------------------------------------------------------- one shape


def bench_shape(shape: shapes.Shape, cfg: Config, memory: PeakMemory) -> dict[str, Any]:
    log = cfg.log
    spec = shape.build()
    n_params, n_leaves = shapes.count_params(spec), shapes.count_leaves(spec)
    log(f"[{shape.name}] {n_leaves} leaves, {n_params:,} params")
    memory.reset()
    inputs = Inputs(
        shapes.materialize(spec, seed=0, scale=0.02),
        shapes.materialize(spec, seed=1, scale=0.02),
        cfg.device,
    )
    tb = inputs.tree_bytes
    budget = int(cfg.memory_fraction * memory.available()) - 3 * tb  # grads, flat grads, source
    runners = [m.make() for m in cfg.methods]
    groups = plan_groups(runners, tb, max(budget, 0))
    if len(groups) > 1:
        log(f"  memory: {len(groups)} groups: {[[r.name for r in g] for g in groups]}")
    results: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for gi, group in enumerate(groups):
        live: list[Runner] = []
        for r in group:
            try:
                info = r.setup(inputs)
            except Exception as e:  # a method that cannot run here is reported, not fatal
                skipped[r.name] = f"setup failed: {type(e).__name__}: {e}"[:300]
                log(f"  {r.name}: {skipped[r.name]}")
                r.close()
                continue
            results[r.name] = {"setup": info, "group": gi}
            live.append(r)
            log(f"  {r.name}: set up {', '.join(f'{k}={v:.3f}' for k, v in info.items())}")
        if gi == len(groups) - 1:
            inputs.drop_source_params()
        steps: dict[str, int] = {}
        for r in list(live):
            try:
                steps[r.name] = calibrate(r, cfg.min_repeat_s, cfg.max_steps)
            except Exception as e:
                skipped[r.name] = f"run failed: {type(e).__name__}: {e}"[:300]
                results.pop(r.name, None)
                live.remove(r)
                r.close()
        times = round_robin(live, steps, cfg.repeats) if live else {}
        for r in live:
            results[r.name].update(_summary(times[r.name], n_params, steps[r.name]))
            r.close()
        if len(groups) > 1:
            gc.collect()
    inputs.close()
    del inputs
    gc.collect()
    _release_free_heap()
    mem = memory.read()
    mem["rss_or_in_use_after_free_bytes"] = memory.current()
    for name, res in results.items():
        log(f"  {name:>24}: {res['ms_per_step']:9.3f} ms/step {res['mparams_per_s']:9.1f} Mparam/s")
    return {
        "name": shape.name,
        "label": shape.label,
        "kind": shape.kind,
        "leaves": n_leaves,
        "params": n_params,
        "groups": [[r.name for r in g] for g in groups],
        "memory": mem,
        "results": results,
        "skipped": skipped,
    }


# ---------------------------------------------------------------- end to end


class _TrainRunner:
    """An MNIST CNN train step (forward, backward, update) as a runner."""

    def __init__(self, name: str, tx: optax.GradientTransformation):
        self.name = name
        jitted, self.params, self.state, (self.x, self.y) = mnist_model.make_train_step(tx)
        t0 = time.perf_counter()
        self.fn = jitted.lower(self.params, self.state, self.x, self.y).compile()
        self.compile_s = time.perf_counter() - t0

    def run(self, steps: int) -> None:
        params, state = self.params, self.state
        for _ in range(steps):
            params, state, loss = self.fn(params, state, self.x, self.y)
        self.params, self.state, _ = jax.block_until_ready((params, state, loss))


def end_to_end(cfg: Config) -> dict[str, Any]:
    txs = {"adam_jax": adam_jax.adam(1e-3), "optax": optax.adam(1e-3)}
    for value in cfg.e2e_layouts:
        txs[f"adam_jax[layout={value}]"] = adam_jax.adam(1e-3, layout=value)
    source = mnist_model.resolve().source
    runners = [_TrainRunner(name, tx) for name, tx in txs.items()]
    steps = {r.name: calibrate(r, cfg.min_repeat_s, cfg.max_steps) for r in runners}
    times = round_robin(runners, steps, cfg.repeats)
    n_params = shapes.count_params(mnist_model.param_shapes())
    out: dict[str, Any] = {
        "model": source,
        "batch": mnist_model.BATCH,
        "params": n_params,
        "results": {},
    }
    for r in runners:
        res = _summary(times[r.name], n_params, steps[r.name])
        res.pop("mparams_per_s")
        res["compile_s"] = r.compile_s
        out["results"][r.name] = res
    t_optax = out["results"]["optax"]["ms_per_step"]
    for res in out["results"].values():
        res["ratio_vs_optax"] = t_optax / res["ms_per_step"]
    cfg.log(
        "[e2e] "
        + ", ".join(f"{k}: {v['ms_per_step']:.3f} ms/step" for k, v in out["results"].items())
    )
    return out


# ---------------------------------------------------------------- whole run


def paired_ratio(
    ref_times: list[float], times: list[float], *, n_boot: int = 2000, seed: int = 0
) -> dict[str, float]:
    """Median over repeats of ``ref_time / time``, with a 95 % bootstrap interval.

    Methods run round-robin within each repeat, so repeat ``i`` of two methods ran
    a few hundred ms apart: the per-repeat ratio cancels the machine's drift
    between repeats, which the ratio of two medians does not. The interval is the
    2.5-97.5 percentile range of the median over ``n_boot`` resamples of the
    repeats (fixed seed, so a rerun of the report gives the same figures).
    """
    ratios = np.asarray(ref_times, dtype=np.float64) / np.asarray(times, dtype=np.float64)
    rng = np.random.default_rng(seed)
    resampled = rng.choice(ratios, size=(n_boot, ratios.size), replace=True)
    boot = np.median(resampled, axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"median": float(np.median(ratios)), "lo": float(lo), "hi": float(hi)}


def add_ratios(shape_result: dict[str, Any], roofline: float) -> None:
    res = shape_result["results"]
    for ref, key in (("optax", "ratio_vs_optax"), ("torch_fused", "ratio_vs_torch_fused")):
        for r in res.values():
            r[key] = res[ref]["ms_per_step"] / r["ms_per_step"] if ref in res else None
    ref = res.get("optax")
    for r in res.values():
        # Only methods timed in the same round-robin group as optax are paired.
        same_group = ref is not None and r.get("group") == ref.get("group")
        if same_group and len(r["repeat_ms_per_step"]) == len(ref["repeat_ms_per_step"]):
            r["paired_vs_optax"] = paired_ratio(ref["repeat_ms_per_step"], r["repeat_ms_per_step"])
    for r in res.values():
        r["roofline_fraction"] = r["mparams_per_s"] / roofline


def run(cfg: Config) -> dict[str, Any]:
    log = cfg.log
    started = datetime.datetime.now(datetime.UTC)
    load_start = os.getloadavg()
    busy = load_start[0] > 0.5 * cpu_count()
    if torch is not None and busy and "OMP_WAIT_POLICY" not in os.environ:
        log(
            f"warning: load average {load_start[0]:.1f} on {cpu_count()} cores; torch's OpenMP "
            "threads spin-wait and slow down badly under contention: consider "
            "OMP_WAIT_POLICY=PASSIVE (see benchmarks/README.md)"
        )
    torch_threads = cfg.torch_threads or cpu_count()
    methods_mod.set_torch_threads(torch_threads)
    memory = PeakMemory(cfg.device)
    log(f"device={cfg.device}; methods: {[m.name for m in cfg.methods]}")
    if cfg.skipped_methods:
        log(f"skipped: {cfg.skipped_methods}")
    triad_kw = dict(device=cfg.device, repeats=cfg.repeats, min_repeat_s=cfg.min_repeat_s)
    triad_start = triad.measure(cfg.triad_n, **triad_kw)
    log(f"[triad] {triad_start['gbps']:.1f} GB/s ({triad_start['best']})")
    shape_results = [bench_shape(s, cfg, memory) for s in cfg.shapes]
    triad_end = triad.measure(cfg.triad_n, **triad_kw)
    log(f"[triad, end] {triad_end['gbps']:.1f} GB/s ({triad_end['best']})")
    best = max((triad_start, triad_end), key=lambda t: t["gbps"])
    roofline = best["roofline_mparams_per_s"]
    for sr in shape_results:
        add_ratios(sr, roofline)
    e2e = end_to_end(cfg) if cfg.e2e else None
    finished = datetime.datetime.now(datetime.UTC)
    return {
        "schema_version": 1,
        "started_utc": started.isoformat(timespec="seconds"),
        "finished_utc": finished.isoformat(timespec="seconds"),
        "wall_s": (finished - started).total_seconds(),
        "command": cfg.command,
        "note": cfg.note,
        "loadavg_start": list(load_start),
        "loadavg_end": list(os.getloadavg()),
        "machine": describe_machine(cfg.device),
        "versions": versions(),
        "config": {
            "repeats": cfg.repeats,
            "min_repeat_s": cfg.min_repeat_s,
            "learning_rate": methods_mod.LEARNING_RATE,
            "torch_threads": torch_threads if torch is not None else None,
            "env": {k: os.environ.get(k) for k in _ENV_KEYS},
            "timing": "median over repeats of (repeat wall time / steps per repeat); "
            "methods interleaved round-robin within each repeat",
        },
        "methods": {m.name: m.description for m in cfg.methods},
        "skipped_methods": cfg.skipped_methods,
        "triad": {
            "start": triad_start,
            "end": triad_end,
            "gbps": best["gbps"],
            "best": best["best"],
            "roofline_mparams_per_s": roofline,
            "adam_bytes_per_param": triad.ADAM_BYTES_PER_PARAM,
        },
        "shapes": shape_results,
        "end_to_end": e2e,
    }
