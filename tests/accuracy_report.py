"""Prints the max relative error of every configuration against the float64 reference.

Run: ``python -m tests.accuracy_report``. Columns: ours and optax (same case,
float32, 200 steps, gradients 1e-6..1e2 with exact zeros), and for the torch
conventions, real torch and ours against torch.
"""

from __future__ import annotations

import pytest

from tests.harness import CASES, run_trajectory
from tests.reference import make_problem, max_rel_error, reference_trajectory


def main() -> None:
    params0, grads = make_problem()
    try:
        from tests.test_torch import TORCH_CASES, torch_trajectory
    except (ImportError, pytest.skip.Exception):  # torch absent: importorskip skips
        TORCH_CASES, torch_trajectory = {}, None
    print("| config | adam_jax vs f64 | optax vs f64 | torch vs f64 | adam_jax vs torch |")
    print("| --- | --- | --- | --- | --- |")
    for case in CASES:
        ref = reference_trajectory(case.ref, params0, grads, decay_mask=case.decay_mask)
        ours, _ = run_trajectory(case.ours(), params0, grads)
        row = [case.name, f"{max_rel_error(ours, ref['params'], params0):.2e}"]
        if case.optax is not None:
            theirs, _ = run_trajectory(case.optax(), params0, grads)
            row.append(f"{max_rel_error(theirs, ref['params'], params0):.2e}")
        else:
            row.append("—")
        if case.name in TORCH_CASES:
            torch_params = torch_trajectory(case.name, params0, grads)
            row.append(f"{max_rel_error(torch_params, ref['params'], params0):.2e}")
            row.append(f"{max_rel_error(ours, torch_params, params0):.2e}")
        else:
            row += ["—", "—"]
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
