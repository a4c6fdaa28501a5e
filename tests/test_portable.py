"""Portable optimizer state (issue 14): optax's own state by default, a layout-free form,
optax interop across mismatched chains, and PyTorch state dicts."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import serialization

import adam_jax
from adam_jax.compat import from_torch_state_dict, to_torch_state_dict, torch_adamw

SCHED = optax.linear_schedule(1e-2, 1e-3, 20)
MASK = {"w": True, "b": False, "s": False}


def params_tree():
    rng = np.random.default_rng(0)
    return {
        "w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(3,)), jnp.float32),
        "s": jnp.asarray(1.5, jnp.float32),
    }


def grads_at(step: int, params):
    rng = np.random.default_rng(100 + step)
    return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)


def run(tx, params, state, steps: range):
    step = jax.jit(tx.update)
    for i in steps:
        updates, state = step(grads_at(i, params), state, params)
        params = optax.apply_updates(params, updates)
    return params, state


@dataclasses.dataclass(frozen=True)
class Pair:
    name: str
    theirs: Callable[[], optax.GradientTransformation]
    ours: Callable[..., optax.GradientTransformation]


PAIRS = [
    Pair("adam", lambda: optax.adam(1e-2), lambda **k: adam_jax.adam(1e-2, **k)),
    Pair("adamw", lambda: optax.adamw(1e-2), lambda **k: adam_jax.adamw(1e-2, **k)),
    Pair("adamw_schedule", lambda: optax.adamw(SCHED), lambda **k: adam_jax.adamw(SCHED, **k)),
    Pair(
        "adamw_mask",
        lambda: optax.adamw(1e-2, weight_decay=0.1, mask=MASK),
        lambda **k: adam_jax.adamw(1e-2, weight_decay=0.1, mask=MASK, **k),
    ),
    Pair(
        "adamw_schedule_decay_mask",
        lambda: optax.adamw(SCHED, weight_decay=SCHED, mask=MASK),
        lambda **k: adam_jax.adamw(SCHED, weight_decay=SCHED, mask=MASK, **k),
    ),
    Pair("nadam", lambda: optax.nadam(1e-2), lambda **k: adam_jax.nadam(1e-2, **k)),
    Pair("nadamw", lambda: optax.nadamw(1e-2), lambda **k: adam_jax.nadamw(1e-2, **k)),
    Pair("amsgrad", lambda: optax.amsgrad(1e-2), lambda **k: adam_jax.amsgrad(1e-2, **k)),
]
PAIR_IDS = [p.name for p in PAIRS]


def _type_names(tree):
    return [type(n).__name__ for n in jax.tree.leaves(tree, is_leaf=lambda x: x is not tree)]


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def assert_params_close(a, b, rtol=1e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=1e-7)


# ----------------------------------------------------------------------------- optax's state


@pytest.mark.parametrize("pair", PAIRS, ids=PAIR_IDS)
def test_default_state_has_optax_types_and_chain_structure(pair):
    params = params_tree()
    theirs, ours = pair.theirs().init(params), pair.ours().init(params)
    if pair.name == "adamw_schedule_decay_mask":
        # optax's WeightDecaySchedule is not exported: ours has its name and
        # field, so serialized checkpoints match by name (tested below).
        assert str(jax.tree.structure(theirs)) == str(jax.tree.structure(ours))
    else:
        assert jax.tree.structure(theirs) == jax.tree.structure(ours)
    for x, y in zip(jax.tree.leaves(theirs), jax.tree.leaves(ours), strict=True):
        assert (x.shape, x.dtype) == (y.shape, y.dtype)


@pytest.mark.parametrize("direction", ["optax_to_adam_jax", "adam_jax_to_optax"])
@pytest.mark.parametrize("pair", PAIRS, ids=PAIR_IDS)
def test_flax_serialization_bytes_restore_across_optax_and_adam_jax(pair, direction):
    params = params_tree()
    src_tx, dst_tx = (pair.theirs(), pair.ours())
    if direction == "adam_jax_to_optax":
        src_tx, dst_tx = dst_tx, src_tx
    p_src, s_src = run(src_tx, params, src_tx.init(params), range(3))
    restored = serialization.from_bytes(dst_tx.init(params), serialization.to_bytes(s_src))
    for x, y in zip(jax.tree.leaves(s_src), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(x, y)
    # Continuing either way gives the same params (to float32 rounding).
    p_a, _ = run(src_tx, p_src, s_src, range(3, 6))
    p_b, _ = run(dst_tx, p_src, restored, range(3, 6))
    assert_params_close(p_a, p_b)


@pytest.mark.parametrize("direction", ["optax_to_adam_jax", "adam_jax_to_optax"])
@pytest.mark.parametrize(
    "pair",
    [p for p in PAIRS if p.name in ("adamw_schedule_decay_mask", "amsgrad", "nadam")],
    ids=lambda p: p.name,
)
def test_orbax_checkpoint_restores_across_optax_and_adam_jax(pair, direction, tmp_path):
    params = params_tree()
    src_tx, dst_tx = (pair.theirs(), pair.ours())
    if direction == "adam_jax_to_optax":
        src_tx, dst_tx = dst_tx, src_tx
    _, s_src = run(src_tx, params, src_tx.init(params), range(3))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "state", s_src)
    checkpointer.wait_until_finished()
    target = jax.eval_shape(dst_tx.init, params)
    restored = checkpointer.restore(tmp_path / "state", target)
    assert jax.tree.structure(restored) == jax.tree.structure(target)
    for x, y in zip(jax.tree.leaves(s_src), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(x, y)


def test_optax_tree_utils_find_moments_in_the_default_state():
    params = params_tree()
    tx = adam_jax.adamw(1e-2)
    state = tx.init(params)
    mu = optax.tree_utils.tree_get(state, "mu")
    assert jax.tree.structure(mu) == jax.tree.structure(params)
    jax.tree.map(lambda m, p: m + p, state[0].mu, params)  # params-shaped: logging code works
    assert int(optax.tree_utils.tree_get(state, "count")) == 0


# ----------------------------------------------------------------------------- layout-free form


def _mesh_1():
    return jax.make_mesh((1,), ("data",))


CHAINS = {
    "adamw_grouped": lambda: adam_jax.adamw(SCHED, weight_decay=0.1, mask=MASK, layout="grouped"),
    "amsgrad_per_leaf": lambda: adam_jax.amsgrad(1e-2),
    "shard_state_grouped": lambda: adam_jax.shard_state(
        adam_jax.adamw(1e-2, layout="grouped"), _mesh_1(), "data"
    ),
    "multisteps_inject_grouped": lambda: optax.MultiSteps(
        optax.inject_hyperparams(adam_jax.adam, static_args=("layout",))(
            learning_rate=1e-2, layout="grouped"
        ),
        every_k_schedule=2,
    ),
    "clip_nadamw_bf16_mu": lambda: optax.chain(
        optax.clip_by_global_norm(1.0),
        adam_jax.nadamw(1e-2, mu_dtype=jnp.bfloat16, layout="grouped"),
    ),
}


@pytest.mark.parametrize("name", list(CHAINS))
def test_state_to_tree_round_trip_is_bitwise(name):
    params = params_tree()
    tx = CHAINS[name]()
    _, state = run(tx, params, tx.init(params), range(3))
    tree = adam_jax.state_to_tree(state)
    # Every moment is params-shaped, no wrapper left.
    for node in jax.tree.leaves(
        tree, is_leaf=lambda x: isinstance(x, (adam_jax.AdamState, adam_jax.AmsgradState))
    ):
        if isinstance(node, (adam_jax.AdamState, adam_jax.AmsgradState)):
            assert jax.tree.structure(node.mu) == jax.tree.structure(params)
    assert not any(
        isinstance(x, (adam_jax.GroupedMoments, adam_jax.ShardedState))
        for x in jax.tree.leaves(
            tree, is_leaf=lambda x: isinstance(x, (adam_jax.GroupedMoments, adam_jax.ShardedState))
        )
    )
    back = adam_jax.state_from_tree(tree, like=state)
    assert_trees_equal(back, state)
    # Into an abstract target too (restore_target carries shardings).
    target = adam_jax.restore_target(tx, params)
    assert_trees_equal(adam_jax.state_from_tree(tree, like=target), state)


def test_layout_free_checkpoint_restores_into_another_layout(tmp_path):
    params = params_tree()
    grouped = adam_jax.adamw(1e-2, layout="grouped")
    p3, state = run(grouped, params, grouped.init(params), range(3))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "state", adam_jax.state_to_tree(state))
    checkpointer.wait_until_finished()
    per_leaf = adam_jax.adamw(1e-2)
    target = adam_jax.restore_target(per_leaf, params, layout_free=True)
    tree = checkpointer.restore(tmp_path / "state", target)
    resumed = adam_jax.state_from_tree(tree, like=adam_jax.restore_target(per_leaf, params))
    p_a, _ = run(grouped, p3, state, range(3, 6))
    p_b, _ = run(per_leaf, p3, resumed, range(3, 6))
    assert_trees_equal(p_a, p_b)  # layouts are bitwise equal


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda t: t[0]._replace(mu={**t[0].mu, "w": jnp.ones((3, 4))}), r"\['w'\]"),
        (lambda t: t[0]._replace(mu={"w": t[0].mu["w"], "b": t[0].mu["b"]}), r"missing .*\['s'\]"),
        (lambda t: t[0]._replace(count=jnp.ones((), jnp.float32)), "count"),
    ],
    ids=["shape", "missing_leaf", "float_count"],
)
def test_state_from_tree_names_the_leaf_that_does_not_fit(mutate, match):
    params = params_tree()
    tx = adam_jax.adamw(1e-2, layout="grouped")
    state = tx.init(params)
    tree = adam_jax.state_to_tree(state)
    bad = (mutate(tree), *tree[1:])
    with pytest.raises(ValueError, match=match):
        adam_jax.state_from_tree(bad, like=state)


# ----------------------------------------------------------------------------- optax interop


@pytest.mark.parametrize("layout", ["per_leaf", "grouped", "shard_state"])
def test_from_optax_state_across_mismatched_chains_continues_the_run(layout):
    """optax: clip + adamw(schedule); adam_jax: the same chain in another layout."""
    params = params_tree()
    theirs = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(SCHED, weight_decay=0.1))
    inner = adam_jax.adamw(
        SCHED, weight_decay=0.1, layout="grouped" if layout != "per_leaf" else "per_leaf"
    )
    ours_adam = adam_jax.shard_state(inner, _mesh_1(), "data") if layout == "shard_state" else inner
    ours = optax.chain(optax.clip_by_global_norm(1.0), ours_adam)
    p5, s5 = run(theirs, params, theirs.init(params), range(5))
    converted = adam_jax.from_optax_state(s5, like=ours.init(params))
    p_ours, s_ours = run(ours, p5, converted, range(5, 10))
    p_ref, s_ref = run(theirs, p5, s5, range(5, 10))
    assert_params_close(p_ours, p_ref)
    # And back: optax continues from adam_jax's state.
    back = adam_jax.to_optax_state(s_ours, like=theirs.init(params))
    assert jax.tree.structure(back) == jax.tree.structure(s_ref)
    p_back, _ = run(theirs, p_ours, back, range(10, 12))
    p_ref2, _ = run(theirs, p_ref, s_ref, range(10, 12))
    assert_params_close(p_back, p_ref2)


def test_from_optax_state_refuses_adam_into_amsgrad():
    params = params_tree()
    with pytest.raises(ValueError, match="AMSGrad"):
        adam_jax.from_optax_state(
            optax.adam(1e-2).init(params), like=adam_jax.amsgrad(1e-2).init(params)
        )


# ----------------------------------------------------------------------------- PyTorch

torch = pytest.importorskip("torch", reason="torch is not installed (CI installs torch==2.13.0)")

HP = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)


def _torch_run(ts, opt, steps):
    for i in steps:
        g = grads_at(i, {k: jnp.asarray(t.detach().numpy()) for k, t in ts.items()})
        for k, t in ts.items():
            t.grad = torch.tensor(np.asarray(g[k]))
        opt.step()


ORDER = ("w", "b", "s")  # the torch optimizer's param list
IDS = {k: i for i, k in enumerate(ORDER)}


def _torch_setup(params, amsgrad):
    ts = {k: torch.tensor(np.asarray(params[k]), requires_grad=True) for k in ORDER}
    opt = torch.optim.AdamW(list(ts.values()), amsgrad=amsgrad, foreach=False, **HP)
    return ts, opt


def _rel(a, b):
    return max(
        float(np.max(np.abs(np.asarray(a[k]) - np.asarray(b[k])) / np.maximum(np.abs(b[k]), 1e-3)))
        for k in b
    )


@pytest.mark.parametrize("layout", ["per_leaf", "grouped"])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_torch_state_dict_continues_a_torch_run(amsgrad, layout):
    params = params_tree()
    ids = IDS
    ts, opt = _torch_setup(params, amsgrad)
    _torch_run(ts, opt, range(50))
    saved = copy.deepcopy(opt.state_dict())
    p50 = {k: jnp.asarray(t.detach().numpy().copy()) for k, t in ts.items()}
    _torch_run(ts, opt, range(50, 100))
    torch100 = {k: t.detach().numpy() for k, t in ts.items()}

    tx = torch_adamw(amsgrad=amsgrad, layout=layout, **HP)
    state = from_torch_state_dict(
        saved, like=tx.init(p50), param_ids=ids, hyperparams={**HP, "amsgrad": amsgrad}
    )
    ours, _ = run(tx, p50, state, range(50, 100))
    assert _rel(ours, torch100) <= 1e-5


def test_imported_torch_state_does_not_alias_the_torch_buffers():
    """The torch optimizer keeps stepping in place after the export: the imported state
    (and the exported dict) must own their memory."""
    params = params_tree()
    ts, opt = _torch_setup(params, amsgrad=False)
    _torch_run(ts, opt, range(3))
    tx = torch_adamw(**HP)
    live = opt.state_dict()  # not copied: its tensors are the optimizer's buffers
    state = from_torch_state_dict(live, like=tx.init(params), param_ids=IDS, hyperparams=HP)
    before = jax.tree.map(np.array, adam_jax.state_to_tree(state))
    snapshot = live["state"][0]["exp_avg"].numpy().copy()
    _torch_run(ts, opt, range(3, 6))  # exp_avg / exp_avg_sq change in place
    after = jax.tree.map(np.array, adam_jax.state_to_tree(state))
    jax.tree.map(np.testing.assert_array_equal, after, before)
    # The torch buffer did change in place (else this test would prove nothing).
    assert not np.array_equal(live["state"][0]["exp_avg"].numpy(), snapshot)
    exported = to_torch_state_dict(state, param_ids=IDS, hyperparams=HP, as_numpy=True)
    first = np.array(exported["state"][0]["exp_avg"])
    exported["state"][0]["exp_avg"][...] = 0.0
    again = to_torch_state_dict(state, param_ids=IDS, hyperparams=HP, as_numpy=True)
    np.testing.assert_array_equal(again["state"][0]["exp_avg"], first)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_torch_load_state_dict_continues_an_adam_jax_run(amsgrad):
    params = params_tree()
    ids = IDS
    ts, opt = _torch_setup(params, amsgrad)
    _torch_run(ts, opt, range(60))
    torch60 = {k: t.detach().numpy() for k, t in ts.items()}

    tx = torch_adamw(amsgrad=amsgrad, **HP)
    p30, state = run(tx, params, tx.init(params), range(30))
    ts2, opt2 = _torch_setup(p30, amsgrad)
    opt2.load_state_dict(to_torch_state_dict(state, ids, hyperparams=HP))
    _torch_run(ts2, opt2, range(30, 60))
    assert _rel({k: t.detach().numpy() for k, t in ts2.items()}, torch60) <= 1e-5


def test_numpy_state_dict_round_trip_and_linear_transpose_hook():
    """A torch Linear weight is (out, in); a Flax kernel (in, out): the hook transposes."""
    kernel = jnp.asarray(np.random.default_rng(1).normal(size=(3, 5)), jnp.float32)  # (in, out)
    params = {"kernel": kernel, "bias": jnp.zeros(5)}
    tx = torch_adamw(**HP)
    _, state = run(tx, params, tx.init(params), range(4))
    ids = {"kernel": 0, "bias": 1}

    def to_torch(path, x):
        return x.T if "kernel" in path else x

    sd = to_torch_state_dict(state, ids, hyperparams=HP, transform=to_torch, as_numpy=True)
    assert isinstance(sd["state"][0]["exp_avg"], np.ndarray)
    assert sd["state"][0]["exp_avg"].shape == (5, 3) and float(sd["state"][0]["step"]) == 4
    with pytest.raises(ValueError, match=r"kernel.*transpose"):
        from_torch_state_dict(sd, like=tx.init(params), param_ids=ids)
    back = from_torch_state_dict(sd, like=tx.init(params), param_ids=ids, transform=to_torch)
    assert_trees_equal(back, state)


def test_torch_state_dict_mismatches_are_clear_errors():
    params = params_tree()
    ids = IDS
    ts, opt = _torch_setup(params, amsgrad=False)
    _torch_run(ts, opt, range(2))
    sd = copy.deepcopy(opt.state_dict())
    like = torch_adamw(**HP).init(params)
    with pytest.raises(ValueError, match=r"lr=0\.01.*lr=0\.001"):
        from_torch_state_dict(sd, like=like, param_ids=ids, hyperparams={**HP, "lr": 1e-3})
    with pytest.raises(ValueError, match="amsgrad"):
        from_torch_state_dict(sd, like=torch_adamw(amsgrad=True).init(params), param_ids=ids)
    bad_steps = copy.deepcopy(sd)
    bad_steps["state"][1]["step"] = torch.tensor(7.0)
    with pytest.raises(ValueError, match="different steps"):
        from_torch_state_dict(bad_steps, like=like, param_ids=ids)
    with pytest.raises(ValueError, match="no param group"):
        from_torch_state_dict(sd, like=like, param_ids={**ids, "s": 9})
    with pytest.raises(ValueError, match="both"):
        from_torch_state_dict(sd, like=like, param_ids={**ids, "s": 0})
