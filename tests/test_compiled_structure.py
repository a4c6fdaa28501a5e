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
from benchmarks.hlo import entry_kernels, hlo_passes
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
        name: sum(entry_kernels(_compiled_step_hlo(tx, params)).values())
        for name, tx in [
            ("grouped", adam_jax.adam(1e-3, layout="grouped")),
            ("auto", adam_jax.adam(1e-3)),
            ("per_leaf", adam_jax.adam(1e-3, layout="per_leaf")),
            ("optax", optax.adam(1e-3)),
        ]
    }
    # Per leaf: m, v and p each in their own loop fusion.
    assert kernels["per_leaf"] >= 3 * n_leaves, kernels
    assert kernels["optax"] >= 3 * n_leaves, kernels
    # Grouped: one kernel per leaf (slice of the flat update + apply) and a few
    # over the flat buffers.
    assert kernels["grouped"] <= n_leaves + 8, kernels
    assert kernels["auto"] == kernels["grouped"], kernels
