"""Public API: bad input, hyperparameter checks, composition with optax and flax, convergence."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adam_jax
from adam_jax.compat import keras_adam, torch_adam, torch_adamw

PARAMS = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}, "scale": jnp.ones(())}


# ---------------------------------------------------------------- public API shape


def test_all_is_sorted_and_importable():
    assert adam_jax.__all__ == sorted(adam_jax.__all__)
    for name in adam_jax.__all__:
        assert hasattr(adam_jax, name)


@pytest.mark.parametrize("name", ["adam", "adamw", "nadam", "nadamw", "amsgrad", "scale_by_adam"])
def test_positional_order_is_optax_order(name):
    ours = inspect.signature(getattr(adam_jax, name)).parameters
    theirs = inspect.signature(getattr(optax, name)).parameters
    positional = [p for p, v in ours.items() if v.kind is v.POSITIONAL_OR_KEYWORD]
    their_positional = [p for p, v in theirs.items() if v.kind is v.POSITIONAL_OR_KEYWORD]
    assert positional == their_positional
    for p in positional:
        assert ours[p].default == theirs[p].default, p
    assert ours["nu_dtype"].kind is inspect.Parameter.KEYWORD_ONLY


def test_adam_state_fields():
    """The states are optax's own types (issue 14), with optax's field order."""
    state = adam_jax.scale_by_adam(amsgrad=True).init(PARAMS)
    assert type(state) is optax.ScaleByAmsgradState is adam_jax.AmsgradState
    assert state._fields == ("count", "mu", "nu", "nu_max")
    assert state.count.dtype == jnp.int32 and state.count.shape == ()
    plain = adam_jax.scale_by_adam().init(PARAMS)
    assert type(plain) is optax.ScaleByAdamState is adam_jax.AdamState
    assert plain._fields == ("count", "mu", "nu")


def test_compat_defaults_are_the_frameworks_defaults():
    t = inspect.signature(torch_adam).parameters
    assert (t["lr"].default, t["betas"].default, t["eps"].default) == (1e-3, (0.9, 0.999), 1e-8)
    assert t["weight_decay"].default == 0.0 and t["amsgrad"].default is False
    assert inspect.signature(torch_adamw).parameters["weight_decay"].default == 1e-2
    k = inspect.signature(keras_adam).parameters
    assert (k["learning_rate"].default, k["epsilon"].default) == (0.001, 1e-7)
    assert k["weight_decay"].default is None


# ---------------------------------------------------------------- bad input

BAD_GRADS = {
    "extra leaf": (
        {
            "dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2), "x": jnp.ones(1)},
            "scale": jnp.ones(()),
        },
        ValueError,
        r"\['dense'\]\['x'\]",
    ),
    "missing leaf": (
        {"dense": {"kernel": jnp.ones((3, 2))}, "scale": jnp.ones(())},
        ValueError,
        r"\['dense'\]\['bias'\]",
    ),
    "wrong shape (would broadcast)": (
        {"dense": {"kernel": jnp.ones((1, 2)), "bias": jnp.zeros(2)}, "scale": jnp.ones(())},
        ValueError,
        r"\['dense'\]\['kernel'\].*\(1, 2\).*\(3, 2\)",
    ),
    "integer gradient": (
        {
            "dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2, jnp.int32)},
            "scale": jnp.ones(()),
        },
        TypeError,
        r"\['dense'\]\['bias'\].*int32",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_GRADS))
@pytest.mark.parametrize(
    "make", [lambda: adam_jax.adam(1e-3), lambda: adam_jax.adamw(1e-3), lambda: torch_adamw()]
)
def test_bad_grads_raise_naming_the_leaf(case, make):
    grads, exc, pattern = BAD_GRADS[case]
    tx = make()
    state = tx.init(PARAMS)
    with pytest.raises(exc, match=pattern):
        tx.update(grads, state, PARAMS)
    with pytest.raises(exc, match=pattern):
        jax.jit(tx.update)(grads, state, PARAMS)


def test_integer_param_leaf_raises_at_init():
    params = {"w": jnp.ones(3), "step": jnp.zeros((), jnp.int32)}
    with pytest.raises(TypeError, match=r"\['step'\].*int32"):
        adam_jax.adam(1e-3).init(params)


def test_weight_decay_checks_params_shape():
    tx = adam_jax.adamw(1e-3)
    state = tx.init(PARAMS)
    bad_params = {
        "dense": {"kernel": jnp.ones((3, 1)), "bias": jnp.zeros(2)},
        "scale": jnp.ones(()),
    }
    with pytest.raises(ValueError, match=r"\['dense'\]\['kernel'\]"):
        tx.update(PARAMS, state, bad_params)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: adam_jax.adam(1e-3, b1=1.0), "b1"),
        (lambda: adam_jax.adam(1e-3, b1=-0.1), "b1"),
        (lambda: adam_jax.adam(1e-3, b2=1.5), "b2"),
        (lambda: adam_jax.adam(1e-3, eps=-1e-8), "eps"),
        (lambda: adam_jax.adam(1e-3, eps_root=-1.0), "eps_root"),
        (lambda: adam_jax.adam(-1e-3), "learning_rate"),
        (lambda: adam_jax.adamw(1e-3, weight_decay=-0.1), "weight_decay"),
        (lambda: adam_jax.scale_by_adam(b2=float("nan")), "b2"),
        (lambda: torch_adam(betas=(0.9, 1.0)), r"betas\[1\]"),
        (lambda: keras_adam(epsilon=-1.0), "epsilon"),
    ],
)
def test_out_of_range_hyperparameters_raise_at_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_init_on_abstract_params_via_eval_shape():
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), PARAMS)
    state = jax.eval_shape(adam_jax.adamw(1e-3, amsgrad=True, layout="per_leaf").init, abstract)
    inner = state[0]
    assert inner.mu["dense"]["kernel"].shape == (3, 2)
    assert inner.mu["dense"]["kernel"].dtype == jnp.bfloat16
    assert inner.nu_max["scale"].shape == ()
    grouped = jax.eval_shape(adam_jax.adamw(1e-3, layout="grouped").init, abstract)[0]
    (buffer,) = grouped.mu.buffers  # 6 + 2 + 1 elements, one bf16 group
    assert buffer.shape == (9,) and buffer.dtype == jnp.bfloat16


# ---------------------------------------------------------------- composition


def _loss(params, x):
    y = x @ params["dense"]["kernel"] + params["dense"]["bias"]
    return jnp.mean((params["scale"] * y - 1.0) ** 2)


def _train(tx, steps=30, params=PARAMS):
    x = jnp.linspace(-1, 1, 12).reshape(4, 3)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(_loss)(params, x)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for _ in range(steps):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    return params, state, losses


def _assert_close_params(a, b, rtol=1e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=1e-7)


def test_chain_with_clip_by_global_norm_matches_optax():
    ours = optax.chain(optax.clip_by_global_norm(0.1), adam_jax.adam(1e-2))
    theirs = optax.chain(optax.clip_by_global_norm(0.1), optax.adam(1e-2))
    _assert_close_params(_train(ours)[0], _train(theirs)[0])


def test_inject_hyperparams_and_changing_learning_rate():
    tx = optax.inject_hyperparams(adam_jax.adamw)(learning_rate=1e-2, weight_decay=0.1, b1=0.8)
    ref = optax.inject_hyperparams(optax.adamw)(learning_rate=1e-2, weight_decay=0.1, b1=0.8)
    _assert_close_params(_train(tx)[0], _train(ref)[0])
    state = tx.init(PARAMS)
    state.hyperparams["learning_rate"] = jnp.asarray(0.0)
    updates, _ = tx.update(PARAMS, state, PARAMS)
    assert all(float(jnp.max(jnp.abs(u))) == 0.0 for u in jax.tree.leaves(updates))


def test_multisteps_matches_optax_multisteps():
    ours = optax.MultiSteps(adam_jax.adam(1e-2), every_k_schedule=3)
    theirs = optax.MultiSteps(optax.adam(1e-2), every_k_schedule=3)
    p_ours, _, _ = _train(ours, steps=12)
    p_theirs, _, _ = _train(theirs, steps=12)
    _assert_close_params(p_ours, p_theirs)
    assert not np.allclose(np.asarray(p_ours["scale"]), 1.0)


def test_schedules_for_learning_rate_and_weight_decay():
    lr = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 5, 30)
    wd = optax.linear_schedule(0.1, 0.0, 30)
    ours = _train(adam_jax.adamw(lr, weight_decay=wd))[0]
    theirs = _train(optax.adamw(lr, weight_decay=wd))[0]
    _assert_close_params(ours, theirs)


def test_mask_callable_excludes_biases():
    def mask(p):
        return jax.tree.map(lambda x: x.ndim > 1, p)

    tx = adam_jax.adamw(0.0, weight_decay=1.0, mask=mask)  # lr 0: only decay would move
    state = tx.init(PARAMS)
    zeros = jax.tree.map(jnp.zeros_like, PARAMS)
    updates, _ = tx.update(zeros, state, PARAMS)
    assert float(jnp.max(jnp.abs(updates["dense"]["bias"]))) == 0.0
    tx = adam_jax.adamw(1.0, weight_decay=1.0, mask=mask)
    updates, _ = tx.update(zeros, tx.init(PARAMS), PARAMS)
    np.testing.assert_allclose(np.asarray(updates["dense"]["kernel"]), -1.0)
    assert float(jnp.max(jnp.abs(updates["dense"]["bias"]))) == 0.0
    assert float(updates["scale"]) == 0.0


def test_flax_nnx_optimizer_trains_a_small_model():
    nnx = pytest.importorskip("flax.nnx")

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(2, 16, rngs=rngs)
            self.l2 = nnx.Linear(16, 1, rngs=rngs)

        def __call__(self, x):
            return self.l2(nnx.relu(self.l1(x)))

    model = MLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, adam_jax.adamw(1e-2, weight_decay=1e-4), wrt=nnx.Param)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(64, 2)), jnp.float32)
    y = jnp.sin(x[:, :1]) + x[:, 1:] ** 2

    @nnx.jit
    def step(model, optimizer):
        def loss_fn(model):
            return jnp.mean((model(x) - y) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(200)]
    assert losses[-1] < 0.1 * losses[0]


# ---------------------------------------------------------------- convergence


@pytest.mark.parametrize(
    "make",
    [
        lambda: adam_jax.adam(0.05),
        lambda: adam_jax.nadam(0.05),
        lambda: adam_jax.amsgrad(0.05),
        lambda: torch_adam(0.05),
        lambda: keras_adam(0.05),
    ],
)
def test_converges_on_quadratic(make):
    target = jnp.asarray([1.0, -2.0, 3.0])
    scales = jnp.asarray([1.0, 10.0, 100.0])  # ill-conditioned

    def loss(p):
        return jnp.sum(scales * (p["x"] - target) ** 2)

    tx = make()
    params = {"x": jnp.zeros(3)}
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(1000):
        params, state = step(params, state)
    np.testing.assert_allclose(np.asarray(params["x"]), np.asarray(target), atol=1e-3)


def test_converges_on_rosenbrock():
    def rosenbrock(p):
        x, y = p["xy"][0], p["xy"][1]
        return (1.0 - x) ** 2 + 100.0 * (y - x**2) ** 2

    tx = adam_jax.adam(optax.exponential_decay(2e-2, 1000, 0.5))
    params = {"xy": jnp.asarray([-1.5, 2.0])}
    state = tx.init(params)

    def step(carry, _):
        params, state = carry
        updates, state = tx.update(jax.grad(rosenbrock)(params), state, params)
        return (optax.apply_updates(params, updates), state), None

    (params, _), _ = jax.lax.scan(step, (params, state), None, length=6000)
    np.testing.assert_allclose(np.asarray(params["xy"]), [1.0, 1.0], atol=1e-2)
    assert float(rosenbrock(params)) < 1e-4


def _public_functions():
    from adam_jax import compat

    names = [n for n in adam_jax.__all__ if callable(getattr(adam_jax, n))]
    funcs = [getattr(adam_jax, n) for n in names if inspect.isfunction(getattr(adam_jax, n))]
    return funcs + [getattr(compat, n) for n in compat.__all__]


@pytest.mark.parametrize("func", _public_functions(), ids=lambda f: f.__name__)
def test_public_signatures_carry_real_annotation_objects(func):
    """optax's tests read learning_rate's annotation to decide whether an optimizer
    takes a schedule; `from __future__ import annotations` would make it a string."""
    for name, param in inspect.signature(func).parameters.items():
        assert not isinstance(param.annotation, str), (func.__name__, name, param.annotation)
    if "learning_rate" in inspect.signature(func).parameters:
        assert inspect.signature(func).parameters["learning_rate"].annotation == (
            optax.ScalarOrSchedule
        )
