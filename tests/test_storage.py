"""Quantized moments: ``moments="8bit"`` / ``"4bit"`` / ``QuantizedMoments`` (issue 15).

Codec properties (round to nearest on the bitsandbytes maps, exact round trips),
the state's layout and bytes, the transform's invariants (dtypes stable under
``lax.cond``, strict promotion, jit == eager, grouped == per-leaf, portable
state), robustness on mixed-scale gradients, and accuracy against the PyTorch
peers (bitsandbytes, torchao) on the same gradient stream.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adam_jax
from adam_jax import _storage as storage
from adam_jax._numerics import Convention, adam_coefficients, one_minus

FORMATS = ["8bit", "4bit"]
MAPS = [
    storage.DynamicMap(True, 8),
    storage.DynamicMap(False, 8),
    storage.DynamicMap(True, 4),
    storage.DynamicMap(False, 4),
    storage.LinearMap(4),
]


def _map_id(m):
    return f"{type(m).__name__}-{'signed' if m.signed else 'unsigned'}-{m.bits}"


def _leaves_equal(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(
        x.dtype == y.dtype and x.shape == y.shape and bool(jnp.array_equal(x, y))
        for x, y in zip(la, lb, strict=True)
    )


def _mixed_scale_values(n: int, signed: bool, seed: int = 0) -> np.ndarray:
    """Values in [-1, 1] (or [0, 1]) spread over many decades, plus the exact edges."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, n) ** rng.uniform(1, 30, n)
    if signed:
        x *= rng.choice([-1.0, 1.0], n)
    return np.concatenate([x, [0.0, 1.0] + ([-1.0] if signed else [])]).astype(np.float32)


def _midpoints(table: np.ndarray) -> np.ndarray:
    return (table[:-1] + table[1:]) / np.float32(2)


# ----------------------------------------------------------------------------- maps


@pytest.mark.parametrize("vmap", MAPS, ids=_map_id)
def test_encode_is_round_to_nearest_and_decode_inverts_it(vmap):
    table = vmap.table()
    x = _mixed_scale_values(100_000, vmap.signed)
    codes = np.asarray(jax.jit(vmap.encode)(x))
    # Nearest table value (ties, at the exact midpoints, may go either way):
    # the codes equal torch.bucketize(x, midpoints) except within 2 ulps of one.
    mids = _midpoints(table)
    ref = np.searchsorted(mids, x, side="left")
    differ = codes != ref
    nearest_mid = np.min(np.abs(x[differ, None] - mids[None, :]), axis=1) if differ.any() else []
    assert np.all(nearest_mid <= 2 * np.spacing(np.abs(x[differ]).astype(np.float32))), x[differ]
    assert differ.sum() <= 2
    # The round-trip error is the distance to the nearest table value.
    decoded = np.asarray(jax.jit(vmap.decode)(jnp.asarray(codes)))
    err = np.abs(decoded - x)
    best = np.abs(x - table[ref])
    assert np.all(err <= best + 2e-7 * np.maximum(np.abs(x), 1e-30) + 1e-37)
    # Every code decodes to its table value (to 2e-7 relative) and encodes back to itself.
    values = np.asarray(jax.jit(vmap.decode)(jnp.arange(len(table))))
    np.testing.assert_allclose(values, table, rtol=2e-7, atol=0)
    back = np.asarray(jax.jit(vmap.encode)(values))
    np.testing.assert_array_equal(back, np.arange(len(table)))


FLOAT_MAPS = [
    storage.FloatMap(True, 8, 3),
    storage.FloatMap(False, 8, 4),
    storage.FloatMap(False, 8, 3),
    storage.FloatMap(True, 4, 1),
]


@pytest.mark.parametrize("vmap", FLOAT_MAPS, ids=lambda m: f"{_map_id(m)}-m{m.mantissa}")
def test_float_map_is_round_to_nearest_and_exact_on_its_values(vmap):
    """Nearest value of the table (by brute force over every code), the top code is
    exactly 1.0, decode(encode(v)) == v for every table value, no negative zero,
    NaN -> 0 and +-inf -> +-1.0 (the block's scale)."""
    table = vmap.table()
    assert table[vmap.top] == 1.0 and table[0] == 0.0
    x = _mixed_scale_values(20_000, vmap.signed, seed=5)
    codes = np.asarray(jax.jit(vmap.encode)(x))
    decoded = np.asarray(jax.jit(vmap.decode)(jnp.asarray(codes)))
    np.testing.assert_array_equal(decoded, table[codes])
    best = np.min(np.abs(x[:, None] - table[None, :]), axis=1)
    assert np.all(np.abs(decoded - x) <= best * (1 + 1e-6) + 1e-38)
    # Relative spacing: 2**-mantissa; worst relative rounding error half of that,
    # above the smallest value.
    big = np.abs(x) >= vmap.smallest
    rel = np.abs(decoded[big] - x[big]) / np.abs(x[big])
    assert rel.max() <= 2.0 ** -(vmap.mantissa + 1) * (1 + 1e-6)
    values = np.asarray(jax.jit(vmap.decode)(jnp.arange(2**vmap.bits)))
    np.testing.assert_array_equal(values, table)
    back = np.asarray(jax.jit(vmap.encode)(values))
    np.testing.assert_array_equal(table[back], table)
    assert not np.any((codes != 0) & (decoded == 0))  # 0 is only ever code 0
    special = jnp.asarray([np.nan, np.inf, -np.inf], jnp.float32)
    got = np.asarray(vmap.decode(vmap.encode(special)))
    np.testing.assert_array_equal(got, [0.0, 1.0, -1.0 if vmap.signed else 0.0])


def test_default_maps_are_the_float_maps_and_the_bitsandbytes_maps_stay_selectable():
    eight = storage.PRESETS["8bit"]
    assert eight.mu_codec((64, 512)).map == storage.FloatMap(True, 8, 3)
    assert eight.nu_codec((64, 512)).map == storage.FloatMap(False, 8, 3)
    assert not eight.nu_codec((64, 512)).root
    four = storage.PRESETS["4bit"]
    assert four.mu_codec((64, 512)).map == storage.FloatMap(True, 4, 1)
    assert four.nu_codec((64, 512)).map == storage.LinearMap(4)
    bnb = adam_jax.QuantizedMoments(bits=8, mu_map="dynamic", nu_map="dynamic")
    assert bnb.mu_codec((64, 512)).map == storage.DynamicMap(True, 8)
    assert bnb.nu_codec((64, 512)).map == storage.DynamicMap(False, 8)
    assert bnb.nu_codec((64, 512)).root
    with pytest.raises(ValueError, match="nu_map='float' needs bits=8"):
        adam_jax.QuantizedMoments(bits=4, nu_map="float")
    with pytest.raises(ValueError, match="mu_map must be"):
        adam_jax.QuantizedMoments(mu_map="linear")


def test_round_trip_error_bounds_per_map():
    """Worst relative error on [0.1, 1] (the top decade) and the smallest nonzero value."""
    x = np.linspace(0.1, 1.0, 100_001, dtype=np.float32)
    bounds = {  # half the widest gap in the top decade, relative to 0.1
        "DynamicMap-signed-8": 0.9 / 64 / 2 / 0.1,
        "DynamicMap-unsigned-8": 0.9 / 128 / 2 / 0.1,
        "DynamicMap-signed-4": 0.9 / 4 / 2 / 0.1 + 0.02,
        "DynamicMap-unsigned-4": 0.9 / 8 / 2 / 0.1 + 0.02,
        "LinearMap-unsigned-4": 1 / 32 / 0.1,
    }
    for vmap in MAPS:
        decoded = np.asarray(jax.jit(lambda x, m=vmap: m.decode(m.encode(x)))(x))
        rel = np.max(np.abs(decoded - x) / x)
        assert rel <= bounds[_map_id(vmap)] * 1.0001, (_map_id(vmap), rel)
    # The dynamic maps reach 1e-6 (8-bit) / 1e-2 (4-bit) of the block's scale.
    assert storage.DynamicMap(True, 8).table()[128] == pytest.approx(5.5e-7)
    assert storage.DynamicMap(False, 8).table()[1] == pytest.approx(3.25e-7)
    assert storage.LinearMap(4).table()[0] == 1 / 16  # no zero in the nu map of 4-bit


def test_tables_are_bitsandbytes_and_torchao_maps():
    F = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is not installed")
    for signed in (True, False):
        ours = storage.DynamicMap(signed, 8).table()
        theirs = F.create_dynamic_map(signed=signed).numpy()
        np.testing.assert_allclose(ours, theirs, rtol=2e-7, atol=0)
    quant_utils = pytest.importorskip("torchao.optim.quant_utils", reason="no torchao")
    theirs4 = np.asarray(quant_utils.create_dynamic_map(True, 3, 4), np.float32)
    np.testing.assert_array_equal(storage.DynamicMap(True, 4).table(), theirs4)


def _bnb_quantize(x: np.ndarray, signed: bool):
    torch = pytest.importorskip("torch")
    F = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is not installed")
    code = F.create_dynamic_map(signed=signed)
    q, state = F.quantize_blockwise(torch.tensor(x), code=code, blocksize=256)
    return q.numpy().astype(np.int64).reshape(-1), state.absmax.numpy(), code.numpy()


@pytest.mark.parametrize("signed", [True, False], ids=["signed-mu", "unsigned-nu"])
def test_codes_match_bitsandbytes_quantize_blockwise(signed):
    """Same blocks (256 along each row of a 1024-wide leaf = bitsandbytes' flat blocks).

    Differences, all explained: (1) bitsandbytes' CPU kernel does not round
    exactly to nearest; within ~2e-5 of a decision midpoint it may take the
    neighbouring code (measured: up to 1.4e-5; ours equal torch.bucketize on the midpoints,
    which is bitsandbytes' own reference backend). (2) The signed table has no
    -1.0: bitsandbytes stores a block whose largest-magnitude value is negative
    with that value at -0.993; our scale carries the sign, so the block's codes
    are mirrored (254 - c) and its extreme is stored exactly, which makes
    re-encoding decoded values reproduce the codes (the missing 1.0 is then on
    the other side).
    """
    rng = np.random.default_rng(1)
    x = rng.standard_normal((16, 1024)).astype(np.float32)
    x *= np.exp(rng.uniform(-8, 0, (16, 4, 1))).repeat(256, axis=2).reshape(16, 1024)
    if not signed:
        x = np.abs(x)
    theirs, absmax, code = _bnb_quantize(x, signed)
    codec = storage.Codec((16, 1024), storage.DynamicMap(signed, 8), "block", 256)
    q = storage.encode(jnp.asarray(x), codec)
    ours = np.asarray(q.codes).astype(np.int64).reshape(-1)
    scale = np.asarray(q.scales[0]).reshape(-1)
    np.testing.assert_array_equal(np.abs(scale), absmax)
    positive = np.repeat(scale > 0, 256)
    ours_as_bnb = np.where(positive, ours, 254 - ours)
    normed = (x.reshape(-1, 256) / absmax[:, None]).reshape(-1)
    exact = np.searchsorted(_midpoints(code), normed, side="left")
    # (1) ours are round-to-nearest on the table (mirrored for negative blocks); a
    # value within a few ulps of a midpoint may take either neighbour (we scale by
    # the reciprocal of the block's scale, a rounding away from x / absmax).
    extreme = (~positive) & (np.abs(normed) == 1)
    assert np.all(ours[extreme] == 255) and np.all(theirs[extreme] == 0)
    # In a mirrored block the table's missing -1.0 is on the other side: a value of
    # the extreme's opposite sign within 0.35% of it gets 0.993 instead of 1.0.
    top_of_mirrored = ~positive & (exact == 255) & (ours_as_bnb == 254)
    off = (ours_as_bnb != exact) & ~extreme & ~top_of_mirrored
    near_mid = np.min(np.abs(normed[off, None] - _midpoints(code)[None, :]), axis=1)
    assert np.all(near_mid <= 4 * np.spacing(np.float32(1))), normed[off]
    assert off.sum() <= 3
    # (2) bitsandbytes' kernel differs from nearest only next to a midpoint, by one code
    kernel_off = theirs != exact
    gap = np.min(np.abs(normed[kernel_off, None] - _midpoints(code)[None, :]), axis=1)
    assert np.all(gap < 5e-5) and np.all(np.abs(theirs - exact)[kernel_off] == 1)
    assert kernel_off.mean() < 0.01


def test_4bit_codes_match_torchao_qmaps():
    """torchao's 4-bit binary search + rounding, on the same normalized values
    (it rounds an exact midpoint up; we take the lower code there, like bucketize)."""
    torch = pytest.importorskip("torch")
    subclass = pytest.importorskip("torchao.optim.subclass_4bit", reason="torchao is not installed")
    quant = pytest.importorskip("torchao.optim.quant_utils")
    for vmap, qmap in (
        (storage.DynamicMap(True, 4), subclass.get_qmap_signed()),
        (storage.LinearMap(4), subclass.get_qmap_unsigned()),
    ):
        x = _mixed_scale_values(50_000, vmap.signed, seed=3)
        theirs = quant.quantize_4bit_with_qmap(torch.tensor(x), torch.tensor(qmap)).numpy()
        ours = np.asarray(vmap.encode(jnp.asarray(x)))
        at_midpoint = np.isin(x, _midpoints(np.asarray(qmap, np.float32)))
        np.testing.assert_array_equal(ours[~at_midpoint], theirs[~at_midpoint])


def test_mu_keeps_its_sign():
    """Round to nearest on the signed map: a decoded mu has mu's sign, or is zero."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((64, 512)).astype(np.float32) * np.logspace(-6, 0, 512)
    for fmt in FORMATS:
        codec = storage.PRESETS[fmt].mu_codec(x.shape)
        decoded = np.asarray(storage.decode(storage.encode(jnp.asarray(x), codec)))
        assert np.all((np.sign(decoded) == np.sign(x)) | (decoded == 0)), fmt


# ----------------------------------------------------------------------------- state layout

LAYOUT_PARAMS = {  # shapes only (the layout is read from jax.eval_shape)
    "w": jax.ShapeDtypeStruct((64, 512), jnp.float32),  # 8-bit: 2 blocks per row
    "emb": jax.ShapeDtypeStruct((301, 64), jnp.float32),  # odd rows, shorter than a block
    "conv": jax.ShapeDtypeStruct((3, 3, 32, 64), jnp.float32),  # n-D
    "vec": jax.ShapeDtypeStruct((8200,), jnp.float32),  # 1-D, last block partial
    "bias": jax.ShapeDtypeStruct((512,), jnp.float32),  # too small: float32 moments
    "h": jax.ShapeDtypeStruct((64, 128), jnp.bfloat16),  # 8192 values: quantized
    "z": jax.ShapeDtypeStruct((100, 50), jnp.complex64),  # complex: never quantized
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_state_holds_uint8_codes_and_fp32_scales(fmt):
    state = jax.eval_shape(adam_jax.scale_by_adam(moments=fmt).init, LAYOUT_PARAMS)
    for name, p in LAYOUT_PARAMS.items():
        for field in ("mu", "nu"):
            moment = getattr(state, field)[name]
            if name in ("bias", "z"):
                complex_mu = name == "z" and field == "mu"
                assert moment.shape == p.shape
                assert moment.dtype == (jnp.complex64 if complex_mu else jnp.float32)
                continue
            assert isinstance(moment, adam_jax.QuantizedArray), name
            assert moment.codes.dtype == jnp.uint8
            assert all(s.dtype == jnp.float32 for s in moment.scales)
            if fmt == "8bit":
                assert moment.codes.shape == p.shape  # one byte per moment
            else:  # two codes per byte: rows 2i and 2i + 1 share byte row i
                rows, cols = moment.codec.grid
                blocked = moment.codec.norm == "block"
                padded_cols = moment.codec.blocks * 128 if blocked else cols
                assert moment.codes.size == -(-rows // 2) * padded_cols
                assert moment.codes.size <= 0.5 * p.size + padded_cols
    w_mu, w_nu = state.mu["w"], state.nu["w"]
    if fmt == "8bit":
        assert w_mu.scales[0].shape == (64, 2) and w_nu.scales[0].shape == (64, 2)
        assert state.mu["emb"].scales[0].shape == (301, 1)
        assert state.mu["vec"].scales[0].shape == (33,)  # ceil(8200 / 256)
    else:  # rank-1: per-axis extremes
        assert [s.shape for s in w_mu.scales] == [(64,), (512,)]
        assert [s.shape for s in state.nu["conv"].scales] == [(3,), (3,), (32,), (64,)]
        assert state.mu["vec"].scales[0].shape == (65,)  # ceil(8200 / 128)


def test_bytes_per_param_on_a_gpt2_like_tree():
    """GPT-2 small's shapes (one of its 12 blocks, so the test stays fast; the
    benchmark counts all 124M params: 2.04 and 1.02 bytes per param)."""
    from benchmarks.shapes import gpt2_like

    params = gpt2_like(n_layer=1)
    n = sum(x.size for x in jax.tree.leaves(params))
    for fmt, limit in (("8bit", 2.1), ("4bit", 1.1)):
        state = jax.eval_shape(adam_jax.adamw(1e-3, moments=fmt).init, params)
        assert storage.state_bytes(state) / n <= limit, fmt


@pytest.mark.parametrize("rows", [1, 7, 8, 64, 72, 515, 2048, 4104])
def test_axis_extremes_equal_numpy_for_every_row_count(rows):
    """Rank-1 scales: the signed extreme over every axis but one, reduced in groups of 8
    rows (and in stages of 8 for the columns); exactly numpy's, inf and NaN ignored."""
    rng = np.random.default_rng(rows)
    x = (rng.standard_normal((rows, 24)) * np.logspace(-3, 2, 24)).astype(np.float32)
    x[rng.integers(rows), rng.integers(24)] = np.inf
    x[rng.integers(rows), rng.integers(24)] = np.nan
    finite = np.where(np.isfinite(x), x, 0)
    for keep in (0, 1):
        got = np.asarray(
            jax.jit(storage._axis_extreme, static_argnums=1)(
                storage._finite_or_zero(jnp.asarray(x)), keep
            )
        )
        axis = 1 - keep
        hi, lo = finite.max(axis), finite.min(axis)
        np.testing.assert_array_equal(got, np.where(hi >= -lo, hi, lo))


@pytest.mark.parametrize("shape", [(7, 520), (3, 100), (2, 3, 90)])
def test_rows_ending_in_a_partial_block_match_the_padded_layout(shape):
    """8-bit rows whose length is not a multiple of the block size are cut into whole
    blocks and a shorter last one (no zero-padded copy): codes, scales and decoded
    values equal those of the zero-padded layout bitwise, non-finite values included."""

    class Padded(storage.Codec):
        @property
        def _partial_blocks(self):
            return False

    rng = np.random.default_rng(0)
    quant = adam_jax.QuantizedMoments(bits=8)
    for codec in (quant.mu_codec(shape), quant.nu_codec(shape)):
        x = (rng.standard_normal(shape) * rng.uniform(0, 3, shape) ** 6).astype(np.float32)
        x = np.abs(x) if codec.root else x
        x[0, ..., -1] = np.inf if codec.root else -np.inf
        padded = Padded(codec.shape, codec.map, codec.norm, codec.block_size, codec.root)
        got = storage.encode(jnp.asarray(x), codec)
        want = jax.jit(padded.encode)(jnp.asarray(x))
        assert codec._partial_blocks and _leaves_equal(got, want)
        back = jax.jit(padded.decode)(storage.QuantizedArray(want.codes, want.scales, padded))
        np.testing.assert_array_equal(storage.decode(got), back)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    "shape", [(1001, 512), (1000, 512), (1000, 520)], ids=["odd_rows", "rows_of_8", "partial_block"]
)
def test_the_compiled_step_keeps_its_temporaries_small(fmt, shape):
    """The jitted, donated step's temporary memory stays near 2 bytes per param (the new
    codes before they replace the old ones), whatever the row count: a leaf whose
    rows are odd, or not a multiple of 8, used to be zero-padded for the column
    extremes and the 4-bit row pairs, and each pad wrote a float32 moment out in
    full (16 bytes per param on GPT-2's 50257 x 768 embedding); a row length that
    is not a multiple of the block size was padded to whole blocks (8-bit,
    1000 x 520: 23.7 bytes per param)."""
    tx = adam_jax.adamw(1e-3, moments=fmt)
    p = jax.ShapeDtypeStruct(shape, jnp.float32)
    state = jax.eval_shape(tx.init, p)

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(p, state, p).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp <= 2.5 * shape[0] * shape[1], temp / (shape[0] * shape[1])


def test_small_leaves_keep_float32_moments_and_min_size_is_settable():
    params = {
        "a": jax.ShapeDtypeStruct((4095,), jnp.float32),
        "b": jax.ShapeDtypeStruct((4096,), jnp.float32),
        "c": jax.ShapeDtypeStruct((64, 64), jnp.float16),
        "s": jax.ShapeDtypeStruct((10,), jnp.bfloat16),
    }
    state = jax.eval_shape(adam_jax.scale_by_adam(moments="8bit").init, params)
    assert state.mu["a"].dtype == jnp.float32 and state.nu["a"].dtype == jnp.float32
    assert state.mu["s"].dtype == jnp.float32  # small bfloat16 leaf: float32 moments
    assert isinstance(state.mu["b"], adam_jax.QuantizedArray)
    assert isinstance(state.nu["c"], adam_jax.QuantizedArray)  # float16 params: quantized
    custom = adam_jax.QuantizedMoments(bits=8, block_size=128, min_size=10_000)
    state = jax.eval_shape(adam_jax.scale_by_adam(moments=custom).init, params)
    assert not any(isinstance(x, adam_jax.QuantizedArray) for x in state.mu.values())


def test_eligibility_uses_the_global_shape():
    """8 x 1024 sharded 8 ways is 1024 values per shard, but 8192 in all: quantized."""
    mesh = jax.sharding.AbstractMesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    params = {"w": jax.ShapeDtypeStruct((8, 1024), jnp.float32, sharding=sharding)}
    state = jax.eval_shape(adam_jax.adamw(1e-3, moments="8bit").init, params)
    assert isinstance(state[0].mu["w"], adam_jax.QuantizedArray)
    assert state[0].mu["w"].scales[0].shape == (8, 4)
    concrete = {"w": jnp.ones((8, 1024))}
    tx = adam_jax.adamw(1e-3, moments="8bit")
    eager = jax.tree.structure(tx.init(concrete))
    assert eager == jax.tree.structure(jax.jit(tx.init)(concrete))
    assert eager == jax.tree.structure(jax.eval_shape(tx.init, concrete))


# ----------------------------------------------------------------------------- transform

SMALL = {"w": jnp.ones((32, 256)), "vec": jnp.ones((4100,)), "bias": jnp.ones((7,))}
ONE = {"w": jnp.ones((32, 256)), "bias": jnp.ones((7,))}


def _grads(params, seed=0, scale=0.1):
    keys = jax.random.split(jax.random.key(seed), len(jax.tree.leaves(params)))
    leaves, treedef = jax.tree.flatten(params)
    out = [
        (scale * jax.random.normal(k, p.shape, jnp.float32)).astype(p.dtype)
        for k, p in zip(keys, leaves, strict=True)
    ]
    return treedef.unflatten(out)


CONSTRUCTORS = {
    "adamw": lambda fmt: adam_jax.adamw(1e-3, moments=fmt),
    "amsgrad": lambda fmt: adam_jax.amsgrad(1e-3, moments=fmt),
    "nadam": lambda fmt: adam_jax.nadam(1e-3, moments=fmt),
    "nadamw": lambda fmt: adam_jax.nadamw(1e-3, moments=fmt),
    "adam": lambda fmt: adam_jax.adam(1e-3, moments=fmt),
    "scale_by_adam": lambda fmt: adam_jax.scale_by_adam(moments=fmt),
    "torch_adam": lambda fmt: adam_jax.compat.torch_adam(moments=fmt, amsgrad=True),
    "torch_adamw": lambda fmt: adam_jax.compat.torch_adamw(moments=fmt),
    "keras_adam": lambda fmt: adam_jax.compat.keras_adam(moments=fmt),
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_constructor_keeps_its_state_types_under_strict_promotion(fmt):
    """update's state has init's structure, shapes and dtypes (traced abstractly),
    under strict dtype promotion, with a bfloat16 leaf too."""
    params = {**SMALL, "h": jnp.ones((64, 128), jnp.bfloat16)}
    grads = _grads(params)
    with jax.numpy_dtype_promotion("strict"):
        for name, make in CONSTRUCTORS.items():
            tx = make(fmt)
            state = jax.eval_shape(tx.init, params)
            _, new = jax.eval_shape(tx.update, grads, state, params)
            assert jax.tree.structure(new) == jax.tree.structure(state), name
            for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(state), strict=True):
                assert (a.dtype, a.shape) == (b.dtype, b.shape), name


@pytest.mark.parametrize("fmt", FORMATS)
def test_state_goes_through_lax_cond(fmt):
    tx = adam_jax.adamw(1e-3, moments=fmt)
    grads = _grads(ONE)

    @jax.jit
    def step(state, flag):
        return jax.lax.cond(flag, lambda s: tx.update(grads, s, ONE)[1], lambda s: s, state)

    with jax.numpy_dtype_promotion("strict"):
        state = tx.init(ONE)
        stepped = step(step(state, True), True)
        kept = step(stepped, False)
    assert _leaves_equal(kept, stepped)
    assert int(stepped[0].count) == 2


@pytest.mark.parametrize("fmt", FORMATS)
def test_jit_equals_eager_and_grouped_equals_per_leaf(fmt):
    """One step, bitwise, in all four combinations. (Over several steps eager and
    jit differ by float32 ulps already with fp32 moments: the bias corrections
    are formed differently; the layouts stay bitwise equal under jit.)"""
    params = {"w": jnp.ones((32, 256)), "s0": jnp.full((9,), 0.5), "s1": jnp.full((5,), 2.0)}
    grads = _grads(params)
    results = {}
    for layout in ("per_leaf", "grouped"):
        tx = adam_jax.adamw(1e-3, moments=fmt, layout=layout)
        state = tx.init(params)
        for mode, update in (("eager", tx.update), ("jit", jax.jit(tx.update))):
            u, new = update(grads, state, params)
            results[layout, mode] = (u, adam_jax.state_to_tree(new))
    first = results["per_leaf", "jit"]
    for key, value in results.items():
        assert _leaves_equal(value, first), key


def _robustness_run(moments, steps=100, shape=(128, 1024), lr=1e-3):
    """Gradients with per-column scales spanning 1e-4..1 in one weight (shuffled)."""
    scales = jnp.asarray(np.random.default_rng(0).permutation(np.logspace(-4, 0, shape[1])))
    tx = adam_jax.scale_by_adam(moments=moments)
    b1, b2 = 0.9, 0.999

    def step(carry, key):
        p, state = carry
        g = jax.random.normal(key, shape) * scales.astype(jnp.float32)
        u, state = tx.update(g, state, p)
        coef = adam_coefficients(state.count, b1, b2, convention=Convention.OPTAX, nesterov=False)
        bound = storage.step_bound(coef, one_minus(b1), one_minus(b2), state.count)
        return (p - lr * u, state), jnp.max(jnp.abs(u)) / bound

    p0 = jnp.zeros(shape)
    keys = jax.random.split(jax.random.key(0), steps)
    (p, _), excess = jax.jit(lambda c: jax.lax.scan(step, c, keys))((p0, tx.init(p0)))
    return np.asarray(p - p0), np.asarray(excess)


def test_robustness_on_mixed_column_scales():
    """Max displacement after 100 steps relative to fp32 Adam's: <= 1.5x, and no
    element ever steps beyond fp32 Adam's largest possible step.

    Anchors on this kind of stream (BUILD_NOTES): bitsandbytes AdamW8bit 1.1-1.3x,
    torchao AdamW8bit diverges (hundreds x), torchao AdamW4bit 0.9-1.0x; the
    8-bit layout here without sqrt(nu) and without the clip: 629x.
    """
    ref, ref_excess = _robustness_run(None)
    assert ref_excess.max() <= 1.0 + 1e-6  # the bound holds for fp32 Adam itself
    for fmt in FORMATS:
        moved, excess = _robustness_run(fmt)
        ratio = np.abs(moved).max() / np.abs(ref).max()
        assert ratio <= 1.5, (fmt, ratio)
        assert excess.max() <= 1.0 + 1e-6, (fmt, excess.max())


@pytest.mark.parametrize("fmt", FORMATS)
def test_state_to_tree_decodes_and_state_from_tree_reencodes_bitwise(fmt):
    params = {
        "w": jnp.ones((32, 256)),
        "e": jnp.ones((33, 128)),  # odd rows: 4-bit pads a row pair
        "b": jnp.ones((7,)),
        "z": jnp.ones((70, 60), jnp.complex64),
    }
    tx = adam_jax.amsgrad(1e-3, moments=fmt, layout="grouped")
    _, state = jax.jit(tx.update)(_grads(params), tx.init(params), params)
    tree = adam_jax.state_to_tree(state)
    for field in ("mu", "nu", "nu_max"):
        for name, p in params.items():
            leaf = getattr(tree[0], field)[name]
            assert isinstance(leaf, jax.Array) and leaf.shape == p.shape
            complex_mu = name == "z" and field == "mu"
            assert leaf.dtype == (jnp.complex64 if complex_mu else jnp.float32)
    # Encoding the decoded values reproduces the codes and scales bit for bit ...
    back = adam_jax.state_from_tree(tree, like=state)
    assert jax.tree.structure(back) == jax.tree.structure(state)
    assert _leaves_equal(back, state)
    # ... also into an abstract target, and into the per-leaf layout.
    target = jax.eval_shape(tx.init, params)
    assert _leaves_equal(adam_jax.state_from_tree(tree, like=target), state)
    per_leaf = adam_jax.amsgrad(1e-3, moments=fmt)
    moved = adam_jax.state_from_tree(tree, like=jax.eval_shape(per_leaf.init, params))
    assert _leaves_equal(adam_jax.state_to_tree(moved), tree)


def test_a_state_on_bitsandbytes_maps_moves_to_the_float_maps():
    """An 8-bit state written with ``mu_map="dynamic", nu_map="dynamic"`` (the default
    before the float maps) continues on the float maps through the portable tree: the
    moments re-encoded to within the float maps' rounding (1/16 relative, and the
    smallest code), the step count kept."""
    params = {"w": jnp.ones((32, 512)), "v": jnp.ones((8192,))}
    old = adam_jax.adamw(
        1e-3, moments=adam_jax.QuantizedMoments(mu_map="dynamic", nu_map="dynamic")
    )
    state = old.init(params)
    for seed in range(3):
        _, state = jax.jit(old.update)(_grads(params, seed), state, params)
    tree = adam_jax.state_to_tree(state)
    new = adam_jax.adamw(1e-3, moments="8bit")
    moved = adam_jax.state_from_tree(tree, like=jax.eval_shape(new.init, params))
    assert moved[0].mu["w"].codec.map == storage.FloatMap(True, 8, 3)
    assert int(moved[0].count) == 3
    back = adam_jax.state_to_tree(moved)
    for field in ("mu", "nu"):
        for name in params:
            want = np.asarray(getattr(tree[0], field)[name])
            got = np.asarray(getattr(back[0], field)[name])
            assert np.all((np.sign(got) == np.sign(want)) | (got == 0))
            tol = np.abs(want) / 16 + 2e-5 * np.abs(want).max()
            assert np.all(np.abs(got - want) <= tol), (field, name)
    _, stepped = jax.jit(new.update)(_grads(params, 9), moved, params)
    assert int(stepped[0].count) == 4


def test_moments_from_an_optax_state():
    """An fp32 optax state continues as a quantized one (encoded on the way in)."""
    opt = optax.adamw(1e-3)
    opt_state = opt.init(ONE)
    _, opt_state = opt.update(_grads(ONE), opt_state, ONE)
    like = adam_jax.adamw(1e-3, moments="8bit").init(ONE)
    state = adam_jax.from_optax_state(opt_state, like)
    mu = adam_jax.state_to_tree(state)[0].mu["w"]
    want = np.asarray(opt_state[0].mu["w"])
    block_max = np.abs(want).reshape(32, 1, 256).max(-1, keepdims=True).repeat(256, -1)
    assert np.all(np.abs(np.asarray(mu) - want) <= 0.05 * block_max.reshape(32, 256))
    assert int(state[0].count) == 1


def test_moments_and_storage_dtypes_are_exclusive_and_bad_values_raise():
    for kwargs in (dict(mu_dtype=jnp.bfloat16), dict(nu_dtype=jnp.float32)):
        with pytest.raises(ValueError, match="cannot be combined with mu_dtype/nu_dtype"):
            adam_jax.scale_by_adam(moments="8bit", **kwargs)
        with pytest.raises(ValueError, match="cannot be combined"):
            adam_jax.adamw(1e-3, moments="4bit", **kwargs)
    with pytest.raises(ValueError, match="moments must be"):
        adam_jax.adam(1e-3, moments="16bit")
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        adam_jax.QuantizedMoments(bits=3)
    for bad in (255, 96, 384, 0, 1, -128, 128.0, True, "256"):
        with pytest.raises(
            ValueError, match=f"block_size must be a power of two >= 2, got {bad!r}"
        ):
            adam_jax.QuantizedMoments(block_size=bad)
    for good in (2, 64, 512):
        assert adam_jax.QuantizedMoments(block_size=good).block_size == good
    for bad in (0, -1, 4096.0, None):
        with pytest.raises(ValueError, match="min_size must be an int >= 1"):
            adam_jax.QuantizedMoments(min_size=bad)
    with pytest.raises(ValueError, match="mu_norm"):
        adam_jax.QuantizedMoments(mu_norm="rows")
    assert adam_jax.QuantizedMoments(bits=8) == storage.resolve_moments("8bit")
    assert storage.resolve_moments("fp32") is None and storage.resolve_moments(None) is None
    # Default: optax's own state, unchanged.
    assert isinstance(adam_jax.adam(1e-3).init(SMALL)[0], optax.ScaleByAdamState)


@pytest.mark.parametrize("fmt", FORMATS)
def test_shard_state_on_a_one_device_mesh(fmt):
    mesh = jax.make_mesh((1,), ("data",))
    inner = adam_jax.adamw(1e-3, moments=fmt)
    tx = adam_jax.shard_state(inner, mesh, "data")
    grads = _grads(ONE)
    u, state = jax.jit(tx.update)(grads, tx.init(ONE), ONE)
    u_ref, state_ref = jax.jit(inner.update)(grads, inner.init(ONE), ONE)
    assert _leaves_equal(u, u_ref)
    assert _leaves_equal(adam_jax.state_to_tree(state), adam_jax.state_to_tree(state_ref))


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan, 3e38], ids=["inf", "-inf", "nan", "3e38"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_non_finite_gradients_stay_local_as_in_the_float32_path(fmt, bad):
    """One non-finite (or squaring-to-inf) gradient element: its step is the float32
    path's (0 for inf, NaN for NaN), and it never spreads to its block, row or column;
    the stored moments stay finite."""
    params = {"w": jnp.ones((16, 512))}
    rng = np.random.default_rng(0)
    grads = [jnp.asarray(rng.standard_normal((16, 512)), jnp.float32) for _ in range(4)]
    grads[0] = grads[0].at[3, 7].set(bad)
    results = {}
    for moments in (None, fmt):
        tx = adam_jax.adam(1e-2, moments=moments)
        state, p, steps = tx.init(params), params, []
        for g in grads:
            u, state = jax.jit(tx.update)({"w": g}, state, p)
            p = optax.apply_updates(p, u)
            steps.append(np.asarray(u["w"]))
        results[moments] = (steps, np.asarray(p["w"]), state)
    (ref_steps, ref_p, _), (steps, p, state) = results[None], results[fmt]
    others = np.ones((16, 512), bool)
    others[3, 7] = False
    for step in steps:
        assert np.all(np.isfinite(step[others]))
    np.testing.assert_array_equal(steps[0][3, 7], ref_steps[0][3, 7])  # 0, or NaN
    assert np.isnan(p[3, 7]) == np.isnan(ref_p[3, 7])
    assert np.all(np.isfinite(p[others]))
    for leaf in jax.tree.leaves(adam_jax.state_to_tree(state)):
        assert np.all(np.isfinite(np.asarray(leaf)))


@pytest.mark.parametrize("layout", ["per_leaf", "grouped"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_orbax_round_trip_is_bitwise(fmt, layout, tmp_path):
    """The quantized state itself (codes and scales) through orbax, restored into
    ``jax.eval_shape(tx.init, params)``; and its layout-free form into fp32 state."""
    ocp = pytest.importorskip("orbax.checkpoint")
    tx = adam_jax.adamw(1e-2, weight_decay=0.1, moments=fmt, layout=layout)
    state = tx.init(SMALL)
    step = jax.jit(tx.update)
    for seed in range(3):
        _, state = step(_grads(SMALL, seed), state, SMALL)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "state", state)
        checkpointer.save(tmp_path / "tree", adam_jax.state_to_tree(state))
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(tmp_path / "state", jax.eval_shape(tx.init, SMALL))
        tree = checkpointer.restore(
            tmp_path / "tree", jax.eval_shape(lambda: adam_jax.state_to_tree(state))
        )
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    assert _leaves_equal(restored, state)
    grads = _grads(SMALL, 9)
    assert _leaves_equal(step(grads, restored, SMALL), step(grads, state, SMALL))
    # Switch the run to fp32 state: the dequantized moments, exactly.
    fp32 = adam_jax.adamw(1e-2, weight_decay=0.1, layout=layout)
    moved = adam_jax.state_from_tree(tree, like=fp32.init(SMALL))
    assert _leaves_equal(adam_jax.state_to_tree(moved), adam_jax.state_to_tree(state))


@pytest.mark.parametrize("fmt", FORMATS)
def test_nnx_optimizer_trains_like_bare_params(fmt):
    """``nnx.Optimizer`` keeps a quantized moment's codes and scales as its own
    variables through eager and jitted updates; the params follow the same run on a
    plain dict of arrays."""
    nnx = pytest.importorskip("flax.nnx")
    model = nnx.Linear(256, 64, rngs=nnx.Rngs(0))  # kernel: 16,384 elements, quantized
    tx = adam_jax.adamw(1e-2, weight_decay=1e-2, moments=fmt)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x = jax.random.normal(jax.random.key(1), (8, 256))

    def loss(layer):
        return jnp.mean(jnp.sin(layer(x)) ** 2)

    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    state = tx.init(params)

    def plain_loss(p):
        return jnp.mean(jnp.sin(x @ p["kernel"] + p["bias"]) ** 2)

    @jax.jit
    def plain_step(p, s):
        u, s = tx.update(jax.grad(plain_loss)(p), s, p)
        return optax.apply_updates(p, u), s

    graphdef, nnx_state = None, None
    for i in range(6):
        params, state = plain_step(params, state)
        if i < 3:  # eager nnx updates
            optimizer.update(model, nnx.grad(loss)(model))
            if i == 2:
                graphdef, nnx_state = nnx.split((model, optimizer))
        else:  # jitted, through split/merge

            @jax.jit
            def nnx_step(st):
                m, o = nnx.merge(graphdef, st)
                o.update(m, nnx.grad(loss)(m))
                return nnx.state((m, o))

            nnx_state = nnx_step(nnx_state)
    model, optimizer = nnx.merge(graphdef, nnx_state)
    got = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    # The nnx and plain programs are compiled differently (eager, and one jit around
    # merge/grad/update), so a moment within an ulp of a rounding midpoint may take
    # the other code in one of them, and its effect spreads a little through the
    # loss (one 4-bit code is up to a third of its value); state mishandled by nnx
    # (reset, flattened, stale) moves most params by ~lr (1e-2) per step.
    for k in ("kernel", "bias"):
        close = np.isclose(got[k], params[k], rtol=1e-5, atol=1e-7)
        assert close.mean() >= 0.97, (k, close.mean())
        np.testing.assert_allclose(got[k], params[k], rtol=0, atol=5e-3)
    mu = nnx.as_pure(optimizer.opt_state)[0].mu["kernel"]
    assert storage.is_quantized(mu) and mu.codes.dtype == jnp.uint8
    assert int(nnx.as_pure(optimizer.opt_state)[0].count) == 6


# ----------------------------------------------------------------------------- peers


def _peer_stream(shape=(64, 1024), steps=30, seed=0):
    rng = np.random.default_rng(seed)
    scales = rng.permutation(np.logspace(-4, 0, shape[1])).astype(np.float32)
    p0 = (0.1 * rng.standard_normal(shape)).astype(np.float32)
    grads = [rng.standard_normal(shape).astype(np.float32) * scales for _ in range(steps)]
    return p0, grads


LR, WD = 1e-3, 1e-2


def _torch_displacement(cls, p0, grads, **kwargs):
    torch = pytest.importorskip("torch")
    p = torch.nn.Parameter(torch.tensor(p0))
    opt = cls([p], lr=LR, weight_decay=WD, **kwargs)
    for g in grads:
        p.grad = torch.tensor(g)
        opt.step()
    return p.detach().numpy() - p0


def _ours_displacement(moments, p0, grads):
    tx = adam_jax.compat.torch_adamw(lr=LR, weight_decay=WD, moments=moments)

    def step(carry, g):
        p, s = carry
        u, s = tx.update(g, s, p)
        return (optax.apply_updates(p, u), s), None

    p = jnp.asarray(p0)
    run = jax.jit(lambda c, gs: jax.lax.scan(step, c, gs))
    (p, _), _ = run((p, tx.init(p)), jnp.asarray(grads))
    return np.asarray(p) - p0


@pytest.fixture(scope="module")
def peer_results():
    torch = pytest.importorskip("torch")
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    ao = pytest.importorskip("torchao.optim", reason="torchao is not installed")
    p0, grads = _peer_stream()
    ref = _torch_displacement(torch.optim.AdamW, p0, grads, foreach=False)

    def stats(d):
        return {
            "max_ratio": float(np.abs(d).max() / np.abs(ref).max()),
            "median_err": float(np.median(np.abs(d - ref)) / np.median(np.abs(ref))),
        }

    compile_ = torch.compile
    torch.compile = lambda f, **kw: f  # torchao compiles its step; eager is the same math
    try:
        peers = {
            "bnb8": _torch_displacement(bnb.optim.AdamW8bit, p0, grads),
            "ao8": _torch_displacement(ao.AdamW8bit, p0, grads),
            "ao4": _torch_displacement(ao.AdamW4bit, p0, grads),
        }
    finally:
        torch.compile = compile_
    out = {k: stats(v) for k, v in peers.items()}
    out["fp32"] = stats(_ours_displacement(None, p0, grads))
    for fmt in FORMATS:
        out[fmt] = stats(_ours_displacement(fmt, p0, grads))
    return out


def test_accuracy_against_bitsandbytes_and_torchao(peer_results):
    """Same stream (per-column scales 1e-4..1), same torch AdamW convention; error of
    the final displacement against torch.optim.AdamW in float32."""
    r = peer_results
    assert r["fp32"]["median_err"] < 1e-4
    assert r["8bit"]["median_err"] <= r["bnb8"]["median_err"]
    assert r["8bit"]["median_err"] <= r["ao8"]["median_err"]
    assert r["4bit"]["median_err"] <= r["ao4"]["median_err"]
    for fmt in FORMATS:
        assert r[fmt]["max_ratio"] <= 1.5, (fmt, r[fmt])
