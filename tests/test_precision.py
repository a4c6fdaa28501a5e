"""Low-precision params: ``kahan_summation`` and ``stochastic_rounding`` (issue 15).

* Lands exactly: over generated bfloat16/float16 inputs (every magnitude from
  subnormal to near overflow, both signs, zeros, sign changes) the update
  returned makes ``optax.apply_updates`` land on the value the transform aims
  for, whenever any value of the dtype lands there; where none does, trying
  every value of the dtype that could (all within ``|target|/64`` of
  ``target - p``) proves it.
* Stochastic rounding is unbiased, reproducible, and differs per leaf and step.
* Accuracy: a least-squares fit whose late updates are below half a bfloat16
  ulp stalls in plain bfloat16 and converges with either transform (and with
  torch-optimi's ``AdamW(kahan_sum=True)`` on the same problem).
* Composition (``nnx.Optimizer``, ``MultiSteps``, ``inject_hyperparams``,
  ``shard_state``, orbax), stable state, strict promotion, clear errors, memory.

The float32 reference emulates XLA's CPU arithmetic, which flushes float32
subnormals to zero (bfloat16 subnormals are float32 subnormals); float16
subnormals are float32 normals and are exact.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

import adam_jax
from adam_jax._precision import KahanSummationState

BF16, F16 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)
LOW = [BF16, F16]


@pytest.fixture(autouse=True)
def _strict_promotion():
    """Every test here traces under strict dtype promotion (as equinox's suite does)."""
    with jax.numpy_dtype_promotion("strict"):
        yield


PRECISION = {
    "kahan": adam_jax.kahan_summation,
    "stochastic": lambda: adam_jax.stochastic_rounding(jax.random.key(7)),
}

# ----------------------------------------------------------------------------- reference

#: XLA on CPU flushes float32 subnormals to zero (inputs and results).
FTZ = float(jax.jit(lambda a, b: a * b)(np.float32(1e-40), np.float32(1.0))) == 0.0


def _ftz(x) -> np.ndarray:
    x = np.asarray(x, np.float32)
    if not FTZ:
        return x
    return np.where(np.abs(x) < np.float32(2.0**-126), np.copysign(np.float32(0.0), x), x)


def _f32(x) -> np.ndarray:
    """A low-precision array as XLA's float32 arithmetic reads it."""
    return _ftz(np.asarray(x).astype(np.float32))


def _rn(x, dtype) -> np.ndarray:
    """Round to nearest even in ``dtype`` (ml_dtypes / NumPy), as float32."""
    with np.errstate(over="ignore"):  # beyond the largest finite value: inf, as intended
        return np.asarray(x, np.float32).astype(dtype).astype(np.float32)


def _all_values(dtype) -> np.ndarray:
    """Every non-NaN value of ``dtype`` as XLA reads it, sorted."""
    values = _f32(np.arange(2**16, dtype=np.uint16).view(dtype))
    return np.unique(values[~np.isnan(values)])


def _reachable(p32: np.ndarray, targets: np.ndarray, dtype) -> np.ndarray:
    """Whether some value ``u`` of ``dtype`` makes ``rn(p + u) == target``, by trying every
    candidate. Only values within ``|target| / 64`` of ``target - p`` are tried: a ``u``
    that lands puts ``p + u`` within half an ulp of ``target``, which is less."""
    values = _all_values(dtype)
    out = []
    for p, t in zip(p32, targets, strict=True):
        d, window = np.float64(t) - np.float64(p), abs(np.float64(t)) / 64 + 1e-45
        lo, hi = np.searchsorted(values, [d - window, d + window], side="left")
        candidates = values[max(lo - 1, 0) : hi + 1]
        with np.errstate(over="ignore"):
            out.append(np.isinf(t) or bool(np.any(_rn(_ftz(p + candidates), dtype) == t)))
    return np.array(out, dtype=bool)


def _magnitudes(rng, n, dtype, top_margin=2.0) -> np.ndarray:
    fi = ml_dtypes.finfo(dtype)
    lo, hi = np.log2(float(fi.smallest_subnormal)), np.log2(float(fi.max)) - top_margin
    return 2.0 ** rng.uniform(lo, hi, n) * rng.choice([-1.0, 1.0], n)


def _inputs(dtype, n: int, seed: int, top_margin: float = 2.0):
    """``(p, u, c)`` in ``dtype``: every magnitude, signs, zeros, and steps from far below
    an ulp of ``p`` to 8 times ``p`` (sign changes); ``c`` about an ulp of ``p`` or random."""
    rng = np.random.default_rng(seed)
    fi = ml_dtypes.finfo(dtype)
    p = _magnitudes(rng, n, dtype, top_margin)
    kind = rng.integers(0, 5, n)
    ratio = 2.0 ** rng.uniform(-30, 3, n) * rng.choice([-1.0, 1.0], n)
    u = np.where(kind == 0, _magnitudes(rng, n, dtype, top_margin), p * ratio)
    u = np.where(kind == 1, p * rng.uniform(-3.5, -1.5, n), u)  # crosses zero by more than p
    c = np.where(kind == 2, _magnitudes(rng, n, dtype, top_margin), p * rng.uniform(-1, 1, n) / 256)
    p[rng.random(n) < 0.03] = 0.0
    u[rng.random(n) < 0.03] = 0.0
    p[rng.random(n) < 0.01] = -0.0
    big = float(fi.max) / 2.0**top_margin
    edges = [  # p, u: the unreachable example of the docs; largest, smallest and zero params
        (1.0, -2.0078125),
        (float(fi.max) / 4, 1.0),
        (float(fi.smallest_subnormal), 0.0),
        (-float(fi.smallest_normal), float(fi.smallest_subnormal)),
        (0.0, -0.0),
        (big, -2 * big),
    ]
    p = np.concatenate([p, [e[0] for e in edges]])
    u = np.concatenate([u, [e[1] for e in edges]])
    c = np.concatenate([c, np.zeros(len(edges))])
    clip = float(fi.max)
    return tuple(np.clip(a, -clip, clip).astype(dtype) for a in (p, u, c))


def _landed(p, u_out) -> np.ndarray:
    """Where ``optax.apply_updates`` puts ``p``."""
    return np.asarray(optax.apply_updates(jnp.asarray(p), jnp.asarray(u_out))).astype(np.float32)


def _check_lands(p32, target, landed, dtype) -> int:
    """Asserts ``landed == target`` wherever any value of ``dtype`` can land there, and
    always when ``p`` and ``target`` share a sign within a factor 2 (Sterbenz: the
    difference is exact). Returns how many targets no value of ``dtype`` reaches."""
    missed = landed != target
    sterbenz = (np.sign(p32) == np.sign(target)) & (np.abs(target) <= 2 * np.abs(p32))
    sterbenz &= np.abs(p32) <= 2 * np.abs(target)
    assert not np.any(missed & sterbenz), "missed although the difference is exact"
    reachable = _reachable(p32[missed], target[missed], dtype)
    bad = np.nonzero(missed)[0][reachable]
    assert bad.size == 0, f"reachable but missed: p={p32[bad][:5]}, target={target[bad][:5]}"
    return int(missed.sum())


def _coverage(p, p32, target, dtype) -> None:
    fi = ml_dtypes.finfo(dtype)
    sub = (p != 0) & (np.abs(p.astype(np.float64)) < float(fi.smallest_normal))
    assert sub.sum() > 20 and (p == 0).sum() > 20
    assert (np.sign(p32) * np.sign(target) < 0).sum() > 200  # sign changes
    assert (np.abs(p32) > float(fi.max) / 2**8).sum() > 20


# ----------------------------------------------------------------------------- lands exactly


@pytest.mark.parametrize("dtype", LOW, ids=lambda d: d.name)
def test_kahan_lands_exactly_and_keeps_the_exact_residual(dtype):
    """apply_updates lands on rn(p + (u + c)) whenever any value can; the new
    compensation is exactly the residual of where the param really landed."""
    p, u, c = _inputs(dtype, 4000, seed=1)
    tx = adam_jax.kahan_summation()
    state = KahanSummationState({"w": jnp.asarray(c)})
    out, new = jax.jit(tx.update)({"w": jnp.asarray(u)}, state, {"w": jnp.asarray(p)})
    u_out, c_new = out["w"], new.compensation["w"]
    assert u_out.dtype == dtype and c_new.dtype == dtype

    p32, y = _f32(p), _ftz(_f32(u) + _f32(c))
    target = _rn(_ftz(p32 + y), dtype)
    landed = _landed(p, u_out)
    _coverage(p, p32, target, dtype)
    unreachable = _check_lands(p32, target, landed, dtype)
    assert 0 < unreachable < 0.1 * len(p)  # the unreachable case is exercised, and rare
    # The compensation is the exact residual of where the param really landed.
    residual = _ftz(y - _ftz(landed - p32))
    residual = np.where(np.isfinite(residual), residual, np.float32(0.0))
    np.testing.assert_array_equal(_f32(c_new), _f32(_rn(residual, dtype)))


def _fmix32_numpy(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def _element_bits_numpy(key, shape) -> np.ndarray:
    """The documented element bits, in NumPy: fmix32 over the axes' indices, keyed."""
    s0, s1 = np.asarray(jax.random.bits(key, (2,), jnp.uint32))
    h = np.full(shape, s0, np.uint32)
    for axis, n in enumerate(shape):
        index = np.arange(n, dtype=np.uint32).reshape(
            [-1 if a == axis else 1 for a in range(len(shape))]
        )
        h = _fmix32_numpy(h ^ index)
    return _fmix32_numpy(h ^ s1)


@pytest.mark.parametrize("shape", [(1 << 16,), (256, 256), (16, 32, 128)])
def test_element_bits_are_the_documented_hash_and_look_uniform(shape):
    """Equal to the NumPy reference; every bit is set half the time, neighbours along
    each axis are uncorrelated, and another key gives other bits (n = 65,536)."""
    from adam_jax._precision import element_bits

    key = jax.random.key(5)
    bits = np.asarray(jax.jit(element_bits, static_argnums=1)(key, shape))
    np.testing.assert_array_equal(bits, _element_bits_numpy(key, shape))
    flat = bits.reshape(-1)
    ones = (flat[:, None] >> np.arange(32, dtype=np.uint32)) & 1
    sigma = 0.5 / np.sqrt(flat.size)
    assert np.all(np.abs(ones.mean(axis=0) - 0.5) < 5 * sigma)
    u = (bits >> 8).astype(np.float64) / 2**24 - 0.5
    for axis in range(len(shape)):
        a, b = np.moveaxis(u, axis, 0)[:-1], np.moveaxis(u, axis, 0)[1:]
        corr = np.mean(a * b) / np.mean(u * u)
        assert abs(corr) < 5 / np.sqrt(a.size), (axis, corr)
    other = np.asarray(element_bits(jax.random.key(6), shape))
    assert np.mean(other == bits) < 1e-3


@pytest.mark.parametrize("dtype", LOW, ids=lambda d: d.name)
def test_stochastic_rounding_lands_exactly_on_a_neighbour(dtype):
    """apply_updates lands on the neighbour of p + u that the documented draw picks."""
    p, u, _ = _inputs(dtype, 4000, seed=2, top_margin=5.0)
    key = jax.random.key(3)
    tx = adam_jax.stochastic_rounding(key)
    params = {"w": jnp.asarray(p)}
    out, _ = jax.jit(tx.update)({"w": jnp.asarray(u)}, tx.init(params), params)
    assert out["w"].dtype == dtype

    # The documented draw: element bits under fold_in(fold_in(key, step), leaf).
    leaf_key = jax.random.fold_in(jax.random.fold_in(key, 0), 0)
    bits = _element_bits_numpy(leaf_key, p.shape)
    p32 = _f32(p)
    x = _ftz(p32 + _f32(u)).astype(np.float64)
    nearest = _rn(x, dtype).astype(np.float64)

    def step(v, direction):  # the next value of dtype from v (in dtype) toward direction
        return np.nextafter(v.astype(dtype), np.asarray(direction, dtype)).astype(np.float64)

    toward = np.where(np.abs(nearest) <= np.abs(x), nearest, step(nearest, np.zeros_like(x)))
    away = np.where(toward == x, x, step(toward, np.copysign(np.inf, x)))
    with np.errstate(invalid="ignore"):
        frac = np.where(toward == x, 0.0, (np.abs(x) - np.abs(toward)) / np.abs(away - toward))
    if dtype == BF16:  # 16 random bits added below the mantissa carry with probability frac
        up = (bits >> 16).astype(np.float64) >= 2.0**16 * (1.0 - frac)
    else:  # a 24-bit uniform below frac
        up = (bits >> 8).astype(np.float64) < 2.0**24 * frac
    target = np.where(up & (frac > 0), away, toward).astype(np.float32)

    landed = _landed(p, out["w"])
    _coverage(p, p32, target, dtype)
    _check_lands(p32, target, landed, dtype)
    assert 0.2 < up[(frac > 0.25) & (frac < 0.75)].mean() < 0.8  # both neighbours occur


def test_kahan_edge_values():
    """An infinite param stays infinite, a NaN update gives a NaN param, and the
    compensation stays finite; zero updates on zero params change nothing."""
    tx = adam_jax.kahan_summation()
    p = jnp.asarray([np.inf, 1.0, 0.0, -0.0], BF16)
    u = jnp.asarray([1.0, np.nan, 0.0, 0.0], BF16)
    out, state = jax.jit(tx.update)({"w": u}, tx.init({"w": p}), {"w": p})
    new = np.asarray(optax.apply_updates(p, out["w"]), np.float32)
    assert new[0] == np.inf and np.isnan(new[1]) and new[2] == 0 and new[3] == 0
    assert np.all(np.isfinite(np.asarray(state.compensation["w"], np.float32)))


# ----------------------------------------------------------------------------- stochastic


def test_stochastic_rounding_unbiased_reproducible_per_leaf_and_step():
    """Over 4096 draws (256 rows x 16 steps) the mean of round(p + u) is p + u to 5 sigma,
    in bfloat16 and float16 (round-to-nearest would be off by up to half an ulp), and
    every draw is one of the two neighbours. The draws are a function of the key in the
    state, and differ between two leaves with equal values and between steps."""
    fractions = np.array([0.01, 0.1, 0.25, 0.5, 0.75, 0.9, -0.3, -0.05])
    rows, steps = 256, 16
    p, u, x, ulp = {}, {}, {}, {}
    for dtype, tiny in ((BF16, 1e-30), (F16, 5e-7)):  # 5e-7: a float16 subnormal
        base = np.array([3.0, -3.0, 1e-3, tiny])
        p_row = np.repeat(base, len(fractions)).astype(dtype)
        u_row = (np.tile(fractions, len(base)) * np.spacing(np.abs(p_row))).astype(dtype)
        x[dtype.name] = p_row.astype(np.float64) + u_row.astype(np.float64)
        ulp[dtype.name] = np.spacing(np.abs(x[dtype.name]).astype(dtype)).astype(np.float64)
        p[dtype.name] = jnp.asarray(np.broadcast_to(p_row, (rows, len(p_row))))
        u[dtype.name] = jnp.asarray(np.broadcast_to(u_row, (rows, len(u_row))))
    p["copy"], u["copy"], x["copy"], ulp["copy"] = (
        p["bfloat16"],
        u["bfloat16"],
        x["bfloat16"],
        ulp["bfloat16"],
    )
    tx = adam_jax.stochastic_rounding(jax.random.key(11))

    @jax.jit
    def draws(state):
        def step(state, _):
            out, state = tx.update(u, state, p)
            return state, optax.apply_updates(p, out)

        return jax.lax.scan(step, state, None, length=steps)[1]

    state = tx.init(p)
    landed = {k: np.asarray(v, np.float64) for k, v in draws(state).items()}
    for name, values in landed.items():
        values = values.reshape(-1, x[name].size)
        assert np.all(np.abs(values - x[name]) < ulp[name])
        tolerance = 5 * ulp[name] / (2 * np.sqrt(rows * steps))
        np.testing.assert_array_less(np.abs(values.mean(axis=0) - x[name]), tolerance)

    again = draws(state)
    np.testing.assert_array_equal(np.asarray(again["bfloat16"], np.float64), landed["bfloat16"])
    assert not np.array_equal(landed["bfloat16"], landed["copy"])  # per leaf
    assert not np.array_equal(landed["bfloat16"][0], landed["bfloat16"][1])  # per step
    other = draws(state._replace(key=jax.random.key_data(jax.random.key(12))))
    assert not np.array_equal(np.asarray(other["bfloat16"], np.float64), landed["bfloat16"])
    legacy = adam_jax.stochastic_rounding(jax.random.PRNGKey(11)).init(p)
    np.testing.assert_array_equal(legacy.key, state.key)  # raw key data: the same key


# ----------------------------------------------------------------------------- accuracy

LSQ_ROWS, LSQ_DIM, LSQ_STEPS, LSQ_LR = 64, 16, 2000, 1e-3


def _lsq_problem():
    """Fit w in R^16 from 3.0 to an off-grid optimum near 3 (bfloat16 ulp there: 2**-6),
    rows of X of norm ~1, so Adam's late steps (~lr = 1e-3) are below half an ulp."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((LSQ_ROWS, LSQ_DIM)) / np.sqrt(LSQ_DIM)).astype(np.float32)
    w_star = (3.0 + 0.3 * rng.standard_normal(LSQ_DIM)).astype(np.float32)
    return x, x @ w_star, w_star


def _lsq_loss(x, y, w):
    return jnp.mean((x @ w.astype(jnp.float32) - y) ** 2)


def _adamw():
    return adam_jax.adamw(LSQ_LR, weight_decay=0.0)


def test_least_squares_below_half_an_ulp():
    x, y, w_star = _lsq_problem()
    txs = {
        "plain": _adamw(),
        "kahan": optax.chain(_adamw(), adam_jax.kahan_summation()),
        "stochastic": optax.chain(_adamw(), adam_jax.stochastic_rounding(jax.random.key(0))),
    }
    w0 = jnp.full((LSQ_DIM,), 3.0, BF16)

    def run():
        def step(carry, _):
            new = {}
            for name, tx in txs.items():
                w, state = carry[name]
                u, state = tx.update(jax.grad(lambda v: _lsq_loss(x, y, v))(w), state, w)
                new[name] = (optax.apply_updates(w, u), state)
            return new, None

        start = {name: (w0, tx.init(w0)) for name, tx in txs.items()}
        final, _ = jax.lax.scan(step, start, None, length=LSQ_STEPS)
        return {name: _lsq_loss(x, y, w) for name, (w, _) in final.items()}

    loss = {k: float(v) for k, v in jax.jit(run)().items()}
    initial = float(_lsq_loss(x, y, w0))
    floor = float(_lsq_loss(x, y, jnp.asarray(w_star).astype(BF16)))  # nearest bf16 optimum
    print(
        f"least squares bf16: initial {initial:.3g}, plain {loss['plain']:.3g}, "
        f"kahan {loss['kahan']:.3g}, stochastic {loss['stochastic']:.3g}, grid floor {floor:.3g}"
    )
    assert loss["plain"] > 0.5 * initial  # plain bfloat16 stalls
    assert loss["kahan"] <= 1e-4
    assert loss["stochastic"] <= 1e-3
    assert loss["plain"] > 100 * max(loss["kahan"], loss["stochastic"])


def test_least_squares_optimi_kahan_reference():
    """The same problem with torch-optimi's AdamW(kahan_sum=True) on bfloat16 torch params
    (optimi keeps its moments in the param dtype, as adam_jax's default does)."""
    torch = pytest.importorskip("torch")
    optimi = pytest.importorskip("optimi")
    x, y, _ = _lsq_problem()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64x16 problem: threads only contend
    try:
        w = torch.full((LSQ_DIM,), 3.0, dtype=torch.bfloat16)
        w.grad = torch.zeros_like(w)
        opt = optimi.AdamW([w], lr=LSQ_LR, weight_decay=0.0, kahan_sum=True, foreach=False)
        for _ in range(LSQ_STEPS):  # the gradient of the mean squared error, by hand
            w.grad.copy_((2.0 / LSQ_ROWS) * (xt.T @ (xt @ w.float() - yt)))
            opt.step()
        loss = float(((xt @ w.float() - yt) ** 2).mean())
    finally:
        torch.set_num_threads(threads)
    print(f"least squares bf16, optimi AdamW(kahan_sum=True): {loss:.3g}")
    assert loss <= 1e-4


# ----------------------------------------------------------------------------- composition
# Each compile costs about a second on CPU, so the composition tests share one chain
# with both transforms: optax.partition sends each leaf to Kahan summation or to
# stochastic rounding (the other sees an optax.MaskedNode there), and both see a
# float32 leaf that passes through.

LABELS = {"a": "kahan", "b": "stochastic", "f": "kahan", "g": "stochastic"}


def _params(f16: bool = False):
    """bfloat16 leaves for each transform and a float32 leaf for each; with ``f16``, a
    float16 leaf for Kahan (optax.inject_hyperparams rejects bfloat16 with float16)."""
    params = {
        "a": jnp.linspace(-3.0, 3.0, 12, dtype=jnp.float32).reshape(3, 4).astype(BF16),
        "b": jnp.linspace(0.5, 4.0, 5, dtype=jnp.float32).astype(BF16),
        "f": jnp.linspace(-1.0, 1.0, 3, dtype=jnp.float32),
        "g": jnp.linspace(2.0, 3.0, 2, dtype=jnp.float32),
    }
    if f16:
        params["h"] = jnp.linspace(0.5, 2.0, 4, dtype=jnp.float32).astype(F16)
    return params


def _labels(params):
    """The label of each leaf by its top-level key (a dict or an nnx.State)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: dict(LABELS, h="kahan")[path[0].key], params
    )


def _both(first=None) -> optax.GradientTransformation:
    """``first`` (default: SGD, cheap to compile), then each leaf's precision transform."""
    split = optax.partition({k: make() for k, make in PRECISION.items()}, _labels)
    return optax.chain(first or optax.sgd(LSQ_LR), split)


def _grads(params, i):
    return jax.tree.map(lambda p: jnp.full(p.shape, 0.1 + 0.05 * i, p.dtype), params)


BOTH = _both()
BOTH_STEP = jax.jit(BOTH.update)


def _run(tx, params, steps=3, update=None):
    update = update or jax.jit(tx.update)
    state = tx.init(params)
    for i in range(steps):
        u, state = update(_grads(params, i), state, params)
        params = optax.apply_updates(params, u)
    return params, state


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _signature(tree):
    return jax.tree.structure(tree), [(x.shape, jnp.dtype(x.dtype)) for x in jax.tree.leaves(tree)]


def _moved(new, old, key):
    return not np.array_equal(np.asarray(new[key]), np.asarray(old[key]))


def test_state_stable_strict_and_same_jit_abstract():
    """One state structure eagerly, under jit and under eval_shape; update keeps dtypes
    and shapes (so lax.cond takes both states); buffers only for the half-precision
    leaves; updates in the param dtypes. (Strict promotion: the autouse fixture.)"""
    params, tx = _params(), BOTH
    state = tx.init(params)
    sig = _signature(state)
    assert _signature(jax.jit(tx.init)(params)) == sig
    assert _signature(jax.eval_shape(tx.init, params)) == sig
    u, new = BOTH_STEP(_grads(params, 0), state, params)
    assert _signature(new) == sig
    assert _signature(u) == _signature(params)
    kept = jax.jit(lambda s, n, pred: jax.lax.cond(pred, lambda: n, lambda: s))(
        state, new, jnp.asarray(True)
    )
    _assert_trees_equal(kept, new)
    stepped = optax.apply_updates(params, u)
    comp = state[1].inner_states["kahan"].inner_state.compensation
    assert comp["a"].dtype == BF16
    assert all(isinstance(comp[k], optax.MaskedNode) for k in ("b", "f", "g"))
    # 1e-4 is below half an ulp of every bfloat16 entry: it is all in the compensation.
    new_comp = new[1].inner_states["kahan"].inner_state.compensation["a"]
    assert np.all(np.asarray(new_comp, np.float32) == np.float32(jnp.asarray(-1e-4, BF16)))
    np.testing.assert_array_equal(np.asarray(stepped["a"]), np.asarray(params["a"]))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_kahan_on_a_tree_without_half_precision_leaves_is_a_pass_through(dtype):
    """Allowed, as documented: no buffers at all, and the updates come back unchanged."""
    with jax.enable_x64(dtype == jnp.float64):
        params = {"w": jnp.ones((8, 4), dtype), "b": jnp.zeros((4,), dtype)}
        tx = adam_jax.kahan_summation()
        state = tx.init(params)
        assert not [x for x in jax.tree.leaves(state) if hasattr(x, "shape") and x.size > 1]
        updates = {"w": jnp.full((8, 4), 1e-9, dtype), "b": jnp.full((4,), -3.0, dtype)}
        out, new_state = jax.jit(tx.update)(updates, state, params)
        for k in params:
            assert out[k].dtype == dtype
            np.testing.assert_array_equal(out[k], updates[k])
        assert jax.tree.structure(new_state) == jax.tree.structure(state)


def test_nnx_optimizer():
    nnx = pytest.importorskip("flax.nnx")
    start = _params()

    class Model(nnx.Module):
        def __init__(self):
            for k, v in start.items():
                setattr(self, k, nnx.Param(v))

    def loss_of(params):
        return sum(jnp.sum(v.astype(jnp.float32) ** 2) for v in params.values())

    def model_loss(model):
        return loss_of({k: getattr(model, k)[...] for k in start})

    model = Model()
    optimizer = nnx.Optimizer(model, BOTH, wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer):
        optimizer.update(model, nnx.grad(model_loss)(model))

    params, state = start, BOTH.init(start)
    grad_fn = jax.jit(jax.grad(loss_of))
    for _ in range(3):
        train_step(model, optimizer)
        u, state = BOTH_STEP(grad_fn(params), state, params)
        params = optax.apply_updates(params, u)
    for k, v in params.items():
        assert getattr(model, k)[...].dtype == v.dtype
        np.testing.assert_array_equal(np.asarray(getattr(model, k)[...]), np.asarray(v))
    assert _moved(params, start, "a") and _moved(params, start, "b")


def test_multisteps_accumulates_before_the_precision_steps():
    """MultiSteps(k=2) over pairs of equal gradients equals the chain on each pair.
    (Standard promotion: optax's MultiSteps mixes float32 and bfloat16 itself.)"""
    params = _params()
    multi = optax.MultiSteps(BOTH, every_k_schedule=2)
    with jax.numpy_dtype_promotion("standard"):
        multi_step = jax.jit(multi.update)
        state, multi_state = BOTH.init(params), multi.init(params)
        p_tx, p_multi = params, params
        for i in range(4):
            grads = _grads(params, i // 2)  # equal within a pair: their mean is exact
            u, multi_state = multi_step(grads, multi_state, p_multi)
            p_multi = optax.apply_updates(p_multi, u)
            if i % 2:
                u, state = BOTH_STEP(grads, state, p_tx)
                p_tx = optax.apply_updates(p_tx, u)
    _assert_trees_equal(p_multi, p_tx)


def test_inject_hyperparams_inside_the_chain():
    """An injected adamw (float32 hyperparameters: in bfloat16, b2 = 0.999 would round
    to 1), then the precision transforms: the same params as the plain adamw chain, and
    a changed learning rate takes effect."""
    params = {k: v for k, v in _params().items() if k in ("a", "b")}
    inject = optax.inject_hyperparams(adam_jax.adamw, hyperparam_dtype=jnp.float32)
    injected = _both(inject(LSQ_LR, weight_decay=0.0))
    step = jax.jit(injected.update)
    p_inj, state = _run(injected, params, update=step)
    p_plain, _ = _run(_both(_adamw()), params)
    _assert_trees_equal(p_inj, p_plain)
    state[0].hyperparams["learning_rate"] = jnp.asarray(0.5, jnp.float32)
    u, _ = step(_grads(params, 0), state, p_inj)
    assert float(jnp.abs(u["a"].astype(jnp.float32)).max()) > 0.1  # the new lr is used


def test_shard_state_one_device_mesh():
    mesh = jax.make_mesh((1,), ("data",))
    params = _params()
    sharded = adam_jax.shard_state(BOTH, mesh, "data")
    _assert_trees_equal(_run(sharded, params)[0], _run(BOTH, params, update=BOTH_STEP)[0])


def test_orbax_round_trip(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    params, state = _run(BOTH, _params(), steps=2, update=BOTH_STEP)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "state", state)
    target = jax.eval_shape(BOTH.init, params)
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(tmp_path / "state", target)
    _assert_trees_equal(restored, state)
    grads = _grads(params, 5)
    _assert_trees_equal(BOTH_STEP(grads, restored, params), BOTH_STEP(grads, state, params))


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("key", "error", "match"),
    [
        (0, TypeError, "PRNG key such as jax.random.key"),
        (np.zeros(2, np.float32), TypeError, "PRNG key such as jax.random.key"),
        (np.zeros(3, np.uint32), TypeError, "not key data"),
        (jax.random.split(jax.random.key(0), 2), ValueError, "single PRNG key"),
    ],
    ids=["int", "float_array", "bad_key_data", "batch"],
)
def test_stochastic_rounding_rejects_bad_keys(key, error, match):
    with pytest.raises(error, match=match):
        adam_jax.stochastic_rounding(key)


@pytest.mark.parametrize("name", sorted(PRECISION))
def test_errors_name_the_leaf(name):
    tx = PRECISION[name]()
    params = _params(f16=True)
    state = tx.init(params)
    grads = _grads(params, 0)
    with pytest.raises(ValueError, match="needs the params"):
        tx.update(grads, state)
    with pytest.raises(ValueError, match=r"missing from updates: \['h'\]"):
        tx.update({k: v for k, v in grads.items() if k != "h"}, state, params)
    bad = dict(grads, a=jnp.zeros((4, 3), BF16))
    with pytest.raises(ValueError, match=r"\['a'\].*\(4, 3\)"):
        tx.update(bad, state, params)
    with pytest.raises(TypeError, match=r"\['f8'\].*float8_e4m3fn"):
        tx.init(dict(params, f8=jnp.zeros(3, jnp.float8_e4m3fn)))
    if name == "kahan":  # a state built for other dtypes
        other = dict(params, f=params["f"].astype(BF16))
        with pytest.raises(ValueError, match=r"param \['f'\].*no buffer"):
            tx.update(_grads(other, 0), state, other)
    else:
        with pytest.raises(ValueError, match="key data of shape"):
            tx.update(grads, state._replace(key=jnp.zeros(3, jnp.uint32)), params)


# ----------------------------------------------------------------------------- memory


def test_bytes_per_param_counted_with_eval_shape():
    """bf16 params + AdamW + Kahan: 2 + 2 + 2 + 2 = 8 B/param with the default bf16
    moments, 2 + 8 + 2 = 12 B/param with float32 moments; stochastic rounding adds
    no param-sized buffer."""
    params = {"w": jax.ShapeDtypeStruct((1024, 1024), BF16)}
    n = 1024 * 1024

    def bytes_per_param(tx):
        tree = jax.eval_shape(lambda p: (p, tx.init(p)), params)
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)) / n

    f32_moments = dict(mu_dtype=jnp.float32, nu_dtype=jnp.float32)
    kahan = adam_jax.kahan_summation()
    sr = adam_jax.stochastic_rounding(jax.random.key(0))
    measured = {
        "default": bytes_per_param(optax.chain(_adamw(), kahan)),
        "f32": bytes_per_param(optax.chain(adam_jax.adamw(1e-3, **f32_moments), kahan)),
        "sr_f32": bytes_per_param(optax.chain(adam_jax.adamw(1e-3, **f32_moments), sr)),
    }
    print(f"bytes/param: {measured}")
    assert measured["default"] == pytest.approx(8.0, abs=1e-4)
    assert measured["f32"] == pytest.approx(12.0, abs=1e-4)
    assert measured["sr_f32"] == pytest.approx(10.0, abs=1e-4)
