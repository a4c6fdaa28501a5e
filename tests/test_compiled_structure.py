"""What XLA compiles for an Adam step: the reasons behind the speed claims, as tests.

Timings belong in the benchmarks; these tests read the optimized HLO of one jitted,
donated step (update + apply) instead, which is deterministic for a given XLA:

* on one large leaf, every adam_jax variant with an optax equivalent makes no more
  passes over the big arrays, and moves no more bytes per parameter, than optax
  does: on memory-bound hardware it cannot be slower by construction;
* on many small leaves, the grouped layout runs far fewer kernels than per-leaf
  Adam (3 per leaf), which is where its many-leaf speed-up comes from.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest

import adam_jax
from benchmarks.hlo import computations, entry_kernels, hlo_passes
from tests.harness import CASES

SINGLE_LEAF_CASES = [c for c in CASES if c.optax is not None and c.decay_mask is None]


def _compiled_step_hlo(tx: optax.GradientTransformation, params) -> str:
    state = tx.init(params)

    def step(p, s, g):
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    return jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params).compile().as_text()


@pytest.mark.parametrize("n", [100_000, 4_000_000])
@pytest.mark.parametrize("case", SINGLE_LEAF_CASES, ids=lambda c: c.name)
def test_single_leaf_step_moves_no_more_memory_than_optax(case, n):
    params = {"w": jnp.zeros((n,), jnp.float32)}
    ours = hlo_passes(_compiled_step_hlo(case.ours(), params), n)
    theirs = hlo_passes(_compiled_step_hlo(case.optax(), params), n)
    assert ours["passes"] >= 1 and theirs["passes"] >= 1  # the parser saw the step
    assert ours["passes"] <= theirs["passes"], (ours, theirs)
    assert ours["bytes_per_param"] <= theirs["bytes_per_param"], (ours, theirs)
    # At least p, g, m, v read and p, m, v written.
    assert ours["bytes_per_param"] >= 28


def test_grouped_step_runs_far_fewer_kernels_than_per_leaf():
    n_leaves = 64
    params = {f"p{i:02d}": jnp.zeros((100 + i,), jnp.float32) for i in range(n_leaves)}
    kernels = {
        name: entry_kernels(_compiled_step_hlo(tx, params))
        for name, tx in [
            ("grouped", adam_jax.adam(1e-3, layout="grouped")),
            ("default", adam_jax.adam(1e-3)),
            ("per_leaf", adam_jax.adam(1e-3, layout="per_leaf")),
            ("optax", optax.adam(1e-3)),
        ]
    }
    # Per leaf: m, v and p each in their own loop fusion.
    assert kernels["per_leaf"]["fusion"] >= 3 * n_leaves, kernels
    assert kernels["optax"]["fusion"] >= 3 * n_leaves, kernels
    # Grouped: one loop fusion per leaf (its piece of the flat update + apply)
    # and a few over the flat buffers. The other kernels are the int32 scalar
    # copies of the split offsets into the zero-trip while loop (opaque_int32).
    grouped = kernels["grouped"]
    assert grouped["fusion"] <= n_leaves + 8, kernels
    assert grouped["while"] == 1, kernels
    assert grouped["copy"] <= n_leaves + 1, kernels
    assert sum(grouped.values()) - grouped["copy"] <= n_leaves + 10, kernels
    assert kernels["default"] == kernels["per_leaf"], kernels


def _fused_computations_with(hlo: str, opcode: str) -> int:
    """Fused computations (kernels) of a compiled module containing ``opcode``."""
    return sum(
        any(f" {opcode}(" in line for line in lines)
        for name, lines in computations(hlo).items()
        if name.startswith("fused_computation")
    )


def test_grouped_split_uses_runtime_offsets_on_cpu():
    """Each leaf is cut from the flat update at an offset XLA cannot fold.

    With static ``slice`` offsets every leaf's kernel is distinct and XLA:CPU
    compiles each one (about 8.6 s for 1000 leaves); with ``dynamic_slice`` at
    run-time offsets, leaves of one shape share a kernel (about 2.5 s).
    """
    n_leaves = 24
    params = {f"p{i:02d}": jnp.zeros((100,), jnp.float32) for i in range(n_leaves)}
    hlo = _compiled_step_hlo(adam_jax.adam(1e-3, layout="grouped"), params)
    assert _fused_computations_with(hlo, "dynamic-slice") >= n_leaves
    assert _fused_computations_with(hlo, "slice") == 0
