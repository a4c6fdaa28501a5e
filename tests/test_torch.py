"""Real PyTorch trajectories: torch.optim.Adam/AdamW run here, 200 steps, float32."""

from __future__ import annotations

import numpy as np
import pytest

from tests.harness import CASES_BY_NAME, LR, WD, run_trajectory
from tests.reference import make_problem, max_rel_error, reference_trajectory

torch = pytest.importorskip("torch", reason="torch is not installed (CI installs torch==2.13.0)")

TORCH_CASES = {
    "torch_adam": (torch.optim.Adam, dict(lr=LR)),
    "torch_adam_l2": (torch.optim.Adam, dict(lr=LR, weight_decay=WD)),
    "torch_amsgrad": (torch.optim.Adam, dict(lr=LR, amsgrad=True)),
    "torch_maximize": (torch.optim.Adam, dict(lr=LR, maximize=True)),
    "torch_adamw": (torch.optim.AdamW, dict(lr=LR, weight_decay=WD)),
}


def torch_trajectory(name, params0, grads):
    """Runs the real torch optimizer (single-tensor path) and returns final params."""
    cls, kwargs = TORCH_CASES[name]
    tensors = {k: torch.tensor(np.asarray(v, np.float32)) for k, v in params0.items()}
    for t in tensors.values():
        t.requires_grad_(True)
    opt = cls(list(tensors.values()), foreach=False, **kwargs)
    for g in grads:
        for k, t in tensors.items():
            t.grad = torch.tensor(np.asarray(g[k], np.float32))
        opt.step()
    return {k: t.detach().numpy().astype(np.float64) for k, t in tensors.items()}


@pytest.mark.parametrize("name", sorted(TORCH_CASES))
def test_matches_real_torch_trajectory(name):
    params0, grads = make_problem()
    theirs = torch_trajectory(name, params0, grads)
    ours, _ = run_trajectory(CASES_BY_NAME[name].ours(), params0, grads)
    assert max_rel_error(ours, theirs, params0) < 1e-5


@pytest.mark.parametrize("name", sorted(TORCH_CASES))
def test_torch_itself_matches_our_reference_of_its_convention(name):
    """Guards the reference: torch agrees with the float64 torch-convention formula."""
    params0, grads = make_problem()
    theirs = torch_trajectory(name, params0, grads)
    case = CASES_BY_NAME[name]
    ref = reference_trajectory(case.ref, params0, grads, decay_mask=case.decay_mask)
    assert max_rel_error(theirs, ref["params"], params0) < 2e-5


def test_torch_amsgrad_differs_from_optax_amsgrad():
    """The conventions really differ: max of raw v (torch) vs of corrected v (optax)."""
    params0, grads = make_problem()
    torch_like, _ = run_trajectory(CASES_BY_NAME["torch_amsgrad"].ours(), params0, grads)
    optax_like, _ = run_trajectory(CASES_BY_NAME["amsgrad"].ours(), params0, grads)
    assert max_rel_error(torch_like, optax_like, params0) > 1e-4
