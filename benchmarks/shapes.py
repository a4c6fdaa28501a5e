"""The parameter trees the benchmark runs on.

A shape is a pytree of ``jax.ShapeDtypeStruct`` (float32); :func:`materialize`
turns it into NumPy arrays, deterministically (fixed seed per tree), so every
method and every run sees the same values.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from benchmarks import mnist_model

F32 = np.dtype(np.float32)


def _s(*shape: int) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), F32)


def single_leaf(n: int) -> dict[str, jax.ShapeDtypeStruct]:
    """One float32 leaf of ``n`` params."""
    return {"w": _s(n)}


def many_leaves(count: int, size: int) -> list[jax.ShapeDtypeStruct]:
    """``count`` float32 leaves of ``size`` params each."""
    return [_s(size) for _ in range(count)]


def _layer_norm(d: int) -> dict[str, jax.ShapeDtypeStruct]:
    return {"scale": _s(d), "bias": _s(d)}


def _dense(d_in: int, d_out: int) -> dict[str, jax.ShapeDtypeStruct]:
    return {"kernel": _s(d_in, d_out), "bias": _s(d_out)}


def gpt2_like(
    d: int = 768, ff: int = 3072, vocab: int = 50257, ctx: int = 1024, n_layer: int = 12
) -> dict[str, Any]:
    """A GPT-2-style parameter tree: ``2 + 12 * n_layer + 2`` leaves.

    Token and position embeddings, then per block: ln1 (scale, bias), attention
    qkv (d x 3d, bias), attention proj (d x d, bias), ln2, MLP fc (d x ff,
    bias), MLP proj (ff x d, bias); then the final layer norm. The LM head is
    tied to ``wte`` (no extra leaf), as in GPT-2. The defaults are GPT-2 small:
    148 leaves, 124,439,808 params.
    """
    block = lambda: {
        "ln1": _layer_norm(d),
        "attn": {"qkv": _dense(d, 3 * d), "proj": _dense(d, d)},
        "ln2": _layer_norm(d),
        "mlp": {"fc": _dense(d, ff), "proj": _dense(ff, d)},
    }
    return {
        "wte": _s(vocab, d),
        "wpe": _s(ctx, d),
        "blocks": [block() for _ in range(n_layer)],
        "ln_f": _layer_norm(d),
    }


def llama_like(
    d: int = 2048,
    ff: int = 8192,
    vocab: int = 32000,
    n_layer: int = 16,
    n_heads: int = 32,
    n_kv_heads: int = 32,
) -> dict[str, Any]:
    """A LLaMA-style tree: embed, ``9 * n_layer`` block leaves, final norm, untied head.

    Per block: attention norm, wq, wk, wv, wo, MLP norm, w_gate, w_up, w_down
    (no biases). The defaults (d=2048, ff=8192, 16 layers, full multi-head
    attention, vocab 32000, untied head) give 147 leaves, 1,204,881,408 params.
    """
    kv = d // n_heads * n_kv_heads
    block = lambda: {
        "attn_norm": _s(d),
        "wq": _s(d, d),
        "wk": _s(d, kv),
        "wv": _s(d, kv),
        "wo": _s(d, d),
        "mlp_norm": _s(d),
        "w_gate": _s(d, ff),
        "w_up": _s(d, ff),
        "w_down": _s(ff, d),
    }
    return {
        "embed": _s(vocab, d),
        "layers": [block() for _ in range(n_layer)],
        "norm": _s(d),
        "lm_head": _s(d, vocab),
    }


def count_leaves(tree: Any) -> int:
    return len(jax.tree.leaves(tree))


def count_params(tree: Any) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


@dataclasses.dataclass(frozen=True)
class Shape:
    """A named benchmark shape; ``build()`` returns its tree of ShapeDtypeStructs."""

    name: str
    label: str
    build: Callable[[], Any]
    kind: str  # "leaf": one leaf (plotted as a line); "tree": many leaves (markers)
    gpu_only: bool = False
    quick: bool = False


def _leaf_shape(n: int, label: str, *, gpu_only: bool = False, quick: bool = False) -> Shape:
    return Shape(
        f"leaf_{label}", f"1 leaf, {label}", lambda: single_leaf(n), "leaf", gpu_only, quick
    )


# Reduced GPT-2 for the "148 leaves, 25.8M" row: d=512, ff=1024, 12 blocks; a
# character-level vocabulary of 65 (nanoGPT's Shakespeare-char) and a 1024
# context give 25,792,000 params.
GPT2_D512 = dict(d=512, ff=1024, vocab=65, ctx=1024, n_layer=12)

SHAPES: tuple[Shape, ...] = (
    _leaf_shape(10_000, "1e4", quick=True),
    _leaf_shape(100_000, "1e5", quick=True),
    _leaf_shape(1_000_000, "1e6", quick=True),
    _leaf_shape(10_000_000, "1e7"),
    _leaf_shape(50_000_000, "5e7"),
    _leaf_shape(100_000_000, "1e8", gpu_only=True),
    _leaf_shape(500_000_000, "5e8", gpu_only=True),
    Shape("tiny_1000x1000", "1000 leaves × 1000", lambda: many_leaves(1000, 1000), "tree"),
    Shape("mnist_cnn", "MNIST CNN", lambda: mnist_model.param_shapes(), "tree", quick=True),
    Shape("gpt2_d512", "GPT-2-like d=512 ff=1024", lambda: gpt2_like(**GPT2_D512), "tree"),
    Shape("gpt2_small", "GPT-2 small-like", gpt2_like, "tree"),
    Shape("llama_1b", "LLaMA-1B-like", llama_like, "tree", gpu_only=True),
)
SHAPES_BY_NAME = {s.name: s for s in SHAPES}


def materialize(tree: Any, *, seed: int, scale: float) -> Any:
    """Deterministic float32 NumPy arrays, uniform in ``[-scale/2, scale/2)``, one per leaf."""
    leaves, treedef = jax.tree.flatten(tree)
    rng = np.random.default_rng(seed)
    arrays = []
    for leaf in leaves:
        a = rng.random(leaf.shape, dtype=np.float32)
        a -= np.float32(0.5)
        a *= np.float32(scale)
        arrays.append(a)
    return jax.tree.unflatten(treedef, arrays)
