"""Is a single-pass Adam step reachable from JAX on XLA:CPU?

One Adam step on one large float32 array must read p, g, m, v and write p, m, v:
28 B/param. XLA:CPU compiles ``tx.update`` + ``optax.apply_updates`` into three
loop fusions (m', v', then p from p, m', v'): 40 B/param. This script measures,
side by side and round-robin, formulations that might fuse better, against the
STREAM triad of :mod:`benchmarks.triad` and ``torch.optim.Adam(fused=True)``:

* ``adam_jax``, ``optax``: the libraries as users call them (reference).
* ``p_direct``: the same formula written by hand, returning the new params
  directly instead of an update (``p + (-lr) * u`` in the same expression).
* ``mv_2xN``: m and v stacked in one ``(2, N)`` state array.
* ``mv_Nx2``: m and v interleaved in one ``(N, 2)`` state array.
* ``pmv_Nx3``: p, m and v interleaved in one ``(N, 3)`` array (params owned by
  the optimizer; not a drop-in API, but the one layout where a single-output
  loop fusion writes everything).
* ``decoupled``: the params' update recomputes m' and v' from operands that are
  bitwise equal to m and v but distinct HLO values (``m * one`` with a runtime
  ``one``), so the three loops share their inputs and become siblings that
  XLA's multi-output fusion can merge.
* ``chunk_fori_<MiB>``: a ``fori_loop`` over chunks (dynamic slices, updated in
  place with ``dynamic_update_slice``) so that m' and v' stay in cache between
  the per-chunk fusions; ``chunk_map_<MiB>``: the same with ``lax.map``.
* ``ffi_cpp``: a one-pass C++ kernel called through ``jax.ffi`` (threads from
  XLA's intra-op pool),
  built at start-up with the system C++ compiler (skipped without one).
* ``torch_fused``: ``torch.optim.Adam(fused=True)`` on the same tensor.

Phases: ``default`` (XLA flags as given) and ``mof``, a child process run with
``--xla_backend_extra_options=xla_cpu_use_multi_output_fusion`` added to
``XLA_FLAGS`` (a backend extra option, not a compile option, so it cannot be
set per ``jit``). Each phase measures its own triad and torch anchor.

Every JAX variant is checked against ``adam_jax.adam`` on a small odd-sized
array (one step from random moments at step 5): bitwise equality or the max
abs difference is reported. For each JAX variant the compiled HLO is read:
the number of element-wise passes over the big arrays at the top level (or in
a while body) and the bytes per param those top-level passes move.

    python -m benchmarks.studies.single_pass            # n = 5e7, both phases
    python -m benchmarks.studies.single_pass --quick    # n = 1e6, 3 repeats: a smoke run
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adam_jax
from adam_jax._math import AmsgradMode, adam_leaf
from adam_jax._numerics import (
    Convention,
    adam_coefficients,
    one_minus,
    safe_increment,
    to_scalar,
)
from benchmarks import triad
from benchmarks.hlo import hlo_passes
from benchmarks.methods import ceil_div_time, torch

LR, B1, B2, EPS = 1e-3, 0.9, 0.999, 1e-8
MOF_FLAG = "--xla_backend_extra_options=xla_cpu_use_multi_output_fusion"
F32 = jnp.float32


# ------------------------------------------------------------------ the formula


def _coefs(count):
    """``count_inc`` and the adam_leaf keyword arguments, as ``adam_jax.adam`` makes them."""
    count_inc = safe_increment(count)
    coef = adam_coefficients(count_inc, B1, B2, convention=Convention.OPTAX, nesterov=False)
    kw = dict(
        one_minus_b1=one_minus(B1),
        one_minus_b2=one_minus(B2),
        eps=to_scalar(EPS),
        eps_root=to_scalar(0.0),
        coef=coef,
        amsgrad=AmsgradMode.OFF,
    )
    return count_inc, kw


def _leaf(g, m, v, kw):
    return adam_leaf(g, m, v, None, **kw)


def _apply(p, u):
    """``optax.apply_updates(p, -lr * u)``, the same float32 operations."""
    return p + u * jnp.asarray(-LR, F32)


def _adam_pmv(p, m, v, g, kw):
    r = _leaf(g, m, v, kw)
    return _apply(p, r.update), r.mu, r.nu


# ------------------------------------------------------------------ JAX variants


class JaxVariant:
    """A state pytree and ``state = step(state, g)``, jitted with the state donated."""

    def __init__(self, name: str, desc: str, step, pack, unpack):
        self.name, self.desc = name, desc
        self.step, self.pack, self.unpack = step, pack, unpack

    def compile(self, state, g):
        return jax.jit(self.step, donate_argnums=0).lower(state, g).compile()


def _plain(name, desc, core):
    """State ``(p, m, v, count)``; ``core(p, m, v, g, count) -> (p, m, v, count)``."""

    def pack(p, m, v, count):
        return (jnp.array(p), jnp.array(m), jnp.array(v), jnp.asarray(count, jnp.int32))

    def unpack(s):
        return tuple(np.asarray(x) for x in s[:3])

    return JaxVariant(name, desc, lambda s, g: core(*s[:3], g, s[3]), pack, unpack)


def v_optax_api(name: str, tx: optax.GradientTransformation, desc: str) -> JaxVariant:
    def pack(p, m, v, count):
        p = jnp.array(p)
        st = tx.init(p)

        # Put m, v and count into whatever state tree tx has.
        flat, tdef = jax.tree.flatten(st)
        big = [i for i, x in enumerate(flat) if x.shape == p.shape]
        cnt = [i for i, x in enumerate(flat) if x.shape == () and x.dtype == jnp.int32]
        assert len(big) == 2 and len(cnt) == 1, st
        flat[big[0]], flat[big[1]] = jnp.array(m), jnp.array(v)
        flat[cnt[0]] = jnp.asarray(count, jnp.int32)
        return (p, jax.tree.unflatten(tdef, flat))

    def unpack(s):
        big = [x for x in jax.tree.leaves(s[1]) if x.shape == s[0].shape]
        return (np.asarray(s[0]), np.asarray(big[0]), np.asarray(big[1]))

    def step(s, g):
        p, st = s
        u, st = tx.update(g, st, p)
        return (optax.apply_updates(p, u), st)

    return JaxVariant(name, desc, step, pack, unpack)


def v_p_direct() -> JaxVariant:
    def core(p, m, v, g, count):
        count_inc, kw = _coefs(count)
        return (*_adam_pmv(p, m, v, g, kw), count_inc)

    return _plain("p_direct", "hand-written, new params returned directly", core)


def v_mv_2xn() -> JaxVariant:
    def pack(p, m, v, count):
        return (jnp.array(p), jnp.array(np.stack([m, v])), jnp.asarray(count, jnp.int32))

    def unpack(s):
        return (np.asarray(s[0]), np.asarray(s[1][0]), np.asarray(s[1][1]))

    def step(s, g):
        p, mv, count = s
        count_inc, kw = _coefs(count)
        p, m, v = _adam_pmv(p, mv[0], mv[1], g, kw)
        return (p, jnp.stack([m, v]), count_inc)

    return JaxVariant("mv_2xN", "m, v stacked in one (2, N) array", step, pack, unpack)


def v_mv_nx2() -> JaxVariant:
    def pack(p, m, v, count):
        return (jnp.array(p), jnp.array(np.stack([m, v], 1)), jnp.asarray(count, jnp.int32))

    def unpack(s):
        return (np.asarray(s[0]), np.asarray(s[1][:, 0]), np.asarray(s[1][:, 1]))

    def step(s, g):
        p, mv, count = s
        count_inc, kw = _coefs(count)
        p, m, v = _adam_pmv(p, mv[:, 0], mv[:, 1], g, kw)
        return (p, jnp.stack([m, v], 1), count_inc)

    return JaxVariant("mv_Nx2", "m, v interleaved in one (N, 2) array", step, pack, unpack)


def v_pmv_nx3() -> JaxVariant:
    def pack(p, m, v, count):
        return (jnp.array(np.stack([p, m, v], 1)), jnp.asarray(count, jnp.int32))

    def unpack(s):
        return tuple(np.asarray(s[0][:, i]) for i in range(3))

    def step(s, g):
        pmv, count = s
        count_inc, kw = _coefs(count)
        out = _adam_pmv(pmv[:, 0], pmv[:, 1], pmv[:, 2], g, kw)
        return (jnp.stack(out, 1), count_inc)

    return JaxVariant("pmv_Nx3", "p, m, v interleaved in one (N, 3) array", step, pack, unpack)


def v_decoupled() -> JaxVariant:
    def core(p, m, v, g, count):
        count_inc, kw = _coefs(count)
        r = _leaf(g, m, v, kw)
        # 1.0 at run time, unknown to XLA: x * one is bitwise x but another HLO
        # value, so the params' loop reads g, m, v rather than m', v' (and
        # shares not even g * g with the moments' loops).
        one = jnp.where(count_inc > 0, jnp.float32(1), jnp.float32(0))
        rp = _leaf(g * one, m * one, v * one, kw)
        return (_apply(p, rp.update), r.mu, r.nu, count_inc)

    return _plain("decoupled", "params' loop recomputes m', v' (siblings for MOF)", core)


def v_chunk_fori(chunk: int) -> JaxVariant:
    def core(p, m, v, g, count):
        count_inc, kw = _coefs(count)
        n = p.shape[0]
        c = min(chunk, n)
        n_main = n // c * c

        def body(i, pmv):
            off = i * c
            sl = [jax.lax.dynamic_slice(x, (off,), (c,)) for x in (*pmv, g)]
            new = _adam_pmv(*sl, kw)
            dus = jax.lax.dynamic_update_slice
            return tuple(dus(x, y, (off,)) for x, y in zip(pmv, new, strict=True))

        p, m, v = jax.lax.fori_loop(0, n // c, body, (p, m, v))
        if n_main < n:
            tail = _adam_pmv(p[n_main:], m[n_main:], v[n_main:], g[n_main:], kw)
            p, m, v = (x.at[n_main:].set(y) for x, y in zip((p, m, v), tail, strict=True))
        return (p, m, v, count_inc)

    mib = chunk * 4 / 2**20
    return _plain(
        f"chunk_fori_{mib:.2g}MiB",
        f"fori_loop over {chunk}-element chunks, in-place dynamic_update_slice",
        core,
    )


def v_chunk_map(chunk: int) -> JaxVariant:
    def core(p, m, v, g, count):
        count_inc, kw = _coefs(count)
        n = p.shape[0]
        c = min(chunk, n)
        n_main = n // c * c
        xs = tuple(x[:n_main].reshape(-1, c) for x in (p, m, v, g))
        ys = jax.lax.map(lambda t: _adam_pmv(*t, kw), xs)
        out = [y.reshape(-1) for y in ys]
        if n_main < n:
            tail = _adam_pmv(p[n_main:], m[n_main:], v[n_main:], g[n_main:], kw)
            out = [jnp.concatenate([a, b]) for a, b in zip(out, tail, strict=True)]
        return (*out, count_inc)

    mib = chunk * 4 / 2**20
    return _plain(f"chunk_map_{mib:.2g}MiB", f"lax.map over ({chunk},) rows", core)


# ------------------------------------------------------------------ XLA FFI kernel

_FFI_SRC = r"""
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <thread>
#include "xla/ffi/api/ffi.h"
namespace ffi = xla::ffi;

namespace {
constexpr int64_t kBlock = 1 << 16;  // elements per work item (256 KiB per array)

struct Work {
  const float *p, *m, *v, *g;
  float *po, *mo, *vo;
  float omb1, omb2, cm, cv, eps, eps_root, neg_lr;
  int64_t n, nblocks;
  std::atomic<int64_t> next{0}, done{0};

  void Block(int64_t b) {
    const int64_t lo = b * kBlock, hi = std::min(n, lo + kBlock);
    // In place (po == p, ...): each element is read before it is written.
#pragma omp simd
    for (int64_t i = lo; i < hi; ++i) {
      const float gg = g[i];
      float mm = m[i], vv = v[i];
      mm = mm + omb1 * (gg - mm);
      vv = vv + omb2 * (gg * gg - vv);
      const float u = (cm * mm) / (std::sqrt(cv * vv + eps_root) + eps);
      po[i] = p[i] + u * neg_lr;
      mo[i] = mm;
      vo[i] = vv;
    }
  }
  void Drain() {  // claims blocks until none is left
    for (int64_t b; (b = next.fetch_add(1, std::memory_order_relaxed)) < nblocks;) {
      Block(b);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};
}  // namespace

// s = [1-b1, 1-b2, c_m, c_v, eps, eps_root, -lr]: the float32 operations of
// adam_jax's adam_leaf + optax.apply_updates, in the same order.
static ffi::Error AdamImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> p,
                           ffi::Buffer<ffi::F32> m, ffi::Buffer<ffi::F32> v,
                           ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> s,
                           ffi::ResultBuffer<ffi::F32> po, ffi::ResultBuffer<ffi::F32> mo,
                           ffi::ResultBuffer<ffi::F32> vo) {
  auto w = std::make_shared<Work>();
  const float* sc = s.typed_data();
  w->p = p.typed_data(); w->m = m.typed_data(); w->v = v.typed_data(); w->g = g.typed_data();
  w->po = po->typed_data(); w->mo = mo->typed_data(); w->vo = vo->typed_data();
  w->omb1 = sc[0]; w->omb2 = sc[1]; w->cm = sc[2]; w->cv = sc[3];
  w->eps = sc[4]; w->eps_root = sc[5]; w->neg_lr = sc[6];
  w->n = p.element_count();
  w->nblocks = (w->n + kBlock - 1) / kBlock;
  // XLA's intra-op pool runs the helpers; the caller drains too, so it never
  // waits for a helper that has not started (late helpers find nothing left).
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), w->nblocks) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([w] { w->Drain(); });
  w->Drain();
  while (w->done.load(std::memory_order_acquire) < w->nblocks) std::this_thread::yield();
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(AdamStepF32, AdamImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
"""

_CXX_FLAGS = [
    "-O3",
    "-march=native",
    "-fopenmp-simd",  # the simd pragma only: no OpenMP runtime
    "-pthread",
    "-fno-math-errno",  # lets sqrt vectorise; results unchanged
    "-ffp-contract=fast",  # FMA contraction, as XLA:CPU does: bitwise the same
    "-std=c++17",
    "-shared",
    "-fPIC",
]


def build_ffi(log: Callable[[str], None]) -> str | None:
    """Compiles and registers the kernel; returns the build time, or None (skipped)."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        log("ffi_cpp: no C++ compiler found, skipped")
        return None
    d = pathlib.Path(tempfile.mkdtemp(prefix="adam_ffi_"))
    (d / "adam.cc").write_text(_FFI_SRC)
    cmd = [cxx, *_CXX_FLAGS, f"-I{jax.ffi.include_dir()}", "adam.cc", "-o", "adam.so"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=d, capture_output=True, text=True)
    if r.returncode != 0:
        log(f"ffi_cpp: build failed, skipped:\n{r.stderr[-2000:]}")
        return None
    lib = ctypes.cdll.LoadLibrary(str(d / "adam.so"))
    jax.ffi.register_ffi_target(
        "adam_jax_bench_adam_f32", jax.ffi.pycapsule(lib.AdamStepF32), platform="cpu"
    )
    return f"{cxx} {' '.join(_CXX_FLAGS)}: {time.perf_counter() - t0:.1f} s"


def v_ffi() -> JaxVariant:
    def core(p, m, v, g, count):
        count_inc, kw = _coefs(count)
        c = kw["coef"]
        s = jnp.stack(
            [
                kw["one_minus_b1"],
                kw["one_minus_b2"],
                c.c_m,
                c.c_v,
                kw["eps"],
                kw["eps_root"],
                jnp.asarray(-LR, F32),
            ]
        ).astype(F32)
        out = jax.ffi.ffi_call(
            "adam_jax_bench_adam_f32",
            tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (p, m, v)),
            input_output_aliases={0: 0, 1: 1, 2: 2},
        )(p, m, v, g, s)
        return (*out, count_inc)

    return _plain("ffi_cpp", "C++ one-pass kernel on XLA's intra-op pool, via jax.ffi", core)


# ------------------------------------------------------------------ runners


class JaxRunner:
    def __init__(self, var: JaxVariant, p, m, v, g, count: int):
        self.name, self.desc = var.name, var.desc
        self.state = var.pack(p, m, v, count)
        self.g = jnp.array(g)
        t0 = time.perf_counter()
        self.fn = var.compile(self.state, self.g)
        self.compile_s = time.perf_counter() - t0
        self.hlo = self.fn.as_text()

    def run(self, steps: int) -> None:
        s, g, fn = self.state, self.g, self.fn
        for _ in range(steps):
            s = fn(s, g)
        self.state = jax.block_until_ready(s)

    def close(self) -> None:
        for x in jax.tree.leaves(self.state):
            x.delete()
        self.state = None


class TorchFusedRunner:
    name, desc = "torch_fused", "torch.optim.Adam(fused=True)"

    def __init__(self, p, g):
        self.p = torch.nn.Parameter(torch.from_numpy(p.copy()))
        self.p.grad = torch.from_numpy(g)
        self.opt = torch.optim.Adam([self.p], lr=LR, betas=(B1, B2), eps=EPS, fused=True)
        t0 = time.perf_counter()
        self.opt.step()  # allocates the moments
        self.compile_s = time.perf_counter() - t0
        self.hlo = None

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.opt.step()

    def close(self) -> None:
        self.opt = self.p = None


# ------------------------------------------------------------------ checks and timing


def check(variants: list[JaxVariant], n: int) -> dict[str, str]:
    """One step from random moments at step 5, compared with adam_jax.adam."""
    rng = np.random.default_rng(1)
    p, g, m = (rng.uniform(-0.01, 0.01, n).astype(np.float32) for _ in range(3))
    v = (rng.uniform(0, 1e-4, n) ** 2).astype(np.float32)
    ref_var = v_optax_api("adam_jax", adam_jax.adam(LR), "")
    s = ref_var.pack(p, m, v, 5)
    ref = ref_var.unpack(ref_var.compile(s, jnp.array(g))(s, jnp.array(g)))
    out = {}
    for var in variants:
        s = var.pack(p, m, v, 5)
        got = var.unpack(var.compile(s, jnp.array(g))(s, jnp.array(g)))
        if all(np.array_equal(a, b) for a, b in zip(got, ref, strict=True)):
            out[var.name] = "bitwise"
            continue
        parts = []
        for what, a, b in zip("pmv", got, ref, strict=True):
            ulps = np.abs(a.view(np.int32).astype(np.int64) - b.view(np.int32).astype(np.int64))
            if ulps.any():
                parts.append(f"{what} {np.count_nonzero(ulps) / n:.0%} differ")
        out[var.name] = "; ".join(parts)
    return out


def time_round_robin(runners, repeats: int, min_repeat_s: float, log) -> dict[str, list[float]]:
    steps = {}
    for r in runners:
        r.run(2)  # warm-up
        t0 = time.perf_counter()
        r.run(1)
        steps[r.name] = ceil_div_time(min_repeat_s, time.perf_counter() - t0)
    times: dict[str, list[float]] = {r.name: [] for r in runners}
    for rep in range(repeats):
        k = rep % len(runners)
        for r in runners[k:] + runners[:k]:
            t0 = time.perf_counter()
            r.run(steps[r.name])
            times[r.name].append((time.perf_counter() - t0) / steps[r.name])
        log(f"  repeat {rep + 1}/{repeats} done")
    return times


def loadavg() -> str:
    try:
        return " ".join(pathlib.Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def jax_variants(chunks: list[int], with_ffi: bool) -> list[JaxVariant]:
    vs = [
        v_optax_api("adam_jax", adam_jax.adam(LR), "adam_jax.adam(lr), per-leaf formula"),
        v_optax_api("optax", optax.adam(LR), "optax.adam(lr)"),
        v_p_direct(),
        v_mv_2xn(),
        v_mv_nx2(),
        v_pmv_nx3(),
        v_decoupled(),
    ]
    vs += [v_chunk_fori(c) for c in chunks]
    vs += [v_chunk_map(chunks[0])]
    if with_ffi:
        vs.append(v_ffi())
    return vs


def run_phase(args, phase: str) -> None:
    log = print
    n = args.n
    log(f"## phase {phase}: n = {n:,}, XLA_FLAGS = {os.environ.get('XLA_FLAGS', '')!r}")
    log(f"load average at start: {loadavg()}")
    ffi_note = build_ffi(log) if not args.no_ffi else None
    variants = jax_variants(args.chunks, ffi_note is not None)
    if ffi_note:
        log(f"ffi_cpp built: {ffi_note}")
    checks = check(variants, args.check_n)

    tri0 = triad.measure(args.triad_n, device="cpu", repeats=args.repeats, min_repeat_s=0.1)
    log(f"triad (start): {tri0['gbps']:.1f} GB/s ({tri0['best']})")

    rng = np.random.default_rng(0)
    p = rng.uniform(-0.01, 0.01, n).astype(np.float32)
    g = rng.uniform(-0.01, 0.01, n).astype(np.float32)
    zeros = np.zeros(n, np.float32)
    runners: list[Any] = []
    for var in variants:
        if args.only and not any(re.fullmatch(pat, var.name) for pat in args.only):
            continue
        runners.append(JaxRunner(var, p, zeros, zeros, g, 0))
        log(f"  compiled {var.name} in {runners[-1].compile_s:.2f} s")
    if torch is not None and not args.no_torch:
        torch.set_num_threads(len(os.sched_getaffinity(0)))
        runners.append(TorchFusedRunner(p, g))
    load_before = loadavg()
    times = time_round_robin(runners, args.repeats, args.min_repeat_ms / 1000, log)
    load_after = loadavg()
    tri1 = triad.measure(args.triad_n, device="cpu", repeats=args.repeats, min_repeat_s=0.1)
    log(f"triad (end): {tri1['gbps']:.1f} GB/s ({tri1['best']})")
    tri = max((tri0, tri1), key=lambda t: t["gbps"])
    roof = tri["roofline_mparams_per_s"]

    med = {k: float(np.median(v)) for k, v in times.items()}
    ref = med.get("adam_jax")
    tf = med.get("torch_fused")
    log("")
    log(f"### phase `{phase}`, n = {n:,} float32, {datetime.datetime.now():%Y-%m-%d %H:%M}")
    log(
        f"load average: {load_before} before timing, {load_after} after; triad "
        f"{tri0['gbps']:.1f} GB/s at start, {tri1['gbps']:.1f} at end "
        f"(best variant {tri['best']}) -> roofline {roof:.0f} Mparam/s"
    )
    log("")
    log(
        "| method | ms/step | IQR/2 | Mparam/s | of roofline | vs adam_jax | vs torch fused "
        "| passes | B/param (HLO) | check |"
    )
    log("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- |")
    for r in runners:
        t = med[r.name]
        q1, q3 = np.percentile(times[r.name], [25, 75])
        mps = n / t / 1e6
        if r.hlo is not None:
            h = hlo_passes(r.hlo, n)
            passes = f"{h['passes']}"
            bpp = f"{h['bytes_per_param']:.0f}"
            if "while_body_fusions" in h:
                passes += f" + while ({h['while_body_fusions']} fusions/chunk)"
                bpp = "n/a"  # the loop's traffic is not counted
            if h["copies"]:
                passes += f", {h['copies']} copies"
        else:
            passes, bpp = "1 (fused kernel)", "28"
        log(
            f"| {r.name} | {t * 1e3:.2f} | {(q3 - q1) / 2 * 1e3:.2f} | {mps:.0f} "
            f"| {mps / roof:.2f} | {ref / t if ref else float('nan'):.2f} "
            f"| {tf / t if tf else float('nan'):.2f} | {passes} | {bpp} "
            f"| {checks.get(r.name, '-')} |"
        )
    log("")
    if args.dump_hlo:
        d = pathlib.Path(args.dump_hlo)
        d.mkdir(parents=True, exist_ok=True)
        for r in runners:
            if r.hlo:
                (d / f"{phase}_{r.name}.txt").write_text(r.hlo)
    for r in runners:
        r.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="n = 1e6, 3 repeats")
    ap.add_argument("--n", type=int, default=None, help="array size (default 5e7)")
    ap.add_argument("--repeats", type=int, default=None, help="default 7 (3 with --quick)")
    ap.add_argument("--min-repeat-ms", type=float, default=200.0)
    ap.add_argument(
        "--chunks", default="62500,250000,1000000", help="chunk sizes (elements), divisors of n"
    )
    ap.add_argument("--phases", default="default,mof", help="default and/or mof")
    ap.add_argument("--only", default="", help="regexes of JAX variant names to run")
    ap.add_argument("--no-ffi", action="store_true")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--dump-hlo", default="", help="folder for the compiled HLO texts")
    ap.add_argument("--_child", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.n = args.n or (1_000_000 if args.quick else 50_000_000)
    args.repeats = args.repeats or (3 if args.quick else 7)
    args.triad_n = args.n
    args.check_n = 100_003
    args.chunks = [int(c) for c in args.chunks.split(",")]
    args.only = [s for s in args.only.split(",") if s]

    if args._child:
        run_phase(args, args._child)
        return
    for phase in args.phases.split(","):
        if phase == "default":
            run_phase(args, "default")
        elif phase == "mof":
            env = dict(os.environ)
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + MOF_FLAG).strip()
            argv2 = [a for a in (argv if argv is not None else sys.argv[1:])]
            subprocess.run(
                [sys.executable, "-m", "benchmarks.studies.single_pass", *argv2, "--_child", "mof"],
                env=env,
                check=True,
            )
        else:
            raise SystemExit(f"unknown phase {phase!r}")


if __name__ == "__main__":
    main()
