"""Hostile-input properties, checked for the whole class of input (issue 13).

Every constructor is crossed with every layout, dtype and tree shape from small
generators below; each property states what must hold for all of them:

* a gradient tree of another structure (renamed, missing, extra, reordered,
  reshaped leaves) raises the same ``ValueError`` in every layout;
* finite gradients whose squares overflow leave the params finite (optax keeps
  them finite too; see ``test_overflow_*``);
* one gradient followed by thousands of zero gradients tracks the float64
  reference, in float16 and bfloat16 as well;
* every numeric hyperparameter can be injected (``optax.inject_hyperparams``)
  and the step runs under ``jit``, equal to the plain constructor's;
* eager, ``jit`` and abstract (``eval_shape``) ``init`` give one structure, and
  eager updates equal jitted ones;
* bad hyperparameters (shaped, bool, str, None, list, NaN, negative) and bad
  storage dtypes fail at construction, naming the hyperparameter;
* float64 params (x64) track the float64 reference to 1e-12.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

import adam_jax
from adam_jax.compat import keras_adam, torch_adam, torch_adamw
from tests.reference import RefConfig, make_problem, max_rel_error, reference_trajectory

LR, WD = 1e-3, 1e-2
LAYOUTS = ("per_leaf", "grouped")


@dataclasses.dataclass(frozen=True)
class Ctor:
    """A constructor under test: ``make(layout)``, its float64 reference and optax twin."""

    name: str
    make: Callable[[str], optax.GradientTransformation]
    ref: RefConfig
    optax: Callable[[], optax.GradientTransformation] | None = None
    decays: bool = False


def _shard(layout):
    mesh = jax.make_mesh((1,), ("data",))
    return adam_jax.shard_state(adam_jax.adamw(LR, weight_decay=WD, layout=layout), mesh, "data")


CTORS = [
    Ctor("adam", lambda lay: adam_jax.adam(LR, layout=lay), RefConfig(), lambda: optax.adam(LR)),
    Ctor(
        "adamw",
        lambda lay: adam_jax.adamw(LR, weight_decay=WD, layout=lay),
        RefConfig(weight_decay=WD),
        lambda: optax.adamw(LR, weight_decay=WD),
        decays=True,
    ),
    Ctor(
        "nadam",
        lambda lay: adam_jax.nadam(LR, layout=lay),
        RefConfig(nesterov=True),
        lambda: optax.nadam(LR),
    ),
    Ctor(
        "nadamw",
        lambda lay: adam_jax.nadamw(LR, weight_decay=WD, layout=lay),
        RefConfig(nesterov=True, weight_decay=WD),
        lambda: optax.nadamw(LR, weight_decay=WD),
        decays=True,
    ),
    Ctor(
        "amsgrad",
        lambda lay: adam_jax.amsgrad(LR, layout=lay),
        RefConfig(amsgrad=True),
        lambda: optax.amsgrad(LR),
    ),
    Ctor(
        "adam_eps_root",
        lambda lay: adam_jax.adam(LR, eps_root=1e-8, layout=lay),
        RefConfig(eps_root=1e-8),
        lambda: optax.adam(LR, eps_root=1e-8),
    ),
    Ctor("torch_adam", lambda lay: torch_adam(LR, layout=lay), RefConfig(convention="torch")),
    Ctor(
        "torch_adam_l2",
        lambda lay: torch_adam(LR, weight_decay=WD, layout=lay),
        RefConfig(convention="torch", weight_decay=WD, decoupled=False),
        decays=True,
    ),
    Ctor(
        "torch_adamw",
        lambda lay: torch_adamw(LR, weight_decay=WD, layout=lay),
        RefConfig(convention="torch", weight_decay=WD),
        decays=True,
    ),
    Ctor(
        "torch_amsgrad",
        lambda lay: torch_adam(LR, amsgrad=True, layout=lay),
        RefConfig(convention="torch", amsgrad=True),
    ),
    Ctor(
        "keras_adam",
        lambda lay: keras_adam(LR, layout=lay),
        RefConfig(convention="keras", eps=1e-7),
    ),
    Ctor(
        "keras_adam_wd",
        lambda lay: keras_adam(LR, weight_decay=WD, layout=lay),
        RefConfig(convention="keras", eps=1e-7, weight_decay=WD),
        decays=True,
    ),
    Ctor(
        "shard_state_adamw",
        _shard,
        RefConfig(weight_decay=WD),
        lambda: optax.adamw(LR, weight_decay=WD),
        decays=True,
    ),
]
CTOR_IDS = [c.name for c in CTORS]
# One constructor per distinct piece of math (moment update, direction, decay
# placement, AMSGrad variant), for the properties that compile or run steps;
# the cheap structural properties run over every constructor.
MATH_CLASSES = (
    "adam",
    "adamw",
    "nadam",
    "amsgrad",
    "torch_adam_l2",
    "torch_adamw",
    "torch_amsgrad",
    "keras_adam_wd",
)
CORE = [c for c in CTORS if c.name in MATH_CLASSES]


# ----------------------------------------------------------------------------- generators


def tree_flat(dtype):
    return {"a": jnp.ones((3, 2), dtype), "b": jnp.full((4,), 0.5, dtype)}


def tree_nested(dtype):
    return {
        "enc": [jnp.ones((2, 2), dtype), (jnp.ones((3,), dtype), jnp.ones((), dtype))],
        "dec": {"w": jnp.full((2, 3), -0.5, dtype), "b": jnp.zeros((3,), dtype)},
    }


def tree_many(dtype):
    return {f"l{i:02d}": jnp.full((1 + i % 4,), 0.1 * (i + 1), dtype) for i in range(12)}


TREES = {"flat": tree_flat, "nested": tree_nested, "many": tree_many}


def grads_like(params, seed: int = 0, scale: float = 1.0):
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    out = [
        jnp.asarray(scale * rng.uniform(-1, 1, np.shape(p)), jnp.asarray(p).dtype) for p in leaves
    ]
    return treedef.unflatten(out)


def mutations(params):
    """Gradient trees that do not fit ``params``: (name, tree). Each must raise."""
    leaves, treedef = jax.tree.flatten(params)
    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    g = grads_like(params)
    out = []
    if isinstance(params, dict):
        keys = sorted(params)
        # Rename the first key to one sorting last: the leaves keep their order
        # and shapes, so only a structure check can tell (the grouped layout
        # used to accept it and update the wrong moments).
        renamed = {("zz" if k == keys[0] else k): v for k, v in g.items()}
        out.append(("renamed", renamed))
        out.append(("missing", {k: v for k, v in g.items() if k != keys[-1]}))
        out.append(("extra", {**g, "zz_extra": jnp.ones(2)}))
    out.append(("as_list", jax.tree.leaves(g)))
    reshaped = [jnp.ones((*np.shape(x), 1), x.dtype) if i == 0 else x for i, x in enumerate(leaves)]
    out.append(("reshaped", treedef.unflatten(reshaped)))
    scalar = [jnp.ones((), x.dtype) if i == len(leaves) - 1 else x for i, x in enumerate(leaves)]
    if np.shape(leaves[-1]) != ():
        out.append(("broadcastable_scalar", treedef.unflatten(scalar)))
    del paths
    return out


# ----------------------------------------------------------------------------- structure


def _error_of(tx, grads, state, params):
    with pytest.raises(ValueError) as info:
        tx.update(grads, state, params)
    return str(info.value)


@pytest.mark.parametrize("tree_name", list(TREES))
@pytest.mark.parametrize("ctor", CTORS, ids=CTOR_IDS)
def test_structure_mismatch_raises_the_same_error_in_every_layout(ctor, tree_name):
    params = TREES[tree_name](jnp.float32)
    for mutation, bad in mutations(params):
        messages = set()
        for layout in LAYOUTS:
            tx = ctor.make(layout)
            state = tx.init(params)
            messages.add(_error_of(tx, bad, state, params))
        assert len(messages) == 1, (mutation, messages)
        message = messages.pop()
        assert "grads" in message or "updates" in message, message
        if mutation == "renamed":
            assert "['zz']" in message and "missing" in message, message


@pytest.mark.parametrize("layout", LAYOUTS)
def test_structure_mismatch_raises_under_jit(layout):
    params = tree_flat(jnp.float32)
    tx = adam_jax.adam(LR, layout=layout)
    state = tx.init(params)
    bad = {"b": jnp.ones((3, 2)), "c": jnp.ones(4)}
    with pytest.raises(ValueError, match="missing from grads: \\['a'\\]"):
        jax.jit(tx.update)(bad, state)


def test_leaf_wrappers_match_their_bare_arrays_in_every_layout():
    """nnx.Param in the state, bare arrays in the gradients (nnx.Optimizer's convention)."""
    from flax import nnx

    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    bare = jax.tree.map(lambda x: x, nnx.as_pure(params))
    grads = jax.tree.map(jnp.ones_like, bare)
    results = []
    for layout in LAYOUTS:
        tx = adam_jax.adam(LR, layout=layout)
        state = tx.init(params)
        updates, new_state = tx.update(grads, state)
        assert jax.tree.structure(new_state) == jax.tree.structure(state)
        results.append(jax.tree.leaves(updates))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- overflow

OVERFLOW_SEQUENCES = {
    "square_overflows": [[1e20, 0.1], [0.1, 0.1], [0.1, 0.2]],
    "float32_max": [[3.4028235e38, 1.0], [1.0, -1.0], [-3.4028235e38, 1.0]],
    "alternating_3.3e38": [[3.3e38, -3.3e38], [-3.3e38, 3.3e38]] * 3,
}


def _run(tx, params, grads_seq):
    state = tx.init(params)
    for g in grads_seq:
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("ctor", CORE, ids=lambda c: c.name)
def test_overflowing_gradients_keep_params_finite(ctor, dtype):
    params = {"w": jnp.ones(2, dtype), "b": jnp.ones(3, dtype)}
    for seq_name, raw in OVERFLOW_SEQUENCES.items():
        seq = [{"w": jnp.asarray(g, dtype), "b": jnp.asarray([*g, 0.5], dtype)} for g in raw]
        ours = {}
        for layout in ("per_leaf", "grouped"):
            p, state = _run(ctor.make(layout), params, seq)
            ours[layout] = jax.tree.leaves(p)
            assert all(bool(jnp.all(jnp.isfinite(x))) for x in ours[layout]), (seq_name, layout)
            nu = _adam_state(adam_jax.state_to_tree(state)).nu
            assert not any(bool(jnp.any(jnp.isnan(x))) for x in jax.tree.leaves(nu)), seq_name
        for a, b in zip(ours["per_leaf"], ours["grouped"], strict=True):
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
        if ctor.optax is None:
            continue
        # optax keeps these params finite as well, and where its step is exactly
        # 0 (nu = inf), ours is too.
        theirs, _ = _run(ctor.optax(), params, seq)
        for a, b in zip(ours["per_leaf"], jax.tree.leaves(theirs), strict=True):
            a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
            frozen = b == 1.0
            np.testing.assert_array_equal(a[frozen], b[frozen], err_msg=seq_name)


def _is_moment_state(x) -> bool:
    return isinstance(x, (adam_jax.AdamState, adam_jax.AmsgradState))


def _adam_state(state):
    return next(s for s in jax.tree.leaves(state, is_leaf=_is_moment_state) if _is_moment_state(s))


def test_issue_reproducer_square_overflow_does_not_turn_param_into_nan():
    tx = adam_jax.adam(1e-3)
    p = {"w": jnp.ones(2)}
    st = tx.init(p)
    for g in ([1e20, 0.1], [0.1, 0.1]):
        u, st = tx.update({"w": jnp.array(g)}, st, p)
        p = optax.apply_updates(p, u)
    assert float(p["w"][0]) == 1.0  # optax: 1.0 (nu = inf, step 0)
    assert float(_adam_state(st).nu["w"][0]) == np.inf


# ----------------------------------------------------------------------------- zero gradients

ZERO_STEPS = 3000
STORAGE = {  # (params, mu, nu) storage the reference emulates, per param dtype (defaults)
    "float32": (np.float32, None, None),
    "bfloat16": (ml_dtypes.bfloat16,) * 3,
    "float16": (np.float16, np.float32, np.float32),
}


def _zero_grad_run(tx, p0, g0, dtype, n):
    params = {"w": jnp.asarray(p0, dtype)}
    state = tx.init(params)

    def step(carry, g):
        params, state = carry
        updates, state = tx.update({"w": g}, state, params)
        return (optax.apply_updates(params, updates), state), None

    grads = jnp.concatenate([jnp.asarray(g0, dtype)[None], jnp.zeros((n, *np.shape(g0)), dtype)])
    (params, state), _ = jax.jit(lambda c, gs: jax.lax.scan(step, c, gs))((params, state), grads)
    return np.asarray(params["w"], np.float64), state


ZERO_GRAD_CTORS = [c for c in CTORS if c.name in ("adam", "adamw", "nadam", "amsgrad")]
ZERO_GRAD_CTORS += [c for c in CTORS if c.name in ("torch_adam", "torch_adamw", "keras_adam")]


@pytest.mark.parametrize("dtype_name", list(STORAGE))
@pytest.mark.parametrize("ctor", ZERO_GRAD_CTORS, ids=lambda c: c.name)
def test_one_gradient_then_zero_gradients_tracks_the_reference(ctor, dtype_name):
    dtype = jnp.dtype(dtype_name)
    p0 = np.array([0.0, 0.25, -1.0, 2.0])
    g0 = np.array([1e-2, -3e-3, 0.5, 1e-4])
    ours, _ = _zero_grad_run(ctor.make("per_leaf"), p0, g0, dtype, ZERO_STEPS)
    p_store, mu_store, nu_store = STORAGE[dtype_name]
    grads = [{"w": g0}] + [{"w": np.zeros(4)}] * ZERO_STEPS
    if ctor.name == "torch_adamw" and dtype_name == "float32":
        # torch rounds p * (1 - lr * wd) to float32 before adding the Adam step,
        # a second rounding per step that the single-rounding reference does not
        # model (3000 steps of it drift ~350 ulps): compare with torch itself.
        ref = _torch_adamw_float32(p0, grads)
    else:
        ref = reference_trajectory(
            ctor.ref,
            {"w": p0},
            grads,
            param_dtype=p_store,
            mu_dtype=mu_store,
            nu_dtype=nu_store,
        )["params"]["w"]
    # The params are stored in dtype: allow 8 of its ulps, plus a random walk of
    # one rounding difference per step (sqrt(steps) ulps), relative to the param
    # or its displacement, whichever is larger. The float16 bug was 3,700x off.
    ulp = {"float32": 2.0**-23, "bfloat16": 2.0**-8, "float16": 2.0**-11}[dtype_name]
    scale = np.maximum(np.abs(ref), np.abs(ref - p0))
    budget = (8 + np.sqrt(ZERO_STEPS)) * ulp * scale
    np.testing.assert_array_less(np.abs(ours - ref), budget + 1e-30)


def _torch_adamw_float32(p0, grads):
    torch = pytest.importorskip("torch")
    w = torch.tensor(np.asarray(p0, np.float32), requires_grad=True)
    opt = torch.optim.AdamW([w], lr=LR, weight_decay=WD, foreach=False)
    for g in grads:
        w.grad = torch.tensor(np.asarray(g["w"], np.float32))
        opt.step()
    return w.detach().numpy().astype(np.float64)


def test_issue_reproducer_float16_zero_gradients_do_not_drift():
    """Issue 13, item 1: -22.27 before (mu in float16 stalled); float64 Adam: -0.0060."""
    ours, state = _zero_grad_run(
        adam_jax.adam(1e-3), np.zeros(4), np.full(4, 1e-2), "float16", 20000
    )
    assert _adam_state(state).mu["w"].dtype == _adam_state(state).nu["w"].dtype == jnp.float32
    np.testing.assert_allclose(ours, -0.0060, rtol=0.01)


# ----------------------------------------------------------------------------- injection


@dataclasses.dataclass(frozen=True)
class Injectable:
    name: str
    factory: Callable[..., optax.GradientTransformation]
    kwargs: dict


INJECTABLE = [
    Injectable("adam", adam_jax.adam, dict(learning_rate=LR, eps_root=1e-9)),
    Injectable("adamw", adam_jax.adamw, dict(learning_rate=LR, weight_decay=WD)),
    Injectable("nadam", adam_jax.nadam, dict(learning_rate=LR)),
    Injectable("nadamw", adam_jax.nadamw, dict(learning_rate=LR, weight_decay=WD)),
    Injectable("amsgrad", adam_jax.amsgrad, dict(learning_rate=LR)),
    Injectable("scale_by_adam", adam_jax.scale_by_adam, dict(b1=0.8)),
    Injectable("torch_adam", torch_adam, dict(lr=LR)),
    Injectable("torch_adam_l2", torch_adam, dict(lr=LR, weight_decay=WD)),
    Injectable("torch_adam_decoupled", torch_adam, dict(lr=LR, decoupled_weight_decay=True)),
    Injectable("torch_adamw", torch_adamw, dict(lr=LR)),
    Injectable("keras_adam", keras_adam, dict(learning_rate=LR)),
    Injectable("keras_adam_wd", keras_adam, dict(learning_rate=LR, weight_decay=WD)),
]


def _numeric_arguments(factory, kwargs) -> list[str]:
    bound = inspect.signature(factory).bind(**kwargs)
    bound.apply_defaults()
    return [
        k
        for k, v in bound.arguments.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    ]


@pytest.mark.parametrize(
    "inj,layout",
    [(i, "per_leaf") for i in INJECTABLE] + [(INJECTABLE[1], "grouped")],
    ids=lambda x: getattr(x, "name", x),
)
def test_every_numeric_hyperparameter_injected_runs_under_jit(inj, layout):
    """inject_hyperparams turns every numeric argument into a (traced) array."""
    injected = _numeric_arguments(inj.factory, inj.kwargs)
    assert injected, inj.name
    params = tree_many(jnp.float32)
    grads = grads_like(params)
    plain = inj.factory(**inj.kwargs, layout=layout)
    tx = optax.inject_hyperparams(inj.factory, static_args=("layout",))(**inj.kwargs, layout=layout)
    state = jax.jit(tx.init)(params)
    assert set(state.hyperparams) == set(injected)
    state_plain = plain.init(params)
    step = jax.jit(tx.update)
    for _ in range(3):
        u, state = step(grads, state, params)
        u_plain, state_plain = plain.update(grads, state_plain, params)
    for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(u_plain), strict=True):
        # Injected hyperparameters are float32 arrays: 1 - b2 carries float32(b2)'s
        # 1.3e-5 relative error, which the plain constructor avoids.
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-9)


def test_issue_reproducer_inject_torch_adam_under_jit():
    tx = optax.inject_hyperparams(torch_adam)(lr=1e-3)
    p = {"w": jnp.ones(2)}
    st = tx.init(p)
    u, _ = jax.jit(tx.update)({"w": jnp.ones(2)}, st, p)
    np.testing.assert_allclose(u["w"], -1e-3, rtol=1e-5)


# ----------------------------------------------------------------------------- eager vs jit


def _structure_and_avals(tree):
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, [(tuple(np.shape(x)), jnp.dtype(x.dtype)) for x in leaves]


def mixed_host_tree():
    """NumPy and JAX leaves mixed (eager init used to group them apart)."""
    return {
        "a": np.ones((3,), np.float32),
        "b": jnp.ones((4,)),
        "c": np.zeros((2, 2), np.float32),
        "d": jnp.ones((5,), jnp.bfloat16),
    }


@pytest.mark.parametrize(
    "ctor,layout",
    [(c, lay) for c in CORE for lay in ("per_leaf", "grouped")]
    + [(c, "grouped") for c in CTORS if c.name == "shard_state_adamw"],
    ids=lambda x: getattr(x, "name", x),
)
def test_eager_jit_and_abstract_init_agree(ctor, layout):
    tx = ctor.make(layout)
    for make_tree in (mixed_host_tree, lambda: tree_many(jnp.float32)):
        params = make_tree()
        eager = _structure_and_avals(tx.init(params))
        jitted = _structure_and_avals(jax.jit(tx.init)(params))
        abstract = _structure_and_avals(jax.eval_shape(tx.init, params))
        assert eager == jitted == abstract


EAGER_CASES = [(c, "per_leaf", jnp.float32) for c in CTORS]
EAGER_CASES += [(c, "grouped", jnp.bfloat16) for c in CORE]


@pytest.mark.parametrize("ctor,layout,dtype", EAGER_CASES, ids=lambda x: getattr(x, "name", str(x)))
def test_eager_update_equals_jit(ctor, layout, dtype):
    params = tree_flat(dtype)
    tx = ctor.make(layout)
    step = jax.jit(tx.update)
    s_eager = s_jit = tx.init(params)
    for seed in range(3):
        grads = grads_like(params, seed)
        u_eager, s_eager = tx.update(grads, s_eager, params)
        u_jit, s_jit = step(grads, s_jit, params)
    assert jax.tree.structure(s_eager) == jax.tree.structure(s_jit)
    # XLA may contract a*b+c into one FMA under jit; eager rounds each op.
    rtol = 1e-5 if dtype == jnp.float32 else 2.0**-7
    for a, b in zip(
        jax.tree.leaves((u_eager, s_eager)), jax.tree.leaves((u_jit, s_jit)), strict=False
    ):
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=rtol)


# ----------------------------------------------------------------------------- hyperparameters

BAD_SCALARS = {
    "list": ([0.1, 0.2], TypeError),
    "str": ("0.1", TypeError),
    "none": (None, TypeError),
    "bool": (True, TypeError),
    "shaped_array": (jnp.array([0.1]), ValueError),
    "shaped_numpy": (np.array([0.1, 0.2]), ValueError),
    "complex": (0.1 + 0j, TypeError),
    "nan": (float("nan"), ValueError),
    "negative": (-0.5, ValueError),
}

# (factory, its numeric hyperparameters, the ones that may legitimately be None)
FACTORIES = [
    (adam_jax.adam, ("learning_rate", "b1", "b2", "eps", "eps_root"), ()),
    (adam_jax.adamw, ("learning_rate", "b1", "b2", "eps", "eps_root", "weight_decay"), ()),
    (adam_jax.nadam, ("learning_rate", "b1", "b2", "eps", "eps_root"), ()),
    (adam_jax.nadamw, ("learning_rate", "b1", "b2", "eps", "eps_root", "weight_decay"), ()),
    (adam_jax.amsgrad, ("learning_rate", "b1", "b2", "eps", "eps_root"), ()),
    (adam_jax.scale_by_adam, ("b1", "b2", "eps", "eps_root"), ()),
    (torch_adam, ("lr", "eps", "weight_decay"), ()),
    (torch_adamw, ("lr", "eps", "weight_decay"), ()),
    (
        keras_adam,
        ("learning_rate", "beta_1", "beta_2", "epsilon", "weight_decay"),
        ("weight_decay",),
    ),
    (adam_jax.scale_by_learning_rate, ("learning_rate",), ()),
    (adam_jax.add_decayed_weights, ("weight_decay",), ()),
]
REQUIRED = {"adam": "learning_rate", "adamw": "learning_rate", "nadam": "learning_rate"}


def _call(factory, **kwargs):
    params = inspect.signature(factory).parameters
    needed = {
        name: 1e-3
        for name, p in params.items()
        if p.default is inspect.Parameter.empty and name not in kwargs
    }
    return factory(**needed, **kwargs)


@pytest.mark.parametrize("bad", list(BAD_SCALARS))
@pytest.mark.parametrize(
    "factory,names,nullable", FACTORIES, ids=lambda x: getattr(x, "__name__", "")
)
def test_bad_hyperparameters_fail_at_construction_naming_them(factory, names, nullable, bad):
    value, error = BAD_SCALARS[bad]
    for name in names:
        if value is None and name in nullable:
            continue
        with pytest.raises(error, match=name):
            _call(factory, **{name: value})


@pytest.mark.parametrize("name", ["betas"])
@pytest.mark.parametrize("value", [(0.9,), (0.9, 1.0), ([0.9, 0.8], 0.999), (0.9, "x"), 0.9])
def test_torch_betas_are_checked(name, value):
    with pytest.raises((TypeError, ValueError)):
        torch_adam(betas=value)


@pytest.mark.parametrize("which", ["mu_dtype", "nu_dtype"])
@pytest.mark.parametrize("dtype", [jnp.int32, jnp.int8, bool, jnp.uint8, "int16", "not_a_dtype"])
@pytest.mark.parametrize(
    "factory",
    [adam_jax.adam, adam_jax.adamw, adam_jax.nadam, adam_jax.amsgrad],
    ids=lambda f: f.__name__,
)
def test_integer_bool_and_bogus_storage_dtypes_are_rejected(factory, which, dtype):
    kwargs = {which: dtype}
    if which == "mu_dtype" or factory is not adam_jax.scale_by_adam:
        with pytest.raises(TypeError, match=which):
            factory(1e-3, **kwargs)


@pytest.mark.parametrize("flag", ["nesterov", "amsgrad"])
@pytest.mark.parametrize("value", [jnp.array(True), 1, "yes", None])
def test_flags_must_be_python_bools(flag, value):
    with pytest.raises(TypeError, match=flag):
        adam_jax.adam(1e-3, **{flag: value})


def test_scalar_arrays_and_numpy_scalars_are_accepted():
    for value in (np.float32(0.9), np.array(0.9), jnp.array(0.9), 0):
        adam_jax.adam(1e-3, b1=value)
    adam_jax.adam(jnp.array(1e-3), eps=np.float64(1e-8))


# ----------------------------------------------------------------------------- params needed

DECAYING = [c for c in CTORS if c.decays]


@pytest.mark.parametrize("layout", ["per_leaf", "grouped"])
@pytest.mark.parametrize("ctor", DECAYING, ids=lambda c: c.name)
def test_weight_decay_without_params_is_a_clear_error(ctor, layout):
    params = tree_flat(jnp.float32)
    tx = ctor.make(layout)
    state = tx.init(params)
    with pytest.raises(ValueError, match="needs the params"):
        tx.update(grads_like(params), state)


# ----------------------------------------------------------------------------- float64


def test_float64_params_track_the_float64_reference():
    """Issue 13, item 4: every scalar is formed in float64 for float64 leaves."""
    params0, grads = make_problem(n_steps=20)
    cases = [(c, "per_leaf") for c in CORE] + [(CORE[0], "grouped")]
    with jax.enable_x64(True):
        for ctor, layout in cases:
            tx = ctor.make(layout)
            params = {k: jnp.asarray(v, jnp.float64) for k, v in params0.items()}
            stacked = {k: jnp.asarray(np.stack([g[k] for g in grads]), jnp.float64) for k in params}

            def step(carry, g, tx=tx):
                params, state = carry
                updates, state = tx.update(g, state, params)
                return (optax.apply_updates(params, updates), state), None

            run = jax.jit(lambda c, gs, step=step: jax.lax.scan(step, c, gs)[0])
            params, _ = run((params, tx.init(params)), stacked)
            assert all(x.dtype == jnp.float64 for x in jax.tree.leaves(params))
            ref = reference_trajectory(ctor.ref, params0, grads)["params"]
            err = max_rel_error(params, ref, params0)
            assert err <= 1e-12, (ctor.name, layout, err)
