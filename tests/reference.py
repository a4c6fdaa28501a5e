"""Independent float64 NumPy reference of Adam (Kingma & Ba, Algorithm 1) and its conventions.

Written from the papers and the frameworks' documented update rules, not from
adam_jax: each convention spells its own formula out. Optionally rounds the
stored params and moments to a low-precision storage dtype after every step
(arithmetic stays float64), which is what a bf16/fp16 run must reproduce.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy)
import numpy as np


@dataclasses.dataclass(frozen=True)
class RefConfig:
    """One optimizer configuration of the reference."""

    convention: str = "optax"  # "optax" | "torch" | "keras"
    lr: float = 1e-3
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    eps_root: float = 0.0
    weight_decay: float = 0.0
    decoupled: bool = True  # False: L2, added to the gradient (torch Adam)
    amsgrad: bool = False
    nesterov: bool = False
    maximize: bool = False
    bias_correction_mu: bool = True
    bias_correction_nu: bool = True
    lr_schedule: Any = None  # callable step -> lr (step counts from 0)


def _round(x: np.ndarray, dtype) -> np.ndarray:
    """Rounds to a storage dtype and back to float64/complex128 (None: no rounding)."""
    if dtype is None:
        return x
    wide = np.complex128 if np.iscomplexobj(x) else np.float64
    return x.astype(np.dtype(dtype)).astype(wide)


def _direction(cfg: RefConfig, g, m, v, v_max, t):
    """Returns (u, v_max) for step t, the formula spelled out per convention."""
    b1, b2, eps = cfg.b1, cfg.b2, cfg.eps
    bc1 = 1.0 - b1**t if cfg.bias_correction_mu else 1.0
    bc2 = 1.0 - b2**t if cfg.bias_correction_nu else 1.0
    if cfg.convention == "optax":
        if cfg.nesterov:
            bc1_next = 1.0 - b1 ** (t + 1) if cfg.bias_correction_mu else 1.0
            m_hat = b1 * m / bc1_next + (1.0 - b1) * g / bc1
        else:
            m_hat = m / bc1
        v_hat = v / bc2
        if cfg.amsgrad:
            v_max = np.maximum(v_max, v_hat)
            v_hat = v_max
        return m_hat / (np.sqrt(v_hat + cfg.eps_root) + eps), v_max
    if cfg.convention == "torch":
        # torch.optim.Adam: step_size = lr / bc1; denom = sqrt(v)/sqrt(bc2) + eps,
        # with amsgrad taking the max of the raw exp_avg_sq.
        if cfg.amsgrad:
            v_max = np.maximum(v_max, v)
            v = v_max
        return (m / bc1) / (np.sqrt(v) / np.sqrt(bc2) + eps), v_max
    if cfg.convention == "keras":
        # keras.optimizers.Adam: alpha = lr * sqrt(1 - b2^t) / (1 - b1^t);
        # p -= alpha * m / (sqrt(v) + epsilon).
        if cfg.amsgrad:
            v_max = np.maximum(v_max, v)
            v = v_max
        alpha = np.sqrt(1.0 - b2**t) / (1.0 - b1**t)
        return alpha * m / (np.sqrt(v) + eps), v_max
    raise ValueError(cfg.convention)


def reference_trajectory(
    cfg: RefConfig,
    params0: dict[str, np.ndarray],
    grads: list[dict[str, np.ndarray]],
    *,
    param_dtype=None,
    mu_dtype=None,
    nu_dtype=None,
    decay_mask: dict[str, bool] | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """Runs ``len(grads)`` steps in float64 and returns final params, mu, nu, nu_max.

    ``param_dtype``/``mu_dtype``/``nu_dtype`` emulate storage rounding (None:
    keep float64). ``decay_mask`` selects the leaves that decay.
    """
    out = {"params": {}, "mu": {}, "nu": {}, "nu_max": {}}
    for name, p0 in params0.items():
        wide = np.complex128 if np.iscomplexobj(p0) else np.float64
        p = _round(np.asarray(p0, wide), param_dtype)
        m = np.zeros_like(p)
        v = np.zeros(p.shape, np.float64)
        v_max = np.zeros(p.shape, np.float64)
        decays = cfg.weight_decay != 0.0 and (decay_mask is None or decay_mask[name])
        for step, tree in enumerate(grads):
            t = step + 1
            g = np.asarray(tree[name], wide)
            if cfg.maximize:
                g = -g
            if decays and not cfg.decoupled:
                g = g + cfg.weight_decay * p
            m = cfg.b1 * m + (1.0 - cfg.b1) * g
            v = cfg.b2 * v + (1.0 - cfg.b2) * np.abs(g) ** 2
            u, v_max = _direction(cfg, g, m, v, v_max, t)
            # The update uses the wide moments; only what is stored is rounded.
            m, v, v_max = _round(m, mu_dtype), _round(v, nu_dtype), _round(v_max, nu_dtype)
            if decays and cfg.decoupled:
                u = u + cfg.weight_decay * p
            lr = cfg.lr_schedule(step) if cfg.lr_schedule is not None else cfg.lr
            p = _round(p - lr * u, param_dtype)
        out["params"][name] = p
        out["mu"][name] = m
        out["nu"][name] = v
        out["nu_max"][name] = v_max
    return out


def make_problem(
    n_steps: int = 200,
    seed: int = 0,
    complex_: bool = False,
    zero_frac: float = 0.1,
    min_exponent: float = -6,
    param_scale: float = 1.0,
) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """A multi-leaf tree and ``n_steps`` gradients spanning 1e-6..1e2 with exact zeros.

    Each element has a fixed log-uniform magnitude in [10**min_exponent, 1e2] and a fixed
    sign, times per-step noise in [0.5, 1.5); ``zero_frac`` of the elements are
    always exactly zero and 5% more are zero at random steps. Fixed signs keep
    the moments away from cancellation, so relative errors are meaningful.
    Params are ``param_scale`` times U(0.5, 1.5) with a random sign (or phase).
    """
    rng = np.random.default_rng(seed)
    shapes = {"w": (8, 16), "b": (16,), "k": (4, 4, 3), "s": ()}

    def draw(shape):
        x = rng.uniform(0.5, 1.5, shape) * rng.choice([-1.0, 1.0], shape)
        if complex_:
            x = x * np.exp(1j * rng.uniform(0, 2 * np.pi, shape))
        return x

    params0 = {k: param_scale * draw(s) for k, s in shapes.items()}
    scale = {k: 10.0 ** rng.uniform(min_exponent, 2, s) * draw(s) for k, s in shapes.items()}
    always_zero = {k: rng.uniform(size=s) < zero_frac for k, s in shapes.items()}
    grads = []
    for _ in range(n_steps):
        tree = {}
        for k, s in shapes.items():
            g = scale[k] * rng.uniform(0.5, 1.5, s)
            g = np.where(always_zero[k] | (rng.uniform(size=s) < 0.05), 0.0, g)
            tree[k] = np.asarray(g)
        grads.append(tree)
    return params0, grads


def max_rel_error(
    x: dict[str, Any], ref: dict[str, np.ndarray], start: dict[str, np.ndarray] | None = None
) -> float:
    """Max elementwise relative error over all leaves.

    The error is ``|x - ref| / |ref|`` (``|x|`` where ``ref == 0``). With
    ``start`` (the initial params), the denominator is ``max(|ref|, |ref -
    start|)``: relative to the param or to its displacement, whichever is larger,
    so a param that crosses zero does not blow the ratio up.
    """
    worst = 0.0
    for name, r in ref.items():
        xv = np.asarray(x[name]).astype(np.complex128 if np.iscomplexobj(r) else np.float64)
        r = np.asarray(r)
        scale = np.abs(r)
        if start is not None:
            scale = np.maximum(scale, np.abs(r - np.asarray(start[name])))
        err = np.abs(xv - r) / np.where(scale == 0, 1.0, scale)
        worst = max(worst, float(np.max(err)) if err.size else 0.0)
    return worst
