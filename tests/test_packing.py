"""Packed params: round trip, mixed dtypes, masks by group, and an NNX train step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adam_jax

nnx = pytest.importorskip("flax.nnx")


def test_round_trip_mixed_dtypes_and_group_fn():
    params = {
        "w": jnp.arange(6.0, dtype=jnp.float32).reshape(2, 3),
        "b": jnp.ones(3, jnp.float32),
        "h": jnp.full((2, 2), 0.5, jnp.bfloat16),
    }
    packer = adam_jax.ParamPacker(params)
    packed = packer.pack(params)
    assert sorted((b.shape, b.dtype.name) for b in packed) == [
        ((2, 2), "bfloat16"),  # a group of one leaf keeps its shape
        ((9,), "float32"),
    ]
    back = packer.unpack(packed)
    for k in params:
        assert back[k].dtype == params[k].dtype
        np.testing.assert_array_equal(
            np.asarray(back[k], np.float32), np.asarray(params[k], np.float32)
        )
    by_rank = adam_jax.ParamPacker(params, group_fn=lambda path, leaf: leaf.ndim > 1)
    assert len(by_rank.pack(params)) == 3  # f32 matrices, f32 vectors, bf16
    with pytest.raises(ValueError, match=r"\['b'\]"):
        packer.pack({**params, "b": jnp.ones(4, jnp.float32)})


def test_single_dtype_tree_packs_into_the_benchmarks_flat_buffer():
    """One dtype, one device: ParamPacker gives exactly one buffer, the concatenation.

    That is the benchmark's ``flat_buffer`` input, so the packed Adam step is that step.
    """
    params = {f"p{i:02d}": jnp.full((3, i + 1), float(i), jnp.float32) for i in range(40)}
    packed = adam_jax.ParamPacker(params).pack(params)
    assert len(packed) == 1
    flat = jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(params)])
    np.testing.assert_array_equal(np.asarray(packed[0]), np.asarray(flat))


def test_gradient_through_unpack_is_one_concatenate_not_a_pad_per_leaf():
    """The transpose of unpack is a pack: linear in the params, whatever the leaf count.

    Built from static slices, each leaf's cotangent would be padded to the whole
    buffer and the pads summed: quadratic (a 1000-leaf toy step took 2 s on CPU
    instead of 1.6 ms).
    """
    params = {f"p{i}": jnp.ones((3, i + 1)) for i in range(6)}
    params["h"] = jnp.ones((2,), jnp.bfloat16)
    packer = adam_jax.ParamPacker(params)
    packed = packer.pack(params)

    def loss_tree(tree):
        leaves = jax.tree.leaves(tree)
        return sum(jnp.sum(jnp.sin(x.astype(jnp.float32)) * (i + 1)) for i, x in enumerate(leaves))

    def loss(q):
        return loss_tree(packer.unpack(q))

    jaxpr = jax.make_jaxpr(jax.grad(loss))(packed).jaxpr
    prims = [eqn.primitive.name for eqn in jaxpr.eqns]
    assert "pad" not in prims and "dynamic_update_slice" not in prims, prims
    assert prims.count("concatenate") == 1, prims  # one float32 buffer; bf16 is one leaf
    grads = jax.grad(loss)(packed)
    want = packer.pack(jax.grad(loss_tree)(params))
    for g, w in zip(grads, want, strict=True):
        assert g.dtype == w.dtype
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))


def _decays(path, leaf):
    return leaf.ndim > 1


def test_pack_mask_packed_adamw_equals_masked_adamw_on_the_tree():
    rng = np.random.default_rng(1)
    params = {
        "w1": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
        "b1": jnp.asarray(rng.normal(size=(4,)), jnp.float32),
        "w2": jnp.asarray(rng.normal(size=(4, 2)), jnp.float32),
        "b2": jnp.asarray(rng.normal(size=(2,)), jnp.float32),
    }
    mask = jax.tree.map(lambda p: p.ndim > 1, params)
    packer = adam_jax.ParamPacker(params, group_fn=_decays)
    buffer_mask = packer.pack_mask(mask)
    assert sorted(buffer_mask) == [False, True]
    for flag, label in zip(buffer_mask, packer.buffer_labels(), strict=True):
        assert ("w1" in label) == flag and ("b1" in label) == (not flag)

    tree_tx = adam_jax.adamw(1e-2, weight_decay=0.5, mask=mask)
    packed_tx = adam_jax.adamw(1e-2, weight_decay=0.5, mask=buffer_mask)
    tree, tree_state = params, tree_tx.init(params)
    packed = packer.pack(params)
    packed_state = packed_tx.init(packed)
    for step in range(5):
        grads = jax.tree.map(lambda p, s=step: jnp.cos(p * (s + 1)), params)
        updates, tree_state = tree_tx.update(grads, tree_state, tree)
        tree = optax.apply_updates(tree, updates)
        updates, packed_state = packed_tx.update(packer.pack(grads), packed_state, packed)
        packed = optax.apply_updates(packed, updates)
    for k, v in packer.unpack(packed).items():
        np.testing.assert_array_equal(np.asarray(v), np.asarray(tree[k]), err_msg=k)
    # The mask mattered: without it the biases would have decayed too.
    unmasked = adam_jax.adamw(1e-2, weight_decay=0.5)
    u, _ = unmasked.update(packer.pack(params), unmasked.init(packed), packer.pack(params))
    m, _ = packed_tx.update(packer.pack(params), packed_tx.init(packed), packer.pack(params))
    assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(u, m, strict=True))


def test_pack_mask_errors_name_the_leaves():
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
    mask = {"w": True, "b": False}
    with pytest.raises(ValueError, match=r"True: \['w'\]; False: \['b'\]"):
        adam_jax.ParamPacker(params).pack_mask(mask)  # one buffer holds both
    packer = adam_jax.ParamPacker(params, group_fn=_decays)
    with pytest.raises(TypeError, match=r"\['b'\] must be a bool, got ArrayImpl"):
        packer.pack_mask({"w": True, "b": jnp.asarray(False)})
    with pytest.raises(ValueError, match="mask has 1 leaves but the packer was built for 2"):
        packer.pack_mask({"w": True})


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(4, 32, rngs=rngs)
        self.l2 = nnx.Linear(32, 32, rngs=rngs)
        self.l3 = nnx.Linear(32, 1, rngs=rngs)

    def __call__(self, x):
        return self.l3(nnx.relu(self.l2(nnx.relu(self.l1(x)))))


def _data():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(64, 4)), jnp.float32)
    return x, jnp.sin(x[:, :1]) * x[:, 1:2] + x[:, 2:3]


def _mse(model, x, y):
    return jnp.mean((model(x) - y) ** 2)


def test_nnx_packed_train_step_matches_nnx_optimizer():
    x, y = _data()
    steps = 50

    # Reference: the usual nnx.Optimizer over the params tree.
    model = MLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, adam_jax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def ref_step(model, optimizer):
        loss, grads = nnx.value_and_grad(_mse)(model, x, y)
        optimizer.update(model, grads)
        return loss

    ref_losses = [float(ref_step(model, optimizer)) for _ in range(steps)]

    # Packed: a few lines changed in the train step.
    graphdef, params, rest = nnx.split(MLP(nnx.Rngs(0)), nnx.Param, ...)
    packer = adam_jax.ParamPacker(params)
    packed = packer.pack(params)
    tx = adam_jax.adam(1e-2)
    opt_state = tx.init(packed)
    assert len(packed) == 1  # six leaves, one float32 buffer

    @jax.jit
    def packed_step(packed, opt_state):
        def loss_fn(packed):
            return _mse(nnx.merge(graphdef, packer.unpack(packed), rest), x, y)

        loss, grads = jax.value_and_grad(loss_fn)(packed)
        updates, opt_state = tx.update(grads, opt_state, packed)
        return optax.apply_updates(packed, updates), opt_state, loss

    losses = []
    for _ in range(steps):
        packed, opt_state, loss = packed_step(packed, opt_state)
        losses.append(float(loss))
    assert losses[-1] < 0.2 * losses[0]
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    final = packer.unpack(packed)
    for a, b in zip(
        jax.tree.leaves(final), jax.tree.leaves(nnx.state(model, nnx.Param)), strict=True
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda t: {("zz" if k == "a" else k): v for k, v in t.items()}, "missing from params"),
        (lambda t: {**t, "b": t["b"].astype(jnp.bfloat16)}, r"Dtype mismatch at leaf \['b'\]"),
        (lambda t: {**t, "b": jnp.ones((2, 1))}, r"Shape mismatch at leaf \['b'\]"),
        (lambda t: [t["a"], t["b"]], "tree structure"),
        (lambda t: {"a": t["a"]}, "missing from params: \\['b'\\]"),
    ],
    ids=["renamed", "dtype", "shape", "list", "missing"],
)
def test_pack_checks_structure_shapes_and_dtypes(mutate, match):
    """Issue 13, item 10: a renamed tree or a leaf of another dtype used to pack silently."""
    params = {"a": jnp.ones(3), "b": jnp.ones(2)}
    packer = adam_jax.ParamPacker(params)
    with pytest.raises(ValueError, match=match):
        packer.pack(mutate(params))
