"""Low-memory moment storage: quantized codes, encoded and decoded around the one Adam formula.

A storage format never computes Adam: the transform decodes the stored moments
to float32, runs :func:`adam_jax._math.adam_leaf` unchanged on them and the
gradient, and encodes the *new* moments; the update itself comes from the new,
unquantized moments. This module holds the encode/decode half only.

Formats (``moments=`` on every constructor):

* ``"8bit"``: blockwise quantization in the style of bitsandbytes (Dettmers et
  al., 2022, arXiv:2110.02861): blocks of 256 values with an fp32 scale each
  (the block's largest finite magnitude), codes on a small float format read
  straight from float32's bits (:class:`FloatMap`): ``mu`` signed with 4 exponent
  and 3 mantissa bits (``2**-16 .. 1`` of the block's scale), ``nu`` unsigned with
  5 exponent and 3 mantissa bits (``2**-32 .. 1``): a ``nu`` 1e-8 times its
  block's largest stays off code 0 (``m / (0 + eps)`` is what made torchao's
  AdamW8bit diverge on mixed-scale gradients). bitsandbytes' own dynamic maps
  are ``QuantizedMoments(bits=8, mu_map="dynamic", nu_map="dynamic")`` (``nu``
  stored as ``sqrt(nu)`` there, for range): more precise next to the block's
  largest value, but their codec costs about 30 selects per value, and the step
  on CPU is 4-5x the fp32 step instead of under 2x (BUILD_NOTES, "8-bit codec").
* ``"4bit"`` (Li, Chen & Zhu, NeurIPS 2023, arXiv:2309.01507): ``nu`` with
  rank-1 normalization (each value divided by the minimum of its row's and
  its column's maximum; for n-D leaves the minimum of the per-axis maxima) on
  the linear map that excludes zero, ``(i + 1) / 16``; ``mu`` rank-1 normalized
  too by default, on a 4-bit float map (sign, 2 exponent bits, 1 mantissa bit:
  ``0, 0.125 .. 1``), which tracked fp32 Adam more closely than the paper's
  signed 4-bit dynamic map (``mu_map="dynamic"``) on every stream measured. The
  paper's blocks of 128 for ``mu`` are ``QuantizedMoments(bits=4,
  mu_norm="block")`` (on gradients whose scale varies by column, a block mixes
  scales and a small ``mu`` sticks at the map's smallest code, stepping 3x
  further than fp32 Adam; see BUILD_NOTES). 1-D leaves use blocks of 128 for
  both. Two codes per byte.
* :class:`QuantizedMoments` for custom settings.

Codecs are arithmetic, not table searches, and no gather sits in the fused step
(a gather in an XLA:CPU loop fusion scalarizes the loop). The float maps round
by adding half a unit of the kept mantissa to the float32 bits and shifting;
they decode with a shift and an add. The dynamic map is ``sign * 10**-e *
fraction`` with a linear fraction in each decade, so a code is found from a few
compares against the decade edges and one multiply, and a value is decoded from
the code's float32 bits; its codes are the round-to-nearest codes of the
bitsandbytes table (tested against ``torch.bucketize`` on its midpoints).

Layout: a leaf of shape ``(d0, d1, ...)`` is a grid of ``d0`` rows of
``d1 * ...`` values (a 1-D leaf: rows of ``block_size`` values), and blocks
are cut along each row (the last block of a row may be shorter). A leaf
sharded along its leading axis (what :func:`adam_jax.shard_state` picks when
it divides) therefore holds whole blocks, whatever the shard count; a sharded
1-D leaf holds whole blocks when its shard length is a multiple of the block
size. Eligibility (at least ``min_size`` elements, real floating, at most 32
bits) is decided from the leaf's global shape and dtype, never a shard's.

The update is also clipped, elementwise, to the largest step fp32 Adam can
take (:func:`step_bound`): decoded moments need not be consistent with each
other, and an element whose ``nu`` decodes too small would otherwise step far
beyond anything fp32 Adam does.
"""

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adam_jax._numerics import AdamCoefficients
from adam_jax._sharding import zeros_like_param

# ----------------------------------------------------------------------------- maps


def dynamic_map_table(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8):
    """``bitsandbytes.functional.create_dynamic_map`` in NumPy float32 (same values, sorted).

    For documentation and tests; the codec below computes the same values
    arithmetically.
    """
    data: list[float] = []
    non_sign_bits = total_bits - 1
    for i in range(max_exponent_bits):
        extra = 0 if signed else 1
        items = 2 ** (i + non_sign_bits - max_exponent_bits + extra) + 1
        bounds = np.linspace(0.1, 1, items, dtype=np.float32)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2.0)
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        data += (means * np.float32(scale)).tolist()
        if signed:
            data += (-(means * np.float32(scale))).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (2**total_bits - len(data))
    return np.sort(np.asarray(data, np.float32))


def _i32(x) -> jax.Array:
    return jnp.asarray(x, jnp.int32)


def _f32(x) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def _exp2_int(j: jax.Array) -> jax.Array:
    """``2.0 ** j`` (float32, exact) for integer ``j`` in the normal range, from its bits."""
    return jax.lax.bitcast_convert_type((j + 127) << 23, jnp.float32)


def _signed_absmax(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """The value of largest magnitude over ``axes``, with its sign (the max for
    non-negative ``x``; 0 for all-zero slices).

    One variadic (max, min) reduction: XLA:CPU fuses the producer of ``x``
    (decode and Adam's moment update) into it. A plain ``jnp.max`` is handed to
    a library reduction that first writes ``x`` out in full (a 4-byte-per-param
    temporary and an extra pass; the 8-bit step ran 3x slower).
    """
    return _pick_extreme(*_max_min(x, x, axes))


def _max_min(hi: jax.Array, lo: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """``(max(hi), min(lo))`` over ``axes`` in one variadic reduction."""
    ninf, pinf = np.float32(-np.inf), np.float32(np.inf)
    return jax.lax.reduce(
        (hi, lo),
        (ninf, pinf),
        lambda a, b: (jnp.maximum(a[0], b[0]), jnp.minimum(a[1], b[1])),
        axes,
    )


def _pick_extreme(hi: jax.Array, lo: jax.Array) -> jax.Array:
    """The one of the maximum ``hi`` and minimum ``lo`` of larger magnitude (``hi`` on a tie)."""
    return jnp.where(hi >= -lo, hi, lo)


def _axis_extreme(x: jax.Array, keep: int) -> jax.Array:
    """The value of largest magnitude, with its sign, over every axis but ``keep``
    (the maximum for non-negative ``x``).

    Reducing the last axis: one fused variadic reduction (:func:`_signed_absmax`).
    Keeping the last axis (column extremes), the rows are reduced in groups of
    8 first: XLA:CPU's loop for a fused reduction over a long leading axis
    strides through memory (20x slower than a row reduction on a 2048 x 4096
    leaf), and ``jnp.max`` there is a library reduction that first writes
    ``x`` out in full (4 bytes per param of temporary memory). A row count that
    is not a multiple of 8 leaves its last rows to a small second reduction; they
    used to be zero-padded, and the pad wrote ``x`` out in full (4-bit state on
    a 50257 x 768 embedding: 16 bytes per param of temporary memory).
    """
    axes = tuple(a for a in range(x.ndim) if a != keep)
    if x.ndim - 1 in axes:
        return _signed_absmax(x, axes)
    x = x.reshape(-1, x.shape[-1])
    rows, cols = x.shape
    main = rows - rows % 8
    parts = []
    if main:
        groups = x[:main].reshape(-1, 8, cols) if main != rows else x.reshape(-1, 8, cols)
        parts.append(_column_max_min(*_max_min(groups, groups, (1,))))
    if main != rows:
        parts.append(_max_min(x[main:], x[main:], (0,)))
    hi, lo = parts[0]
    for h, low in parts[1:]:
        hi, lo = jnp.maximum(hi, h), jnp.minimum(lo, low)
    return _pick_extreme(hi, lo)


def _column_max_min(hi: jax.Array, lo: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(max(hi), min(lo))`` over the leading axis of ``(rows, cols)`` arrays, in
    groups of 8 rows while they divide: the partial extremes of a 2048 x 4096 leaf
    (256 x 4096) took 3-4 ms in one strided reduction over the leading axis, and
    under 0.5 ms in stages."""
    while hi.shape[0] > 8 and hi.shape[0] % 8 == 0:
        hi, lo = _max_min(hi.reshape(-1, 8, hi.shape[1]), lo.reshape(-1, 8, lo.shape[1]), (1,))
    return _max_min(hi, lo, (0,))


def _finite_or_zero(x: jax.Array) -> jax.Array:
    """``x`` with inf and NaN as 0: non-finite values never set a block's scale."""
    return jnp.where(jnp.isfinite(x), x, _f32(0.0))


def _saturate_non_finite(x: jax.Array, extreme: jax.Array) -> jax.Array:
    """``x`` with +-inf as +-``extreme`` (the largest finite magnitude of its block, or
    of its rank-1 scale) and NaN as 0.

    The policy for non-finite moments (a non-finite or overflowing gradient): the
    step that receives it is computed from the unquantized moments, exactly as in
    the float32 path; what is stored stays local to the element. A block holding
    an inf would otherwise get an infinite scale and decode as NaN in every one of
    its values (256 params for 8-bit; a whole row and column for rank-1).
    """
    x = jnp.where(jnp.isnan(x), _f32(0.0), x)
    return jnp.where(jnp.isinf(x), jnp.sign(x) * extreme, x)


def _select_by_level(level: jax.Array, values: list[float]) -> jax.Array:
    """``values[level]`` for a small list, as a chain of selects (no gather)."""
    out = jnp.full(level.shape, values[0], jnp.float32)
    for i, v in enumerate(values[1:], start=1):
        out = jnp.where(level == i, jnp.float32(v), out)
    return out


@dataclasses.dataclass(frozen=True)
class DynamicMap:
    """bitsandbytes' dynamic map of ``bits`` bits (``create_dynamic_map(signed, bits - 1, bits)``).

    Decade ``i`` of ``levels = bits - 1`` holds ``2**(i + extra)`` values
    ``10**(i - levels + 1) * (0.1 + 0.9 * (k + 0.5) / 2**(i + extra))``
    (``extra`` = 0 signed, 1 unsigned), plus 0 and 1.0. Codes index the
    sorted table: signed codes are ``Z - q`` / ``Z + q`` around the zero code
    ``Z = 2**(bits-1) - 1``, where ``q`` is the rank of ``|x|`` among the
    non-negative values (there is no -1.0); unsigned codes are ``q``.
    """

    signed: bool
    bits: int

    @property
    def levels(self) -> int:
        return self.bits - 1

    @property
    def extra(self) -> int:
        return 0 if self.signed else 1

    #: Non-finite values are saturated before encoding (:func:`_saturate_non_finite`).
    saturates = False

    @property
    def signed_scale(self) -> bool:
        """The signed table has no -1.0: a block's scale carries the sign of its extreme,
        which then maps to +1.0 exactly (stored exactly, and re-encoding decoded values
        gives the same codes and scales)."""
        return self.signed

    @property
    def zero_code(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 0

    @property
    def top(self) -> int:
        """Rank ``q`` of 1.0 among the non-negative values."""
        return 2 ** (self.bits - 1) if self.signed else 2**self.bits - 1

    def table(self) -> np.ndarray:
        return dynamic_map_table(self.signed, self.levels, self.bits)

    def _rank(self, a: jax.Array) -> jax.Array:
        """Round-to-nearest rank ``q`` (float32) of ``a`` in [0, 1] among the non-negative values.

        Decade ``i`` covers ``[10**(i-E), 10**(i-E+1))``; compares against the
        decade edges pick its constants (cheaper than ``log10``), and within it
        the bin is ``floor((a * 10**(E-1-i) - 0.1) * nb / 0.9)``. Round to
        nearest across a decade's edge: below the midpoint between decade
        ``i-1``'s top value and decade ``i``'s bottom one the rank drops by one
        (decade 0: to the zero), above the midpoint between the top value and
        1.0 it is 1.0's.
        """
        E, extra = self.levels, self.extra
        above = [a >= np.float32(10.0 ** (i - E)) for i in range(1, E)]

        def per_decade(values) -> jax.Array:
            out = jnp.full(a.shape, np.float32(values[0]))
            for mask, v in zip(above, values[1:], strict=True):
                out = jnp.where(mask, np.float32(v), out)
            return out

        nb = [2.0 ** (i + extra) for i in range(E)]
        # t = (a * 10**(E-1-i) - 0.1) * nb / 0.9 is the position in the decade's bins:
        # the power of ten is an exact float32, so the bin edges are found to within
        # an ulp of the table's midpoints.
        bins = per_decade([n / 0.9 for n in nb])
        t = (a * per_decade([10.0 ** (E - 1 - i) for i in range(E)]) - _f32(0.1)) * bins
        base = jnp.round(bins * _f32(0.9)) + _f32(1 - 2**extra)  # rank of the decade's bin 0
        # Below the first bin's lower midpoint (t <= 0.2; in decade 0, the midpoint
        # to zero) the nearest value is the previous decade's top one; above
        # ``upper`` the nearest is 1.0.
        edge0 = (-0.05 * nb[0] + 0.225) / 0.9
        down = t <= jnp.where(above[0], _f32(0.2), _f32(edge0))
        upper = 1.0 - 0.225 / nb[-1]
        q = jnp.floor(t) + base - down.astype(jnp.float32)
        q = q + (a > np.float32(upper)).astype(jnp.float32)
        return jnp.clip(q, 0, self.top)

    def encode(self, x: jax.Array) -> jax.Array:
        """Nearest code (int32) of normalized ``x`` (in [-1, 1] signed, [0, 1] unsigned)."""
        if not self.signed:
            return self._rank(x).astype(jnp.int32)
        q = self._rank(jnp.abs(x))
        negative = x < 0
        z = np.float32(self.zero_code)
        code = jnp.where(negative, z - jnp.minimum(q, np.float32(self.top - 1)), z + q)
        return code.astype(jnp.int32)

    def decode(self, codes: jax.Array) -> jax.Array:
        """Float32 values of int32 ``codes``.

        For rank ``q >= 1``, ``r = q - 1 + 2**extra = nb + k`` with ``nb = 2**j`` the
        decade's bin count: float32(r)'s exponent is ``j`` and its mantissa is
        ``k / nb``, so the value ``s_j * (0.1 + 0.9 * (k + 0.5) / nb)`` needs no
        table.
        """
        E, extra = self.levels, self.extra
        d = codes - self.zero_code
        q = jnp.abs(d) if self.signed else d
        bits = jax.lax.bitcast_convert_type((q + ((1 << extra) - 1)).astype(jnp.float32), jnp.int32)
        exponent = bits & 0x7F800000
        mantissa = jax.lax.bitcast_convert_type((bits & 0x007FFFFF) | 0x3F800000, jnp.float32)
        half_bin = jax.lax.bitcast_convert_type(0x7E800000 - exponent, jnp.float32)  # 0.5 / nb
        frac = _f32(0.1) + _f32(0.9) * ((mantissa - _f32(1.0)) + half_bin)
        decade = jnp.full(codes.shape, np.float32(10.0 ** (1 - E)))
        for i in range(1, E):
            edge = (i + extra + 127) << 23
            decade = jnp.where(exponent >= edge, np.float32(10.0 ** (i - E + 1)), decade)
        value = frac * decade
        value = jnp.where(q == 0, _f32(0.0), jnp.where(q >= self.top, _f32(1.0), value))
        return jnp.where(d < 0, -value, value) if self.signed else value


@dataclasses.dataclass(frozen=True)
class LinearMap:
    """The map ``(i + 1) / 2**bits``, ``i = 0 .. 2**bits - 1``: linear, without zero
    (Li et al., 2023, for the second moment: a zero code would turn
    ``m / sqrt(v)`` into ``m / eps``)."""

    bits: int
    signed: bool = False
    saturates = False  # see DynamicMap
    signed_scale = False  # unsigned: the scale is the block's maximum

    def encode(self, x: jax.Array) -> jax.Array:
        n = 2**self.bits
        return jnp.clip(jnp.ceil(x * _f32(n) - _f32(1.5)), 0, n - 1).astype(jnp.int32)

    def decode(self, codes: jax.Array) -> jax.Array:
        return (codes + 1).astype(jnp.float32) * _f32(2.0**-self.bits)

    def table(self) -> np.ndarray:
        return (np.arange(2**self.bits, dtype=np.float32) + 1) / np.float32(2**self.bits)


@dataclasses.dataclass(frozen=True)
class FloatMap:
    """A small float format on ``[0, 1]`` (or ``[-1, 1]``), coded from float32's own bits.

    ``mantissa`` bits of mantissa and the rest of the ``bits - signed`` magnitude
    bits of exponent, no subnormals; magnitude code ``c`` (``1 .. top``,
    ``top = 2**(bits - signed) - 1``) is the float32 whose bits are
    ``(c + offset) << (23 - mantissa)``, ``offset = (127 << mantissa) - top``, so
    the top code is exactly 1.0 and code 0 is 0. Signed codes put the sign in the
    top bit (sign-magnitude).

    8 bits, signed, 3 mantissa bits (``mu``): magnitudes ``2**-16 * 1.25 .. 1``,
    relative spacing 1/8 (worst relative rounding error 1/16) at every scale.
    8 bits, unsigned, 3 mantissa bits (``nu``): ``2**-32 * 1.25 .. 1``.

    Encode is round to nearest (ties away from zero) on the magnitude: adding half
    a unit of the kept mantissa to the float32 bits carries into the exponent
    exactly where rounding does. Decode is a shift and an add. Both are a handful
    of integer operations that vectorize, against about 30 selects per value
    for :class:`DynamicMap`: this is what makes ``moments="8bit"`` a memory-bound
    step on CPU (BUILD_NOTES, "8-bit codec").
    """

    signed: bool
    bits: int = 8
    mantissa: int = 3
    #: NaN codes as 0 and +-inf as +-1.0 (the scale) with no extra select.
    saturates = True
    #: -1.0 is a code: the scale is the block's largest magnitude (a signed one could
    #: flip on re-encoding a block that decodes to both +-scale).
    signed_scale = False

    @property
    def magnitude_bits(self) -> int:
        return self.bits - (1 if self.signed else 0)

    @property
    def top(self) -> int:
        """Magnitude code of 1.0 (the largest)."""
        return 2**self.magnitude_bits - 1

    @property
    def offset(self) -> int:
        return (127 << self.mantissa) - self.top

    @property
    def smallest(self) -> float:
        """The smallest nonzero magnitude (code 1)."""
        return float(np.int32((self.offset + 1) << (23 - self.mantissa)).view(np.float32))

    def encode(self, x: jax.Array) -> jax.Array:
        """Nearest code (int32) of normalized ``x`` (in [-1, 1] signed, [0, 1] unsigned)."""
        magnitude = jnp.abs(x) if self.signed else x
        shift = 23 - self.mantissa
        bits = jax.lax.bitcast_convert_type(magnitude, jnp.int32)
        code = jnp.clip(((bits + (1 << (shift - 1))) >> shift) - self.offset, 1, self.top)
        if self.signed:
            code = code | ((x < 0).astype(jnp.int32) << self.magnitude_bits)
        # Below the smallest value: the nearer of 0 and it (0 is always code 0, never
        # a negative zero); NaN is 0 (the compare is false); +-inf is +-1.0 (the clip).
        return jnp.where(magnitude >= np.float32(self.smallest / 2), code, 0)

    def decode(self, codes: jax.Array) -> jax.Array:
        """Float32 values of int32 ``codes``."""
        magnitude = codes & self.top if self.signed else codes
        bits = (magnitude + self.offset) << (23 - self.mantissa)
        if self.signed:
            bits = bits | ((codes >> self.magnitude_bits) << 31)
        value = jax.lax.bitcast_convert_type(bits, jnp.float32)
        return jnp.where(magnitude == 0, _f32(0.0), value)

    def table(self) -> np.ndarray:
        """Every code's value, indexed by code (not sorted when signed)."""
        codes = np.arange(2**self.bits, dtype=np.int64)
        magnitude = codes & self.top
        bits = ((magnitude + self.offset) << (23 - self.mantissa)).astype(np.int32)
        value = bits.view(np.float32)
        value = np.where(magnitude == 0, np.float32(0), value)
        if self.signed:
            value = np.where(codes >> self.magnitude_bits, -value, value)
        return value.astype(np.float32)


# ----------------------------------------------------------------------------- layouts


@dataclasses.dataclass(frozen=True)
class Codec:
    """How one moment leaf is stored. Static (pytree aux data), hashable.

    The leaf is handled as a grid: ``(d0, d1 * d2 * ...)`` (its leading axis by
    the rest), or for a 1-D leaf of ``n`` values ``(ceil(n / block_size),
    block_size)``. ``norm="block"``: one fp32 scale per ``block_size`` values of
    a grid row, stored ``(rows, blocks)`` (``(rows,)`` for 1-D leaves).
    ``norm="rank1"``: the per-axis maxima of the leaf. ``root`` stores
    ``sqrt(x)`` (non-negative moments only). 8-bit codes are shaped like the
    param; 4-bit codes pack grid rows ``2i`` (high nibble) and ``2i + 1`` (low
    nibble) into byte row ``i``: shape ``(ceil(rows / 2), blocks, block_size)``
    (the last block zero-padded) for ``"block"``, ``(ceil(rows / 2), cols)`` for
    ``"rank1"``.
    """

    shape: tuple[int, ...]
    map: Any  # DynamicMap | LinearMap
    norm: str
    block_size: int
    root: bool = False

    @property
    def bits(self) -> int:
        return self.map.bits

    @property
    def packed(self) -> bool:
        return self.bits == 4

    @property
    def grid(self) -> tuple[int, int]:
        if len(self.shape) >= 2:
            return self.shape[0], math.prod(self.shape[1:])
        return -(-math.prod(self.shape) // self.block_size), self.block_size

    @property
    def blocks(self) -> int:
        return -(-self.grid[1] // self.block_size)

    # -- views

    def _to_grid(self, x: jax.Array) -> jax.Array:
        rows, cols = self.grid
        if len(self.shape) >= 2:
            return x.reshape(rows, cols)
        n = math.prod(self.shape)
        x = x.reshape(n)
        if rows * cols != n:
            x = jnp.pad(x, (0, rows * cols - n))
        return x.reshape(rows, cols)

    def _from_grid(self, x: jax.Array) -> jax.Array:
        if len(self.shape) >= 2:
            return x.reshape(self.shape)
        return x.reshape(-1)[: math.prod(self.shape)].reshape(self.shape)

    def _blocked(self, x: jax.Array) -> jax.Array:
        """A grid ``(rows, cols)`` as ``(rows, blocks, block_size)``, zero-padded."""
        rows, cols = x.shape
        padded = self.blocks * self.block_size
        if padded != cols:
            x = jnp.pad(x, ((0, 0), (0, padded - cols)))
        return x.reshape(rows, self.blocks, self.block_size)

    def _unblocked(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        return x[:, : self.grid[1]] if x.shape[1] != self.grid[1] else x

    def _row_pairs(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Rows ``2i`` and ``2i + 1`` of ``x`` (zero-padded to an even row count)."""
        if x.shape[0] % 2:
            x = jnp.pad(x, [(0, 1)] + [(0, 0)] * (x.ndim - 1))
        x = x.reshape(x.shape[0] // 2, 2, *x.shape[1:])
        return x[:, 0], x[:, 1]

    # -- codes

    def _quantize(self, x: jax.Array, inv: jax.Array) -> jax.Array:
        """uint8 storage of the codes of ``x * inv`` (``inv`` broadcasts).

        ``x`` is the blocked grid ``(rows, blocks, block_size)`` for ``norm="block"``,
        the grid ``(rows, cols)`` for ``"rank1"``. 8-bit: codes shaped like the
        param. 4-bit: rows ``2i`` and ``2i + 1`` share byte row ``i`` (high, low
        nibble), kept in ``x``'s own (blocked) shape: pairing neighbouring values
        would be a stride-2 access, and flattening the blocks made the loop index
        the block scale per element; XLA:CPU vectorizes neither (10x slower). The
        pairs are cut from ``x`` and ``inv`` before they are multiplied (cutting
        the product made XLA:CPU emit a 6-10x slower loop).
        """
        blocked = self.norm == "block"
        if not self.packed:
            codes = self.map.encode(x * inv)
            return self._from_grid(self._unblocked(codes) if blocked else codes).astype(jnp.uint8)
        rows = x.shape[0]
        if rows % 2 == 0:
            return self._pack_pairs(x, inv)
        # An odd last row pairs with a zero row: packed on its own and appended (a
        # zero-padded x would be written out in full, 4 bytes per param).
        inv = jnp.broadcast_to(inv, (rows, *inv.shape[1:]))
        last = (self.map.encode(x[-1:] * inv[-1:]) << 4) | self.map.encode(
            jnp.zeros(x[-1:].shape, jnp.float32)
        )
        last = last.astype(jnp.uint8)
        if rows == 1:
            return last
        return jnp.concatenate([self._pack_pairs(x[:-1], inv[:-1]), last])

    def _pack_pairs(self, x: jax.Array, inv: jax.Array) -> jax.Array:
        """uint8 bytes of the codes of an even number of rows: row ``2i`` high nibble."""
        (hi, lo), (inv_hi, inv_lo) = self._row_pairs(x), self._row_pairs(inv)
        byte = (self.map.encode(hi * inv_hi) << 4) | self.map.encode(lo * inv_lo)
        return byte.astype(jnp.uint8)

    def _codes(self, stored: jax.Array) -> jax.Array:
        """uint8 storage -> int32 codes, in the shape :meth:`_quantize` took ``x`` in."""
        blocked = self.norm == "block"
        if not self.packed:
            # Padded (to whole blocks) before the int32 conversion: if XLA writes the
            # padded codes out, they are bytes, not 4-byte ints.
            codes = self._to_grid(stored)
            return (self._blocked(codes) if blocked else codes).astype(jnp.int32)
        shape = (stored.shape[0], 2, *stored.shape[1:])
        byte = jnp.broadcast_to(stored.astype(jnp.int32)[:, None], shape)
        # Row 2i is the high nibble: shift by 4 - 4 * (index along the pair axis). An
        # iota keeps the shift an affine expression that XLA:CPU vectorizes (a
        # constant [4, 0] array read per element does not).
        shift = 4 - 4 * jax.lax.broadcasted_iota(jnp.int32, shape, 1)
        codes = ((byte >> shift) & 15).reshape(-1, *stored.shape[1:])
        rows = self.grid[0]
        return codes[:rows] if codes.shape[0] != rows else codes

    def _rank1_scale(self, extremes) -> jax.Array:
        """Per element, the per-axis extreme of smallest magnitude (with its sign).

        Li et al.'s ``min(row max, column max)`` for non-negative ``x``. For
        signed ``x`` the extremes carry their signs, so the value that sets an
        extreme normalizes to +1.0 exactly (the signed map has no -1.0) and
        re-encoding decoded values reproduces codes and extremes bitwise.
        """
        nd = len(self.shape)
        scale = None
        for axis, m in enumerate(extremes):
            b = m.reshape([-1 if a == axis else 1 for a in range(nd)])
            if scale is None:
                scale = b
            elif self.map.signed:
                scale = jnp.where(jnp.abs(b) < jnp.abs(scale), b, scale)
            else:
                scale = jnp.minimum(scale, b)
        return jnp.broadcast_to(scale, self.shape)

    def _unsign(self, extreme: jax.Array) -> jax.Array:
        """A scale from a signed extreme: the extreme itself on a map whose scale carries
        the sign (``map.signed_scale``), else its magnitude. (The signed extreme is what
        XLA:CPU computes fast: a variadic max/min reduction; a lone max is a slow
        library call.)"""
        return extreme if self.map.signed_scale else jnp.abs(extreme)

    def _saturate(self, x: jax.Array, extreme: jax.Array) -> jax.Array:
        """:func:`_saturate_non_finite`, unless the map codes non-finite values itself
        (``map.saturates``: the selects cost a fifth of the 8-bit step)."""
        return x if self.map.saturates else _saturate_non_finite(x, extreme)

    # -- encode / decode of a params-shaped float32 moment

    def encode(self, x: jax.Array) -> "QuantizedArray":
        """A params-shaped float moment -> :class:`QuantizedArray`."""
        x = x.astype(jnp.float32)
        # With root=True the maxima are taken of x and rooted (sqrt is monotone, so
        # they equal the maxima of sqrt(x) bitwise): only the encode loop takes
        # square roots, and XLA does not write sqrt(x) out to share it.
        root = jnp.sqrt if self.root else (lambda y: y)
        unroot = (lambda y: y * y) if self.root else (lambda y: y)
        if self.norm == "rank1":
            nd = len(self.shape)
            maxima = tuple(
                root(self._unsign(_axis_extreme(_finite_or_zero(x), axis))) for axis in range(nd)
            )
            scale = self._rank1_scale(maxima)
            inv = jnp.where(scale == 0, _f32(0.0), _f32(1.0) / jnp.where(scale == 0, 1, scale))
            x = self._saturate(x, unroot(jnp.abs(scale)))
            stored = self._quantize(self._to_grid(root(x)), self._to_grid(inv))
            return QuantizedArray(stored, maxima, self)
        if self._partial_blocks:
            return self._encode_partial_blocks(x, root)
        xb = self._blocked(self._to_grid(x))
        # Signed or not: see the map's ``signed_scale``.
        extreme = self._unsign(_signed_absmax(_finite_or_zero(xb), (2,)))
        scale = root(extreme)
        inv = jnp.where(scale == 0, _f32(0.0), _f32(1.0) / jnp.where(scale == 0, 1, scale))
        xb = self._saturate(xb, jnp.abs(extreme)[..., None])
        stored = self._quantize(root(xb), inv[..., None])
        return QuantizedArray(stored, (scale[:, 0] if len(self.shape) < 2 else scale,), self)

    def decode(self, q: "QuantizedArray") -> jax.Array:
        """:class:`QuantizedArray` -> the params-shaped float32 moment."""
        if self.norm == "rank1":
            codes = self._codes(q.codes)
            x = self._from_grid(self.map.decode(codes)) * self._rank1_scale(q.scales)
        elif self._partial_blocks:
            x = self._decode_partial_blocks(q)
        else:
            codes = self._codes(q.codes)
            scale = q.scales[0].reshape(self.grid[0], self.blocks)
            x = self._from_grid(self._unblocked(self.map.decode(codes) * scale[..., None]))
        return x * x if self.root else x

    # -- rows that end in a partial block (8-bit, 2-D, row length not a multiple of
    # the block size). Encode: the whole blocks and the last, shorter one are two
    # views of the grid, their byte codes concatenated. Decode: each value times its
    # block's scale, the scales broadcast to whole blocks and cut to the row length.
    # Zero-padding the rows to whole blocks instead wrote the float32 moments out
    # (8-bit, 1000 x 520: 23.7 bytes per param of temporaries in the jitted step, now
    # 2.15); decoding two parts and concatenating them wrote the decoded float32
    # moments out (11.9), and padding the byte codes wrote those out (3.15, and 1.8x
    # slower on a 2048 x 3896 leaf). The results equal the padded layout's bitwise
    # (zeros never set a block's extreme, and padded codes were cut off).

    @property
    def _partial_blocks(self) -> bool:
        return (
            self.norm == "block"
            and not self.packed
            and len(self.shape) >= 2
            and self.grid[1] % self.block_size != 0
        )

    def _grid_parts(self, grid: jax.Array) -> list[jax.Array]:
        """``(rows, cols)`` -> ``[(rows, whole blocks, block_size), (rows, 1, rest)]``."""
        rows, cols = grid.shape
        full = cols - cols % self.block_size
        tail = grid[:, full:][:, None, :]
        if not full:
            return [tail]
        return [grid[:, :full].reshape(rows, full // self.block_size, self.block_size), tail]

    def _encode_partial_blocks(self, x: jax.Array, root) -> "QuantizedArray":
        """:meth:`encode` for ``norm="block"`` when rows end in a partial block."""
        codes, scales = [], []
        for xb in self._grid_parts(self._to_grid(x)):
            extreme = self._unsign(_signed_absmax(_finite_or_zero(xb), (2,)))
            scale = root(extreme)
            inv = jnp.where(scale == 0, _f32(0.0), _f32(1.0) / jnp.where(scale == 0, 1, scale))
            xb = self._saturate(xb, jnp.abs(extreme)[..., None])
            part = self.map.encode(root(xb) * inv[..., None]).astype(jnp.uint8)
            codes.append(part.reshape(part.shape[0], -1))
            scales.append(scale)
        stored = self._from_grid(jnp.concatenate(codes, axis=1) if len(codes) > 1 else codes[0])
        scale = jnp.concatenate(scales, axis=1) if len(scales) > 1 else scales[0]
        return QuantizedArray(stored, (scale,), self)

    def _decode_partial_blocks(self, q: "QuantizedArray") -> jax.Array:
        """:meth:`decode` (before ``root``) for ``norm="block"`` when rows end in a
        partial block."""
        rows, cols = self.grid
        scale = q.scales[0].reshape(rows, self.blocks, 1)
        padded = self.blocks * self.block_size
        scale = jnp.broadcast_to(scale, (rows, self.blocks, self.block_size))
        scale = scale.reshape(rows, padded)[:, :cols]
        codes = self._to_grid(q.codes).astype(jnp.int32)
        return self._from_grid(self.map.decode(codes) * scale)


@jax.tree_util.register_pytree_with_keys_class
class QuantizedArray:
    """One quantized moment leaf: ``codes`` (uint8) and fp32 ``scales``; the codec in aux data.

    ``shape`` is the moment's logical (params) shape; ``dtype`` is float32,
    the dtype :func:`decode` gives.
    """

    def __init__(self, codes: jax.Array, scales: tuple, codec: Codec):
        self.codes = codes
        self.scales = tuple(scales)
        self.codec = codec

    @property
    def shape(self) -> tuple[int, ...]:
        return self.codec.shape

    @property
    def dtype(self):
        return jnp.dtype(jnp.float32)

    def tree_flatten_with_keys(self):
        keys = [jax.tree_util.GetAttrKey("codes")]
        keys += [jax.tree_util.GetAttrKey(f"scales[{i}]") for i in range(len(self.scales))]
        return list(zip(keys, (self.codes, *self.scales), strict=True)), self.codec

    def tree_flatten(self):
        return (self.codes, *self.scales), self.codec

    @classmethod
    def tree_unflatten(cls, codec, children):
        return cls(children[0], tuple(children[1:]), codec)

    def __repr__(self) -> str:
        c = self.codec
        return (
            f"QuantizedArray(shape={c.shape}, bits={c.bits}, norm={c.norm!r}, "
            f"codes={getattr(self.codes, 'shape', None)})"
        )


def is_quantized(x: Any) -> bool:
    return isinstance(x, QuantizedArray)


# jitted (the codec is static: pytree aux data / a static argument): applied to
# concrete arrays (an eager step, init, state_to_tree) each is one compiled program
# per leaf shape instead of a hundred op-by-op dispatches; under an outer jit they
# are inlined.
_decode = jax.jit(lambda q: q.codec.decode(q))
_encode = jax.jit(lambda x, codec: codec.encode(x), static_argnums=1)


def encode(x: jax.Array, codec: Codec) -> QuantizedArray:
    """``codec.encode(x)``, jitted."""
    return _encode(x, codec)


def decode(x: Any) -> Any:
    """A quantized leaf's float32 values; anything else unchanged."""
    return _decode(x) if isinstance(x, QuantizedArray) else x


def encode_like(x: jax.Array, like: Any) -> Any:
    """``x`` in ``like``'s storage: re-encoded with its codec, or cast to its dtype."""
    if isinstance(like, QuantizedArray):
        return _encode(x, like.codec)
    return x.astype(like.dtype)


def decode_tree(tree: Any) -> Any:
    """Every :class:`QuantizedArray` in ``tree`` replaced by its float32 values."""
    return jax.tree.map(decode, tree, is_leaf=is_quantized)


def _wraps_one_quantized(x: Any) -> bool:
    """``x`` is a one-child wrapper node (e.g. an ``nnx.Param``) around a quantized leaf."""
    if is_quantized(x) or isinstance(x, (dict, list, tuple)) or x is None:
        return False
    children = jax.tree_util.tree_flatten_with_path(x, is_leaf=is_quantized)[0]
    return len(children) == 1 and len(children[0][0]) == 1 and is_quantized(children[0][1])


def unwrap_quantized(tree: Any) -> Any:
    """``tree`` with one-child wrappers around quantized leaves removed.

    ``tx.init`` on ``nnx.Param``-wrapped params would otherwise give
    ``Param(QuantizedArray)``: ``nnx.Optimizer`` keeps each ``Param`` as one variable,
    whose value must be an array, and flattens a pytree value away on its first
    ``update``. Bare, the quantized leaf's codes and scales become two variables.
    The gradients' ``.value`` paths still match (see ``_validate.match_leaves``).
    """
    return jax.tree.map(
        lambda x: jax.tree.leaves(x, is_leaf=is_quantized)[0] if _wraps_one_quantized(x) else x,
        tree,
        is_leaf=lambda x: is_quantized(x) or _wraps_one_quantized(x),
    )


def logical_view(tree: Any) -> Any:
    """``tree`` with each quantized leaf replaced by a ``ShapeDtypeStruct`` of its logical
    shape (for structure and shape checks against the gradients)."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if is_quantized(x) else x,
        tree,
        is_leaf=is_quantized,
    )


# ----------------------------------------------------------------------------- formats


#: Mantissa bits of the float maps (``mu_map``/``nu_map="float"``), by moment and bits.
#: 8-bit ``mu``: 3 (4 exponent bits: 2**-16 .. 1); 8-bit ``nu``: 3 (5 exponent bits:
#: 2**-32 .. 1, the range and precision of ``sqrt(nu)`` on 4 + 4 bits, without a
#: ``sqrt``); 4-bit ``mu``: 1 (0.125 .. 1). Chosen on the streams of BUILD_NOTES
#: "8-bit codec": more mantissa for ``mu`` lost the small values of mixed-scale blocks
#: (error 0.058 -> 0.18).
_FLOAT_MANTISSA = {("mu", 8): 3, ("nu", 8): 3, ("mu", 4): 1}


@dataclasses.dataclass(frozen=True)
class QuantizedMoments:
    """Quantized storage for ``mu`` and ``nu`` (``moments=`` of every constructor).

    ``moments="8bit"`` is ``QuantizedMoments(bits=8)`` and ``moments="4bit"`` is
    ``QuantizedMoments(bits=4)``; the fields left ``None`` take those presets.

    Args:
      bits: 8 or 4. Codes are uint8 (4-bit: two per byte).
      block_size: values per fp32 scale of a block-normalized moment, a power of two: 256
        (8-bit), 128 (4-bit). Blocks run along each row of the leaf viewed as
        (leading axis, everything else); 1-D leaves are cut into blocks.
      min_size: leaves with fewer elements keep float32 moments (4096, as in
        bitsandbytes and torchao).
      mu_map: ``"float"`` (default: :class:`FloatMap`, sign + 4 exponent + 3 mantissa
        bits for 8-bit, sign + 2 + 1 for 4-bit) or ``"dynamic"`` (bitsandbytes'
        signed dynamic map, :class:`DynamicMap`).
      mu_norm: ``"block"`` (8-bit default) or ``"rank1"`` (4-bit default: signed
        per-axis extremes); 1-D leaves use blocks of ``block_size``.
      nu_map: ``"float"`` (8-bit default: 5 exponent + 3 mantissa bits),
        ``"dynamic"`` (bitsandbytes' unsigned dynamic map) or ``"linear"``
        (``(i + 1) / 2**bits``, no zero; 4-bit default).
      nu_norm: ``"block"`` (8-bit default) or ``"rank1"`` (4-bit default;
        1-D leaves use blocks of ``block_size``).
      nu_root: store ``sqrt(nu)``, halving the dynamic range the map must cover
        (default: True on the 8-bit dynamic map; the 8-bit float map spans
        ``2**-32`` of a block's largest ``nu`` as it is, and the square root would
        cost a ``sqrt`` per value in the step's loops).
      clip: clip each element's update to fp32 Adam's largest possible step
        (:func:`step_bound`; default True).

    Example:
      >>> import jax.numpy as jnp, adam_jax
      >>> tx = adam_jax.adamw(1e-3, moments=adam_jax.QuantizedMoments(bits=8, block_size=128))
      >>> state = tx.init({"w": jnp.zeros((64, 128))})
      >>> state[0].mu["w"].codes.dtype
      dtype('uint8')
    """

    bits: int = 8
    block_size: int | None = None
    min_size: int = 4096
    mu_map: str | None = None
    mu_norm: str | None = None
    nu_map: str | None = None
    nu_norm: str | None = None
    nu_root: bool | None = None
    clip: bool = True

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ValueError(f"QuantizedMoments: bits must be 4 or 8, got {self.bits!r}.")
        eight = self.bits == 8
        defaults = dict(
            block_size=256 if eight else 128,
            mu_map="float",
            mu_norm="block" if eight else "rank1",
            nu_map="float" if eight else "linear",
            nu_norm="block" if eight else "rank1",
        )
        for name, value in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if self.nu_root is None:  # sqrt(nu) on the 8-bit dynamic map (its range is 1e-7)
            object.__setattr__(self, "nu_root", eight and self.nu_map == "dynamic")
        bs = self.block_size
        if isinstance(bs, bool) or not isinstance(bs, int) or bs < 2 or bs & (bs - 1):
            raise ValueError(
                f"QuantizedMoments: block_size must be a power of two >= 2, got {bs!r}."
            )
        ms = self.min_size
        if isinstance(ms, bool) or not isinstance(ms, int) or ms < 1:
            raise ValueError(f"QuantizedMoments: min_size must be an int >= 1, got {ms!r}.")
        if self.mu_map not in ("dynamic", "float"):
            raise ValueError(
                f"QuantizedMoments: mu_map must be 'dynamic' or 'float', got {self.mu_map!r}."
            )
        if self.nu_map not in ("dynamic", "linear", "float"):
            raise ValueError(
                "QuantizedMoments: nu_map must be 'dynamic', 'linear' or 'float', "
                f"got {self.nu_map!r}."
            )
        if self.nu_map == "float" and self.bits != 8:
            raise ValueError(f"QuantizedMoments: nu_map='float' needs bits=8, got {self.bits}.")
        for name in ("mu_norm", "nu_norm"):
            if getattr(self, name) not in ("block", "rank1"):
                raise ValueError(
                    f"QuantizedMoments: {name} must be 'block' or 'rank1', "
                    f"got {getattr(self, name)!r}."
                )
        for name in ("nu_root", "clip"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(
                    f"QuantizedMoments: {name} must be a bool, got {getattr(self, name)!r}."
                )

    def eligible(self, param) -> bool:
        """Whether ``param``'s moments are quantized: real floating of at most 32 bits,
        at least one axis and ``min_size`` elements, judged on its global shape."""
        dtype = jnp.dtype(param.dtype)
        shape = tuple(param.shape)
        return (
            jnp.issubdtype(dtype, jnp.floating)
            and dtype.itemsize <= 4
            and len(shape) >= 1
            and math.prod(shape) >= self.min_size
        )

    def mu_codec(self, shape) -> Codec:
        shape = tuple(shape)
        norm = self.mu_norm if len(shape) >= 2 else "block"
        if self.mu_map == "float":
            vmap = FloatMap(True, self.bits, _FLOAT_MANTISSA["mu", self.bits])
        else:
            vmap = DynamicMap(True, self.bits)
        return Codec(shape, vmap, norm, self.block_size)

    def nu_codec(self, shape) -> Codec:
        shape = tuple(shape)
        if self.nu_map == "float":
            vmap = FloatMap(False, self.bits, _FLOAT_MANTISSA["nu", self.bits])
        elif self.nu_map == "dynamic":
            vmap = DynamicMap(False, self.bits)
        else:
            vmap = LinearMap(self.bits)
        norm = self.nu_norm if len(shape) >= 2 else "block"
        return Codec(shape, vmap, norm, self.block_size, root=self.nu_root)


#: What ``moments=`` accepts.
MomentsArg = str | QuantizedMoments | None

PRESETS = {"8bit": QuantizedMoments(bits=8), "4bit": QuantizedMoments(bits=4)}


def resolve_moments(moments) -> QuantizedMoments | None:
    """``moments=`` as a :class:`QuantizedMoments`, or ``None`` for full-precision moments."""
    if moments is None or (isinstance(moments, str) and moments == "fp32"):
        return None
    if isinstance(moments, QuantizedMoments):
        return moments
    if isinstance(moments, str) and moments in PRESETS:
        return PRESETS[moments]
    raise ValueError(
        f"moments must be None, 'fp32', '8bit', '4bit' or a QuantizedMoments, got {moments!r}."
    )


# ----------------------------------------------------------------------------- guard


def step_bound(coef: AdamCoefficients, one_minus_b1, one_minus_b2, count) -> jax.Array:
    """The largest ``|u|`` fp32 Adam can produce at step ``count`` (float32 scalar).

    With ``m_t = (1-b1) sum_s b1**(t-s) g_s`` and ``v_t = (1-b2) sum_s b2**(t-s) g_s**2``,
    Cauchy-Schwarz gives ``|m_t| <= K_t sqrt(v_t)`` with
    ``K_t = (1-b1) sqrt(sum_{j<t} (b1**2/b2)**j / (1-b2))``, and
    ``v_t >= (1-b2) g_t**2`` bounds the Nesterov term; so every element of
    ``u = (c_m m + c_g g) / (sqrt(c_v v~ + eps_root) + eps)`` satisfies
    ``|u| <= (c_m K_t + |c_g| / sqrt(1-b2)) / sqrt(c_v)`` (AMSGrad's ``v~ >= v``
    and ``eps``, ``eps_root >= 0`` only shrink it). Infinite when ``b2 = 0``.
    """
    f32 = jnp.float32
    c1 = jnp.asarray(one_minus_b1).astype(f32)
    c2 = jnp.asarray(one_minus_b2).astype(f32)
    b1, b2 = 1 - c1, 1 - c2
    t = jnp.asarray(count).astype(f32)
    rho = jnp.where(b1 == 0, f32(0), b1 * b1 / b2)
    one_minus_rho = (c1 * (2 - c1) - c2) / b2  # 1 - b1**2/b2 without cancellation
    log_rho = jnp.log(rho)
    series = jnp.where(jnp.abs(one_minus_rho) < 1e-6, t, -jnp.expm1(t * log_rho) / one_minus_rho)
    series = jnp.where(rho == 0, f32(1), series)
    k_t = c1 * jnp.sqrt(series / c2)
    bound = coef.c_m.astype(f32) * k_t
    if coef.c_g is not None:
        bound = bound + jnp.abs(coef.c_g.astype(f32)) / jnp.sqrt(c2)
    return bound / jnp.sqrt(coef.c_v.astype(f32))


def clip_update(u: jax.Array, bound: jax.Array) -> jax.Array:
    """``u`` clipped elementwise to ``[-bound, bound]`` (NaN stays NaN)."""
    b = bound.astype(u.dtype)
    return jnp.clip(u, -b, b)


# ----------------------------------------------------------------------------- state


def init_moment(param, codec: Codec) -> QuantizedArray:
    """Zero moment for ``param`` in ``codec``: the encoding of zeros that follow the param's
    sharding (so sharding propagation places codes and scales with the param)."""
    return _encode(zeros_like_param(param, jnp.float32), codec)


def state_bytes(tree: Any) -> int:
    """Bytes of every array in ``tree`` (concrete or ``ShapeDtypeStruct``)."""
    return sum(
        math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
        for x in jax.tree.leaves(tree)
        if hasattr(x, "shape")
    )
