"""STREAM-style triad ``a = b + s * c``: the memory bandwidth that bounds Adam.

Bandwidth is counted as STREAM does, 3 arrays × 4 bytes × n per call (the
write-allocate read of ``a`` is not counted). Several implementations are
tried; the fastest defines the roofline. An fp32 Adam step moves 28 bytes
per param (reads p, g, m, v; writes p, m, v), so the roofline is BW / 28.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.methods import ceil_div_time, torch

ADAM_BYTES_PER_PARAM = 28
SCALAR = 3.0


def _jax_variant(n: int, device: str) -> tuple[Callable[[], None], Callable[[], None]]:
    dev = jax.devices("cpu" if device == "cpu" else None)[0]
    b = jnp.full((n,), 1.0, jnp.float32, device=dev)
    c = jnp.full((n,), 2.0, jnp.float32, device=dev)
    box = [jnp.zeros((n,), jnp.float32, device=dev)]
    # `a` is donated, so the output is written in place, like STREAM's a[j] = b[j] + s*c[j].
    fn = jax.jit(lambda a, b, c: b + jnp.float32(SCALAR) * c, donate_argnums=0, keep_unused=True)
    fn = fn.lower(box[0], b, c).compile()

    def call():
        box[0] = fn(box[0], b, c)
        box[0].block_until_ready()

    def free():
        for x in (box[0], b, c):
            x.delete()

    return call, free


def _torch_variant(n: int, device: str) -> tuple[Callable[[], None], Callable[[], None]]:
    dev = "cuda" if device == "gpu" else "cpu"
    a = torch.zeros(n, dtype=torch.float32, device=dev)
    b = torch.full((n,), 1.0, dtype=torch.float32, device=dev)
    c = torch.full((n,), 2.0, dtype=torch.float32, device=dev)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def call():
        torch.add(b, c, alpha=SCALAR, out=a)
        sync()

    return call, lambda: None


def _numpy_variant(n: int, device: str) -> tuple[Callable[[], None], Callable[[], None]]:
    a = np.zeros(n, np.float32)
    b = np.full(n, 1.0, np.float32)
    c = np.full(n, 2.0, np.float32)
    s = np.float32(SCALAR)

    def call():  # two passes over memory, single thread: a lower bound
        np.multiply(c, s, out=a)
        np.add(a, b, out=a)

    return call, lambda: None


VARIANTS: dict[str, tuple[str, Callable[..., Any]]] = {
    "jax_jit": ("jax.jit(b + s*c), output donated into a, one fused pass", _jax_variant),
    "torch_add_out": ("torch.add(b, c, alpha=s, out=a), multithreaded", _torch_variant),
    "numpy_2pass": ("numpy multiply + add with out=a (2 passes, 1 thread)", _numpy_variant),
}


def measure(n: int, *, device: str, repeats: int, min_repeat_s: float) -> dict[str, Any]:
    """Runs every available variant; returns GB/s per variant and the best.

    Variants are interleaved (round-robin within each repeat, as the Adam
    methods are); each repeat makes enough calls to last ``min_repeat_s``.
    The median repeat is reported, and the best repeat too (STREAM's choice).
    """
    bytes_per_call = 3 * 4 * n
    live: dict[str, Any] = {}
    for name, (desc, make) in VARIANTS.items():
        if name == "torch_add_out" and torch is None:
            continue
        if name == "numpy_2pass" and device != "cpu":  # host memory is not the bound there
            continue
        call, free = make(n, device)
        call()
        t0 = time.perf_counter()
        call()
        live[name] = (desc, call, free, ceil_div_time(min_repeat_s, time.perf_counter() - t0))
    times: dict[str, list[float]] = {name: [] for name in live}
    for _ in range(repeats):
        for name, (_, call, _, calls) in live.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                call()
            times[name].append((time.perf_counter() - t0) / calls)
    variants: dict[str, Any] = {}
    for name, (desc, _, free, calls) in live.items():
        free()
        variants[name] = {
            "description": desc,
            "gbps_median": bytes_per_call / float(np.median(times[name])) / 1e9,
            "gbps_best": bytes_per_call / min(times[name]) / 1e9,
            "calls_per_repeat": calls,
        }
    best = max(variants, key=lambda k: variants[k]["gbps_median"])
    gbps = variants[best]["gbps_median"]
    return {
        "n": n,
        "bytes_counted_per_call": bytes_per_call,
        "variants": variants,
        "best": best,
        "gbps": gbps,
        "roofline_mparams_per_s": gbps * 1e9 / ADAM_BYTES_PER_PARAM / 1e6,
    }
