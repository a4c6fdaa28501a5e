"""The pure pytree transforms: ``scale_by_adam`` and its strict-dtype helpers."""

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike, DTypeLike

from adam_jax._layout import (
    DEFAULT_MAX_GROUPED_SIZE,
    GroupedMoments,
    GroupPlan,
    Layout,
    check_layout,
    grouped_zeros,
    make_plan,
    use_grouped_plan,
)
from adam_jax._math import AmsgradMode, adam_leaf
from adam_jax._numerics import (
    Convention,
    SharedScalars,
    adam_coefficients,
    arrays_tree,
    cast_scalar,
    compute_dtype,
    evaluate_schedule,
    one_minus,
    real_dtype,
    safe_increment,
    to_scalar,
)
from adam_jax._sharding import zeros_count_like, zeros_like_param
from adam_jax._state import AdamState, AmsgradState, ScheduleState, WeightDecaySchedule
from adam_jax._storage import (
    MomentsArg,
    QuantizedMoments,
    clip_update,
    decode,
    encode_like,
    init_moment,
    is_quantized,
    logical_view,
    resolve_moments,
    step_bound,
    unwrap_quantized,
)
from adam_jax._validate import (
    check_adam_hyperparams,
    check_inexact_leaves,
    check_non_negative,
    check_static_bool,
    check_storage_dtype,
    match_leaves,
)

ScalarOrSchedule = optax.ScalarOrSchedule


def _canonical_dtype(dtype: DTypeLike | None):
    if dtype is None:
        return None
    return jax.dtypes.canonicalize_dtype(dtype)


def default_nu_dtype(param_dtype) -> jnp.dtype:
    """Storage dtype of ``nu`` when ``nu_dtype=None``: the param's real dtype, but
    float32 for float16 params.

    float16's smallest subnormal is 6e-8, so ``(1 - b2) * g**2`` underflows to 0
    for every ``|g| < 7.7e-3`` at ``b2 = 0.999``; the update ``m / (0 + eps)`` is
    then up to ``1e8`` times too large and overflows float16. bfloat16 has
    float32's range and keeps its own dtype, as in optax.
    """
    dtype = real_dtype(param_dtype)
    return jnp.dtype(jnp.float32) if dtype == jnp.float16 else dtype


def default_mu_dtype(param_dtype) -> jnp.dtype:
    """Storage dtype of ``mu`` when ``mu_dtype=None``: the param dtype, but float32 for
    float16 params, so that both moments of a leaf have the same precision.

    With ``mu`` in float16 and ``nu`` in float32, zero gradients make ``0.9 * m``
    round back to ``m`` once ``m`` is a few subnormal ulps (it stalls near
    2.4e-7) while ``v`` keeps decaying, so ``m / sqrt(v)`` grows without bound:
    20,000 zero gradients after one gradient of 1e-2 moved a float16 param by
    -22 instead of -0.006.
    """
    dtype = jnp.dtype(param_dtype)
    return jnp.dtype(jnp.float32) if dtype == jnp.float16 else dtype


def eager_plan(gs, ms, vs) -> GroupPlan | None:
    """A plan that concatenates the small leaves for one eager (un-jitted) step, or ``None``.

    Leaves share a buffer when their gradient, ``mu`` and ``nu`` dtypes agree;
    ``None`` when nothing would share one, or when the leaves live on
    different devices (then the step runs per leaf, as under ``jit``).
    """
    if len(gs) < 2:
        return None
    dtypes = [
        ("quantized", i)
        if is_quantized(m) or is_quantized(v)
        else (jnp.dtype(m.dtype).name, jnp.dtype(v.dtype).name)
        for i, (m, v) in enumerate(zip(ms, vs, strict=True))
    ]
    try:
        plan = make_plan(list(gs), group_fn=lambda path, _: dtypes[path[0].idx])
    except ValueError:
        return None
    return plan if plan.has_groups else None


def _amsgrad_mode(amsgrad: bool, convention: Convention) -> AmsgradMode:
    if not amsgrad:
        return AmsgradMode.OFF
    return AmsgradMode.CORRECTED if convention is Convention.OPTAX else AmsgradMode.RAW


def scale_by_adam_with_convention(
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    eps_root: ArrayLike = 0.0,
    mu_dtype: DTypeLike | None = None,
    *,
    nesterov: bool = False,
    amsgrad: bool = False,
    nu_dtype: DTypeLike | None = None,
    convention: Convention = Convention.OPTAX,
    bias_correction_mu: bool = True,
    bias_correction_nu: bool = True,
    layout: Layout = "per_leaf",
    max_grouped_size: int = DEFAULT_MAX_GROUPED_SIZE,
    moments: MomentsArg = None,
) -> optax.GradientTransformation:
    """:func:`scale_by_adam` with the convention and bias-correction switches exposed.

    Used by the aliases and by :mod:`adam_jax.compat`; see :func:`scale_by_adam`.
    """
    quant = resolve_moments(moments)
    if quant is not None and (mu_dtype is not None or nu_dtype is not None):
        raise ValueError(
            f"moments={moments!r} sets how mu and nu are stored; it cannot be combined with "
            "mu_dtype/nu_dtype (leaves too small to quantize keep float32 moments). Pass one "
            "or the other."
        )
    if quant is not None:
        # Grouped buffers hold only leaves too small to quantize; every larger leaf
        # is its own part, quantized exactly as in the per-leaf layout.
        max_grouped_size = min(max_grouped_size, quant.min_size - 1)
    check_adam_hyperparams(b1, b2, eps, eps_root)
    check_storage_dtype("mu_dtype", mu_dtype)
    check_storage_dtype("nu_dtype", nu_dtype)
    for flag_name, flag in (
        ("nesterov", nesterov),
        ("amsgrad", amsgrad),
        ("bias_correction_mu", bias_correction_mu),
        ("bias_correction_nu", bias_correction_nu),
    ):
        check_static_bool(flag_name, flag)
    if nesterov and convention is Convention.KERAS:
        raise ValueError("nesterov=True is not defined for the Keras convention.")
    mu_dtype = _canonical_dtype(mu_dtype)
    nu_dtype = _canonical_dtype(nu_dtype)
    ams_mode = _amsgrad_mode(amsgrad, convention)
    check_layout(layout)

    def mu_dtype_of(param_dtype):
        return mu_dtype or default_mu_dtype(param_dtype)

    def nu_dtype_of(param_dtype):
        return nu_dtype or default_nu_dtype(param_dtype)

    if quant is not None:
        # Leaves too small to quantize keep float32 moments (float64 for float64).
        def mu_dtype_of(param_dtype):
            return compute_dtype(param_dtype)

        def nu_dtype_of(param_dtype):
            return real_dtype(compute_dtype(param_dtype))

    def zero_moment(p, dtype_of, codec_of):
        if quant is not None and quant.eligible(p):
            return init_moment(p, codec_of(quant, p.shape))
        return zeros_like_param(p, dtype_of(p.dtype))

    def init_fn(params) -> AdamState | AmsgradState:
        params = arrays_tree(params)
        check_inexact_leaves(params, name="params")
        plan = use_grouped_plan(params, layout, max_grouped_size)

        def zeros(dtype_of, codec_of=None):
            if plan is not None:
                if quant is None:
                    return grouped_zeros(params, plan, dtype_of)
                leaves = [zero_moment(p, dtype_of, codec_of) for p in jax.tree.leaves(params)]
                return GroupedMoments(plan.gather(leaves), plan)
            moments = jax.tree.map(lambda p: zero_moment(p, dtype_of, codec_of), params)
            return moments if quant is None else unwrap_quantized(moments)

        count = zeros_count_like(params)
        if amsgrad:
            return AmsgradState(
                count=count,
                mu=zeros(mu_dtype_of, QuantizedMoments.mu_codec),
                nu=zeros(nu_dtype_of, QuantizedMoments.nu_codec),
                nu_max=zeros(nu_dtype_of, QuantizedMoments.nu_codec),
            )
        return AdamState(
            count=count,
            mu=zeros(mu_dtype_of, QuantizedMoments.mu_codec),
            nu=zeros(nu_dtype_of, QuantizedMoments.nu_codec),
        )

    def scalars_for(dtype, count_inc) -> dict:
        """The per-step scalars of ``adam_leaf``, formed in ``dtype`` (float32/float64)."""
        coef = adam_coefficients(
            count_inc,
            b1,
            b2,
            convention=convention,
            nesterov=nesterov,
            bias_correction_mu=bias_correction_mu,
            bias_correction_nu=bias_correction_nu,
            dtype=dtype,
        )
        return dict(
            coef=coef,
            one_minus_b1=one_minus(b1, dtype),
            one_minus_b2=one_minus(b2, dtype),
            eps=to_scalar(eps, dtype),
            eps_root=to_scalar(eps_root, dtype),
        )

    def bound_for(dtype, count_inc):
        s = scalars_for(dtype, count_inc)
        return step_bound(s["coef"], s["one_minus_b1"], s["one_minus_b2"], count_inc)

    def update_fn(updates, state: AdamState | AmsgradState, params=None):
        del params
        updates = arrays_tree(updates)
        grouped = isinstance(state.mu, GroupedMoments)
        reference = state.mu.plan.signature if grouped else state.mu
        if quant is not None and not grouped:
            reference = logical_view(state.mu)
        gs = match_leaves(
            updates, reference, name="grads", reference_name="the params of the optimizer state"
        )
        treedef = jax.tree.structure(updates)
        check_inexact_leaves(updates, name="grads")
        count_inc = safe_increment(state.count)
        # Under jit the count is traced; eagerly every op dispatches on its own,
        # so the grouped split takes the cheapest eager form (see GroupPlan.scatter).
        eager = not isinstance(state.count, jax.core.Tracer)
        scalars = SharedScalars(lambda dtype: scalars_for(dtype, count_inc))
        bounds = SharedScalars(lambda dtype: bound_for(dtype, count_inc))

        vmax_leaves = jax.tree.leaves(state.nu_max, is_leaf=is_quantized) if amsgrad else None
        if grouped:
            plan = state.mu.plan
            gs = plan.gather(gs)
            ms, vs = state.mu.buffers, state.nu.buffers
            vmaxs = state.nu_max.buffers if amsgrad else [None] * len(gs)
        else:
            ms, mu_def = jax.tree.flatten(state.mu, is_leaf=is_quantized)
            vs, nu_def = jax.tree.flatten(state.nu, is_leaf=is_quantized)
            vmaxs = vmax_leaves if amsgrad else [None] * len(gs)
            # Eagerly, every jnp op dispatches on its own (tens of microseconds):
            # run the math once on a concatenation of the small leaves instead
            # of once per leaf. Elementwise, so the values are the per-leaf ones.
            plan = eager_plan(gs, ms, vs) if eager else None
            if plan is not None:
                gs, ms, vs = plan.gather(gs), plan.gather(ms), plan.gather(vs)
                vmaxs = plan.gather(vmaxs) if amsgrad else [None] * len(gs)
        out_u, out_m, out_v, out_vmax = [], [], [], []
        for g, m, v, vmax in zip(gs, ms, vs, vmaxs, strict=True):
            # Quantized moments: decode to float32, the same math, encode the new ones.
            stored = (m, v, vmax)
            res = adam_leaf(
                g, decode(m), decode(v), decode(vmax), amsgrad=ams_mode, **scalars[g.dtype]
            )
            update = res.update
            if quant is not None and quant.clip and any(is_quantized(x) for x in stored):
                update = clip_update(update, bounds[g.dtype])
            out_u.append(update.astype(g.dtype))
            out_m.append(encode_like(res.mu, m))
            out_v.append(encode_like(res.nu, v))
            out_vmax.append(None if vmax is None else encode_like(res.nu_max, vmax))

        if grouped:

            def pack_mu(xs):
                return GroupedMoments(xs, plan)

            pack_nu = pack_mu
            if eager:
                out_u = plan.scatter(out_u)
            else:
                # Materialise the flat update before splitting it: without the
                # barrier XLA fuses every slice with the whole update expression
                # (and its concatenation), which is quadratic to compile. The
                # step count is the run-time value that keeps the split offsets
                # opaque (one compiled kernel per leaf shape on CPU; see
                # opaque_int32).
                out_u = plan.scatter(jax.lax.optimization_barrier(out_u), state.count)
        else:
            if plan is not None:
                out_u, out_m, out_v = plan.scatter(out_u), plan.scatter(out_m), plan.scatter(out_v)
                out_vmax = plan.scatter(out_vmax) if amsgrad else out_vmax
            # The moments keep the state's own structure (it may wrap leaves,
            # e.g. nnx.Param, that the gradients carry bare).
            pack_mu, pack_nu = mu_def.unflatten, nu_def.unflatten
        if amsgrad:
            new_state = AmsgradState(
                count=count_inc, mu=pack_mu(out_m), nu=pack_nu(out_v), nu_max=pack_nu(out_vmax)
            )
        else:
            new_state = AdamState(count=count_inc, mu=pack_mu(out_m), nu=pack_nu(out_v))
        return treedef.unflatten(out_u), new_state

    return optax.GradientTransformation(init_fn, update_fn)


def scale_by_adam(
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    eps_root: ArrayLike = 0.0,
    mu_dtype: DTypeLike | None = None,
    *,
    nesterov: bool = False,
    amsgrad: bool = False,
    nu_dtype: DTypeLike | None = None,
    layout: Layout = "per_leaf",
    moments: MomentsArg = None,
) -> optax.GradientTransformation:
    r"""Rescales updates by Adam's bias-corrected moment ratio (optax convention).

    .. math::
      m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t \\
      v_t &= \beta_2 v_{t-1} + (1-\beta_2) |g_t|^2 \\
      \hat m_t &= m_t / (1-\beta_1^t), \quad \hat v_t = v_t / (1-\beta_2^t) \\
      u_t &= \hat m_t / (\sqrt{\hat v_t + \epsilon_{root}} + \epsilon)

    With ``nesterov=True`` (NAdam, Dozat 2016) :math:`\hat m_t = \beta_1 m_t /
    (1-\beta_1^{t+1}) + (1-\beta_1) g_t / (1-\beta_1^t)`. With ``amsgrad=True``
    (Reddi et al., 2018) :math:`\hat v_t` is replaced by its running maximum,
    taken of the bias-corrected value as optax does.

    All arithmetic is float32 (complex64 for complex leaves); the scalars
    :math:`1-\beta^t` are float32 whatever the param dtype. The returned update
    has the gradient's dtype; the moments keep their storage dtypes.

    Args:
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      eps: added to :math:`\sqrt{\hat v}` (outside the root), >= 0.
      eps_root: added to :math:`\hat v` inside the root, >= 0; use > 0 when
        differentiating through the update (meta-learning).
      mu_dtype: storage dtype of ``mu``; ``None`` uses the param dtype.
      nesterov: use Nesterov momentum (NAdam).
      amsgrad: keep the running maximum of :math:`\hat v` (AMSGrad).
      nu_dtype: storage dtype of ``nu`` (and of the AMSGrad maximum); ``None``
        uses the real dtype of the param, except float32 for float16 params
        (see :func:`default_nu_dtype`; optax keeps float16 and underflows).
        optax has no such option.
      layout: ``"per_leaf"`` (default) keeps moments shaped like the params:
        the state is optax's, whatever the machine. ``"grouped"`` concatenates
        leaves of at most 2**15 elements with equal dtype (and not known to be
        sharded) into flat buffers: 3-4x faster per step on 1000 small leaves
        on CPU, bitwise equal results, but ``mu``/``nu`` are
        :class:`GroupedMoments` (use :func:`adam_jax.state_to_tree` to inspect or
        save them layout-free). To differentiate through the update
        (meta-gradients) on many leaves, ``"per_leaf"`` is faster.
      moments: how ``mu`` and ``nu`` are stored. ``None`` or ``"fp32"`` (default):
        arrays in ``mu_dtype``/``nu_dtype``, optax's state. ``"8bit"``: blockwise
        8-bit dynamic quantization (bitsandbytes-style, blocks of 256, about 2
        bytes per param); ``"4bit"``: 4-bit states (Li et al., 2023; about 1
        byte per param); or a :class:`adam_jax.QuantizedMoments` for custom
        settings. Quantized leaves hold :class:`adam_jax.QuantizedArray` (uint8
        codes, fp32 scales); leaves under 4096 elements keep float32 moments.
        The update is computed from the new moments before they are quantized,
        and clipped to fp32 Adam's largest possible step. Cannot be combined
        with ``mu_dtype``/``nu_dtype``. :func:`adam_jax.state_to_tree` gives
        the decoded float32 moments.

    Returns:
      An ``optax.GradientTransformation`` whose state is optax's own
      ``optax.ScaleByAdamState`` (``optax.ScaleByAmsgradState`` with AMSGrad).

    Example:
      >>> import jax.numpy as jnp, adam_jax
      >>> tx = adam_jax.scale_by_adam()
      >>> state = tx.init({"w": jnp.zeros(3)})
      >>> u, state = tx.update({"w": jnp.ones(3)}, state)
      >>> u["w"].round(5)  # first step: m_hat = g, v_hat = g**2, so u = g / (|g| + eps)
      Array([1., 1., 1.], dtype=float32)

    References:
      Kingma & Ba, Adam: A Method for Stochastic Optimization, arXiv:1412.6980.
      Reddi, Kale & Kumar, On the Convergence of Adam and Beyond, ICLR 2018.
      Dozat, Incorporating Nesterov Momentum into Adam, ICLR workshop 2016.
    """
    return scale_by_adam_with_convention(
        b1,
        b2,
        eps,
        eps_root,
        mu_dtype,
        nesterov=nesterov,
        amsgrad=amsgrad,
        nu_dtype=nu_dtype,
        layout=layout,
        moments=moments,
    )


NO_PARAMS_MSG = "{name}: this transformation needs the params; call update(updates, state, params)."


def check_params_given(params, name: str) -> None:
    """Raises a clear ``ValueError`` when a transformation that needs params got none."""
    if params is None:
        raise ValueError(NO_PARAMS_MSG.format(name=name))


def _scheduled(
    value: ScalarOrSchedule,
    leaf_fn,
    *,
    needs_params: bool,
    name: str,
    negate: bool = False,
    schedule_state=ScheduleState,
):
    """Builds a transform applying ``leaf_fn(u, scalar, p)`` with a float or schedule.

    The scalar is formed per leaf in the leaf's scalar dtype (float32, or
    float64 for float64 leaves); a schedule is evaluated once per step.
    """
    check_non_negative(name, value, schedule_ok=True)

    def init_fn(params):
        if callable(value):
            return schedule_state(count=zeros_count_like(params))
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        updates, params = arrays_tree(updates), arrays_tree(params)
        if needs_params:
            check_params_given(params, name)
            match_leaves(updates, params, name="updates", reference_name="params")
        if callable(value):
            raw = evaluate_schedule(value, state.count)
            state = schedule_state(count=safe_increment(state.count))
        else:
            raw = value
        sign = -1 if negate else 1
        scalars = SharedScalars(lambda dtype: sign * to_scalar(raw, dtype))
        if needs_params:
            updates = jax.tree.map(lambda u, p: leaf_fn(u, scalars[u.dtype], p), updates, params)
        else:
            updates = jax.tree.map(lambda u: leaf_fn(u, scalars[u.dtype], None), updates)
        return updates, state

    return optax.GradientTransformation(init_fn, update_fn)


def _descent_leaf(u, neg_lr, _):
    cdt = compute_dtype(u.dtype)
    return (u.astype(cdt) * cast_scalar(neg_lr, u.astype(cdt))).astype(u.dtype)


def _decay_leaf(u, wd, p):
    cdt = compute_dtype(u.dtype)
    p = p.astype(cdt)
    return (u.astype(cdt) + cast_scalar(wd, p) * p).astype(u.dtype)


def scale_by_learning_rate(learning_rate: ScalarOrSchedule) -> optax.GradientTransformation:
    """Multiplies updates by ``-learning_rate`` (a float or an optax schedule).

    In float32, or float64 for float64 leaves.
    """
    return _scheduled(
        learning_rate, _descent_leaf, needs_params=False, name="learning_rate", negate=True
    )


def add_decayed_weights(
    weight_decay: ScalarOrSchedule = 0.0, mask: Any = None
) -> optax.GradientTransformation:
    r"""Adds ``weight_decay * params`` to the updates (:math:`u + \lambda p`), in float32.

    ``weight_decay`` is a float or an optax schedule. ``mask`` (a pytree of
    bools or a callable returning one) selects the leaves that decay, as in
    ``optax.add_decayed_weights``.
    """
    tx = _scheduled(
        weight_decay,
        _decay_leaf,
        needs_params=True,
        name="weight_decay",
        schedule_state=WeightDecaySchedule,
    )
    return optax.masked(tx, mask) if mask is not None else tx


def negate() -> optax.GradientTransformation:
    """Flips the sign of the gradients (gradient ascent, torch's ``maximize``)."""
    return optax.stateless(lambda updates, params=None: jax.tree.map(jnp.negative, updates))
