"""Low-precision params: Kahan-compensated and stochastically rounded updates.

Both transforms go *last* in a chain (after the learning rate). For every
bfloat16 or float16 param they choose the final value of the param, ``t``, in
float32, and return an update ``u`` in the param dtype for which
``optax.apply_updates(p, u)`` (``p + u`` rounded to the param dtype) lands
exactly on ``t`` (whenever some value of the dtype can: see
:func:`landing_update`). Other leaves (float32, float64, ...) pass through untouched
and keep no state.

Rounding is done here in float32 arithmetic on values that are exactly
representable in the param dtype (bit operations for bfloat16, an exact
power-of-two grid for float16), never by a ``convert`` to the low-precision
dtype and back: XLA may drop such a pair (``xla_allow_excess_precision``),
which would silently turn the compensation into zero.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from adam_jax._numerics import arrays_tree, safe_increment
from adam_jax._sharding import zeros_count_like, zeros_like_param
from adam_jax._transform import check_params_given
from adam_jax._validate import match_leaves

_F32 = jnp.dtype(jnp.float32)
_BF16 = jnp.dtype(jnp.bfloat16)
_F16 = jnp.dtype(jnp.float16)
#: Param dtypes these transforms act on; wider floats pass through.
LOW_PRECISION = (_BF16, _F16)


class KahanSummationState(NamedTuple):
    """State of :func:`kahan_summation`.

    ``compensation`` is shaped like the params: for a bfloat16/float16 param
    the running rounding error :math:`c` in the param's dtype, for any other
    leaf an ``optax.MaskedNode()`` (no buffer).
    """

    compensation: Any


class StochasticRoundingState(NamedTuple):
    """State of :func:`stochastic_rounding`.

    ``key`` holds the raw data of the PRNG key (``jax.random.key_data``, uint32),
    which never changes; ``count`` is the int32 step that is folded into it.
    """

    key: jax.Array
    count: jax.Array


# ----------------------------------------------------------------------------- rounding


def _u32(value: int) -> jax.Array:
    return jnp.asarray(value, jnp.uint32)


def _f32(value: float) -> jax.Array:
    return jnp.asarray(value, _F32)


def _bf16_truncate(x: jax.Array, offset: jax.Array) -> jax.Array:
    """Adds ``offset`` (< 2**16) below bfloat16's last mantissa bit of the float32
    ``x``, then cuts the 16 low bits: the magnitude is rounded down after the
    addition. NaN stays NaN (cutting a NaN's payload could make it infinite)."""
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    cut = lax.bitcast_convert_type((bits + offset) & _u32(0xFFFF0000), _F32)
    return jnp.where(jnp.isnan(x), x, cut)


def _pow2(k: jax.Array) -> jax.Array:
    """``2.0**k`` in float32 for int32 ``-126 <= k <= 127``, built from its bits (exact)."""
    return lax.bitcast_convert_type((k + 127).astype(jnp.uint32) << 23, _F32)


def _f16_grid(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(q, s)`` with ``x = q * s`` exactly, ``s`` float16's spacing near ``x``.

    ``s = 2**(max(e, -14) - 10)`` for ``2**e <= |x| < 2**(e+1)``: the float16
    values near ``x`` are the integer multiples of ``s``. Both products by powers
    of two are exact (``s >= 2**-24`` is a float32 normal).
    """
    fi = jnp.finfo(_F16)
    biased = (lax.bitcast_convert_type(x, jnp.uint32) >> 23) & _u32(0xFF)
    k = jnp.maximum(biased.astype(jnp.int32) - 127, fi.minexp) - fi.nmant
    return x * _pow2(-k), _pow2(k)


def _f16_overflow(r: jax.Array) -> jax.Array:
    """Grid values beyond float16's largest finite value become infinities, as in float16."""
    big = jnp.abs(r) > _f32(float(jnp.finfo(_F16).max))
    return jnp.where(big, jnp.copysign(_f32(np.inf), r), r)


def _check_format(dtype) -> None:
    if jnp.dtype(dtype) not in LOW_PRECISION:
        raise TypeError(f"no float32 rounding rule for {jnp.dtype(dtype)}")


def round_nearest(x: jax.Array, dtype) -> jax.Array:
    """The float32 ``x`` rounded to nearest-even in ``dtype`` (bfloat16/float16), as float32.

    Equal to ``x.astype(dtype).astype(float32)``, but XLA cannot elide it.
    """
    _check_format(dtype)
    if jnp.dtype(dtype) == _BF16:
        bits = lax.bitcast_convert_type(x, jnp.uint32)
        return _bf16_truncate(x, _u32(0x7FFF) + ((bits >> 16) & _u32(1)))
    q, s = _f16_grid(x)
    return _f16_overflow(jnp.round(q) * s)


def round_brackets(x: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """The values of ``dtype`` next to ``x`` toward and away from zero (equal if exact)."""
    _check_format(dtype)
    if jnp.dtype(dtype) == _BF16:
        return _bf16_truncate(x, _u32(0)), _bf16_truncate(x, _u32(0xFFFF))
    q, s = _f16_grid(x)
    a = jnp.abs(q)
    largest = _f32(float(jnp.finfo(_F16).max))
    toward = jnp.where(jnp.isinf(x), x, jnp.copysign(jnp.minimum(jnp.floor(a) * s, largest), x))
    return toward, jnp.copysign(_f16_overflow(jnp.ceil(a) * s), x)


def round_stochastic(x: jax.Array, dtype, bits: jax.Array) -> jax.Array:
    r"""``x`` rounded to one of its two neighbours in ``dtype``, unbiased.

    With ``lo <= x <= hi`` the neighbours, :math:`P(hi) = (x - lo)/(hi - lo)`, so
    :math:`E[\mathrm{round}(x)] = x`; values of ``dtype`` are kept as they are.
    ``bits`` are uniform uint32 of ``x``'s shape. bfloat16: the top 16 bits are
    added below bfloat16's mantissa in ``x``'s bit pattern, which is then cut
    (exactly unbiased). float16: a 24-bit uniform ``U`` picks ``hi`` when
    ``U < (|x| - lo)/s`` (exactly unbiased above float16's smallest subnormal,
    within ``2**-48`` below it). Infinity is the value after the largest finite
    one (``x`` beyond it can round to ``inf``).
    """
    _check_format(dtype)
    if jnp.dtype(dtype) == _BF16:
        return _bf16_truncate(x, bits >> 16)
    q, s = _f16_grid(x)
    a = jnp.abs(q)
    floor = jnp.floor(a)
    uniform = (bits >> 8).astype(_F32) * _f32(2.0**-24)
    up = uniform < a - floor
    return jnp.copysign(_f16_overflow(jnp.where(up, floor + _f32(1.0), floor) * s), x)


def landing_update(p: jax.Array, t: jax.Array, dtype) -> jax.Array:
    """An update ``u`` (a value of ``dtype``, as float32) with ``round(p + u) == t``.

    ``p`` and ``t`` are values of ``dtype`` given as float32. When ``t`` and ``p``
    have one sign and are within a factor 2, ``t - p`` is exact in ``dtype``
    (Sterbenz) and is the answer. Otherwise ``t - p`` may need more bits; the
    nearest value of ``dtype`` to it, or else the other neighbour, lands on
    ``t`` whenever any value of ``dtype`` does (the values that land form an
    interval around ``t - p``). None may, when ``t - p`` needs a finer grid than
    ``p + u`` can reach (in bfloat16, ``p = 1`` and ``t = -1 - 2**-7``: every
    ``u`` near ``-2`` is a multiple of ``2**-6``); then the nearest is returned.
    ``t == p`` (infinities included) gives 0.
    """
    d = t - p
    near = round_nearest(d, dtype)
    toward, away = round_brackets(d, dtype)
    other = jnp.where(near == toward, away, toward)
    near_lands = round_nearest(p + near, dtype) == t
    other_lands = round_nearest(p + other, dtype) == t
    u = jnp.where(near_lands | ~other_lands, near, other)
    return jnp.where(t == p, jnp.zeros_like(u), u)


# ----------------------------------------------------------------------------- tree plumbing


def _is_absent(x) -> bool:
    """A leaf position without an array: ``None`` or ``optax.MaskedNode`` (``optax.masked``)."""
    return x is None or isinstance(x, optax.MaskedNode)


def _path_str(path) -> str:
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        path = path[:-1]  # an nnx.Param and its bare array have one path
    return jax.tree_util.keystr(tuple(path))


def _flatten(tree) -> tuple[list, list[str], Any]:
    """Leaves (``None``/``MaskedNode`` positions included), their paths, and the treedef."""
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_absent)
    return [x for _, x in with_paths], [_path_str(p) for p, _ in with_paths], treedef


def _tracked(leaf, path: str, name: str) -> bool:
    """Whether a param leaf gets low-precision handling (bfloat16/float16)."""
    if _is_absent(leaf):
        return False
    dtype = jnp.dtype(leaf.dtype)
    if dtype in LOW_PRECISION:
        return True
    if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4:
        raise TypeError(
            f"{name}: param {path} has dtype {dtype}; only bfloat16 and float16 params are "
            "handled (wider floats pass through). Keep it out of the tree with optax.masked."
        )
    return False


def _params_and_updates(updates, params, name: str):
    """Checked, aligned leaves of ``updates`` and ``params`` (absent positions included)."""
    check_params_given(params, name)
    updates, params = arrays_tree(updates), arrays_tree(params)
    match_leaves(updates, params, name="updates", reference_name="params")
    us, _, treedef = _flatten(updates)
    ps, paths, _ = _flatten(params)
    if len(us) != len(ps):
        raise ValueError(
            f"{name}: updates have {len(us)} leaf positions (None and MaskedNode included) "
            f"but params have {len(ps)}; give them the same tree."
        )
    return us, ps, paths, treedef


# ----------------------------------------------------------------------------- Kahan


# The per-leaf steps are jitted: under an outer jit they are inlined; an eager step
# then runs one compiled kernel per leaf instead of dispatching some 50 small ops.


@jax.jit
def _kahan_leaf(u: jax.Array, c: jax.Array, p: jax.Array) -> tuple[jax.Array, jax.Array]:
    dtype = p.dtype
    p32 = p.astype(_F32)
    y = u.astype(_F32) + c.astype(_F32)
    target = round_nearest(p32 + y, dtype)
    u_out = landing_update(p32, target, dtype)
    landed = round_nearest(p32 + u_out, dtype)  # what optax.apply_updates computes
    c_new = y - (landed - p32)
    c_new = jnp.where(jnp.isfinite(c_new), c_new, jnp.zeros_like(c_new))
    return u_out.astype(dtype), round_nearest(c_new, dtype).astype(dtype)


def kahan_summation() -> optax.GradientTransformation:
    r"""Kahan-compensated updates for bfloat16/float16 params; place it last in a chain.

    A low-precision param cannot take an update smaller than half its ulp
    (bfloat16 near 3: ulp :math:`2^{-6}`), so small steps are rounded away and
    training stalls. This transform keeps the rounding error of every step in a
    compensation buffer :math:`c` (in the param's dtype) and feeds it back:

    .. math::
      y &= u_t + c_{t-1} \\
      \theta_t &= \mathrm{rn}(\theta_{t-1} + y) \\
      c_t &= y - (\theta_t - \theta_{t-1})

    with :math:`y` and :math:`c_t` formed in float32, :math:`\mathrm{rn}`
    rounding to nearest in the param's dtype and :math:`c_t` stored in it
    (Kahan 1965). The param then holds the compensated sum to within its
    rounding, so updates far below half an ulp still add up. The returned
    update :math:`\tilde u_t` is a value of the param's dtype with
    :math:`\mathrm{rn}(\theta_{t-1} + \tilde u_t) = \theta_t` exactly, so
    ``optax.apply_updates`` (or ``nnx.Optimizer``) lands where compensated
    summation puts the param. :math:`\tilde u_t = \theta_t - \theta_{t-1}`,
    exact whenever :math:`\theta_t` is within a factor 2 of :math:`\theta_{t-1}`
    (Sterbenz), i.e. for every step smaller than half the param. Beyond that,
    when the param changes sign or size by more than a factor 2, no value of
    the param's dtype may land on :math:`\theta_t`; then the nearest update is
    used and :math:`c_t` records where the param really landed (see
    :func:`landing_update`).

    float32/float64 (and any other non-half) leaves pass through with no buffer
    (an ``optax.MaskedNode`` in the state). float8 params raise ``TypeError``.

    Memory: one extra param-sized buffer in the param's dtype (2 bytes/param;
    bfloat16 params with adamw's default bfloat16 moments: 8 bytes/param in all,
    12 with float32 moments).

    .. warning::
      It must be the last transformation before ``optax.apply_updates``:
      anything that changes the updates afterwards (scaling, clipping, another
      rounding) breaks the exact landing, and the compensation would record a
      step that was never taken.

      Compared with torch-optimi (``kahan_sum=True``, on by default there for
      bfloat16/float16 params): optimi rounds :math:`y` to the param's dtype
      before adding it (its compensation buffer receives the Adam step in
      place); here :math:`y` stays float32, one rounding fewer. bfloat16
      subnormals (below 1.2e-38) are float32 subnormals, which XLA on CPU reads
      as zero, here and in ``optax.apply_updates`` alike.

    Args: none.

    Returns:
      An ``optax.GradientTransformation`` whose ``update`` needs ``params``; its
      state is a :class:`KahanSummationState`. Updates of bfloat16/float16
      params come back in the param's dtype.

    Example:
      >>> import jax.numpy as jnp, optax, adam_jax
      >>> tx = optax.chain(optax.sgd(1e-3), adam_jax.kahan_summation())
      >>> params = {"w": jnp.full(2, 3.0, jnp.bfloat16)}
      >>> state = tx.init(params)
      >>> for _ in range(10):  # each step of -1e-3 is below bfloat16's half ulp
      ...     u, state = tx.update({"w": jnp.ones(2, jnp.bfloat16)}, state, params)
      ...     params = optax.apply_updates(params, u)
      >>> params["w"]  # 3 - 0.01, to bfloat16's nearest; plain bfloat16 would still be 3
      Array([2.98438, 2.98438], dtype=bfloat16)

    References:
      Kahan, Further remarks on reducing truncation errors, Comm. ACM 8(1), 1965.
      optimi documentation, Low Precision Training with Kahan Summation,
      https://optimi.benjaminwarner.dev
      Zamirai et al., Revisiting BFloat16 Training, arXiv:2010.06192.
    """
    name = "kahan_summation"

    def init_fn(params) -> KahanSummationState:
        leaves, paths, treedef = _flatten(arrays_tree(params))
        comps = [
            zeros_like_param(p, p.dtype) if _tracked(p, path, name) else optax.MaskedNode()
            for p, path in zip(leaves, paths, strict=True)
        ]
        return KahanSummationState(compensation=treedef.unflatten(comps))

    def update_fn(updates, state: KahanSummationState, params=None):
        us, ps, paths, treedef = _params_and_updates(updates, params, name)
        cs, _, cdef = _flatten(state.compensation)
        _check_buffers(cs, ps, paths, name)
        out_u, out_c = [], []
        for u, c, p, path in zip(us, cs, ps, paths, strict=True):
            if _tracked(p, path, name):
                u, c = _kahan_leaf(u, c, p)
            out_u.append(u)
            out_c.append(c)
        return treedef.unflatten(out_u), KahanSummationState(cdef.unflatten(out_c))

    return optax.GradientTransformation(init_fn, update_fn)


def _check_buffers(cs: list, ps: list, paths: list[str], name: str) -> None:
    """Raises ``ValueError`` naming the param whose compensation buffer does not fit."""
    if len(cs) != len(ps):
        raise ValueError(
            f"{name}: the state holds {len(cs)} compensation entries but params have "
            f"{len(ps)} leaf positions; the state was built for another tree (tx.init(params))."
        )
    for c, p, path in zip(cs, ps, paths, strict=True):
        tracked = _tracked(p, path, name)
        fits = not _is_absent(c) and tuple(np.shape(c)) == tuple(np.shape(p)) and c.dtype == p.dtype
        if tracked and not fits:
            got = "no buffer" if _is_absent(c) else f"a {c.dtype}{list(np.shape(c))} buffer"
            raise ValueError(
                f"{name}: param {path} ({p.dtype}{list(np.shape(p))}) has {got} in the state; "
                "the state was built for other params (tx.init(params))."
            )
        if not tracked and not _is_absent(c):
            raise ValueError(
                f"{name}: param {path} has dtype {getattr(p, 'dtype', None)} but the state keeps "
                "a compensation buffer for it; the state was built for other params."
            )


# ----------------------------------------------------------------------------- stochastic


def _fmix32(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finalizer: a bijection of uint32 whose output bits each
    depend on every input bit (Appleby, SMHasher)."""
    h = h ^ (h >> 16)
    h = h * _u32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * _u32(0xC2B2AE35)
    return h ^ (h >> 16)


def element_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """32 uniform bits per element of ``shape``: a keyed hash of the element's index.

    ``h = s0``; for each axis ``h = fmix32(h ^ i_axis)``; then ``fmix32(h ^ s1)``, with
    ``(s0, s1) = jax.random.bits(key, (2,))``. Elementwise on iotas, so XLA fuses it into
    the rounding loop: no param-sized temporary (``jax.random.bits`` of the leaf's shape
    held 20 bytes per param of threefry temporaries in the jitted step), and the bits
    are those of the element's global index however the leaf is sharded.
    """
    seed = jax.random.bits(key, (2,), jnp.uint32)
    h = jnp.broadcast_to(seed[0], shape)
    for axis in range(len(shape)):
        h = _fmix32(h ^ jax.lax.broadcasted_iota(jnp.uint32, shape, axis))
    return _fmix32(h ^ seed[1])


@jax.jit
def _stochastic_leaf(u: jax.Array, p: jax.Array, key: jax.Array) -> jax.Array:
    bits = element_bits(key, p.shape)
    p32 = p.astype(_F32)
    target = round_stochastic(p32 + u.astype(_F32), p.dtype, bits)
    return landing_update(p32, target, p.dtype).astype(p.dtype)


def _typed_key(key) -> jax.Array:
    """``key`` as one typed PRNG key, or a clear ``TypeError``/``ValueError``."""
    dtype = getattr(key, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
        typed = key
    elif dtype is not None and jnp.dtype(dtype) == jnp.uint32:
        try:
            typed = jax.random.wrap_key_data(key)
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"stochastic_rounding: key must be a PRNG key (jax.random.key(seed)); got "
                f"uint32 data of shape {tuple(np.shape(key))}, which is not key data: {err}"
            ) from err
    else:
        what = f"{type(key).__name__}" + (f" of dtype {dtype}" if dtype is not None else "")
        raise TypeError(
            f"stochastic_rounding: key must be a PRNG key such as jax.random.key(0), got {what}."
        )
    if typed.shape != ():
        raise ValueError(
            f"stochastic_rounding: key must be a single PRNG key, got keys of shape {typed.shape}."
        )
    return typed


def _place_like(x: jax.Array, count: jax.Array) -> jax.Array:
    """``x`` on the devices of the (concrete, committed) ``count``, replicated."""
    if isinstance(count, jax.core.Tracer) or not getattr(count, "committed", False):
        return x
    return jax.device_put(x, count.sharding)


def stochastic_rounding(key: jax.Array) -> optax.GradientTransformation:
    r"""Stochastically rounded updates for bfloat16/float16 params; place it last in a chain.

    .. math::
      \theta_t = \mathrm{sr}(\theta_{t-1} + u_t), \qquad
      \mathrm{sr}(x) = \begin{cases} \lceil x \rceil & \text{with probability }
        (x - \lfloor x \rfloor)/(\lceil x \rceil - \lfloor x \rfloor) \\
        \lfloor x \rfloor & \text{otherwise} \end{cases}

    where :math:`\lfloor x \rfloor, \lceil x \rceil` are the neighbours of the
    float32 sum :math:`x` in the param's dtype, so :math:`E[\theta_t] =
    \theta_{t-1} + u_t`: updates far below half an ulp still move the param in
    expectation (Gupta et al. 2015). The returned update is a value of the
    param's dtype with ``p + u`` rounding exactly to :math:`\theta_t` (see
    :func:`kahan_summation` for the rare exception; then the nearest update).

    Randomness: 32 bits per element from a keyed hash of the element's index
    (:func:`element_bits`: MurmurHash3's finalizer over the axes' indices, keyed by
    two words of ``jax.random.bits`` under ``fold_in(fold_in(key, step),
    leaf_index)``, ``leaf_index`` in the params' flatten order): reproducible,
    different per leaf and per step, and the same however the leaf is sharded (the
    indices are global). Being elementwise, the hash fuses into the rounding loop:
    no param-sized temporary in the jitted step (``jax.random.bits`` of the leaf's
    shape held 20 bytes per param and made the step 4x slower). No extra
    param-sized memory in the state either: it is the key and a step count.

    float32/float64 (and any other non-half) leaves pass through untouched;
    float8 params raise ``TypeError``.

    Args:
      key: one PRNG key, ``jax.random.key(seed)`` (or legacy ``jax.random.PRNGKey``
        data of the default implementation).

    Returns:
      An ``optax.GradientTransformation`` whose ``update`` needs ``params``; its
      state is a :class:`StochasticRoundingState`.

    Example:
      >>> import jax, jax.numpy as jnp, optax, adam_jax
      >>> tx = optax.chain(optax.sgd(1e-3), adam_jax.stochastic_rounding(jax.random.key(0)))
      >>> params = {"w": jnp.full(1000, 3.0, jnp.bfloat16)}
      >>> state = tx.init(params)
      >>> for _ in range(10):
      ...     u, state = tx.update({"w": jnp.ones(1000, jnp.bfloat16)}, state, params)
      ...     params = optax.apply_updates(params, u)
      >>> bool(abs(params["w"].astype(float).mean() - 2.99) < 0.005)  # plain bfloat16: 3.0
      True

    References:
      Gupta, Agrawal, Gopalakrishnan & Narayanan, Deep Learning with Limited
      Numerical Precision, ICML 2015, arXiv:1502.02551.
      Zamirai et al., Revisiting BFloat16 Training, arXiv:2010.06192.
    """
    name = "stochastic_rounding"
    typed = _typed_key(key)
    impl = jax.random.key_impl(typed)
    key_data = jax.random.key_data(typed)

    def init_fn(params) -> StochasticRoundingState:
        params = arrays_tree(params)
        leaves, paths, _ = _flatten(params)
        for p, path in zip(leaves, paths, strict=True):
            _tracked(p, path, name)  # float8 params fail here, not at the first step
        count = zeros_count_like(params)
        return StochasticRoundingState(key=_place_like(jnp.asarray(key_data), count), count=count)

    def update_fn(updates, state: StochasticRoundingState, params=None):
        us, ps, paths, treedef = _params_and_updates(updates, params, name)
        if tuple(np.shape(state.key)) != tuple(key_data.shape) or state.key.dtype != jnp.uint32:
            raise ValueError(
                f"{name}: the state's key has dtype {state.key.dtype} and shape "
                f"{tuple(np.shape(state.key))}; expected uint32 key data of shape "
                f"{tuple(key_data.shape)} (state of another transformation?)."
            )
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state.key, impl=impl), state.count)
        out = []
        for index, (u, p, path) in enumerate(zip(us, ps, paths, strict=True)):
            if _tracked(p, path, name):
                u = _stochastic_leaf(u, p, jax.random.fold_in(step_key, index))
            out.append(u)
        new_state = StochasticRoundingState(key=state.key, count=safe_increment(state.count))
        return treedef.unflatten(out), new_state

    return optax.GradientTransformation(init_fn, update_fn)
