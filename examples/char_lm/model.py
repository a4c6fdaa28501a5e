"""A small decoder-only transformer over bytes, in Flax NNX.

Pre-norm blocks (LayerNorm -> causal self-attention -> residual, LayerNorm -> MLP ->
residual), learned position embeddings, a final LayerNorm and the output projection
tied to the token embedding (``nnx.Embed.attend``). Params may be stored in bfloat16
(``param_dtype``); the arithmetic is done in ``dtype`` (float32 by default), so
``--param-dtype bfloat16`` changes how the params are stored and updated, not how the
forward pass is computed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

VOCAB = 256  # bytes are the tokens


def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Causal softmax attention on (B, T, H, Dh) queries, keys and values, in float32."""
    t, dh = q.shape[1], q.shape[3]
    scores = jnp.einsum("bthd,bshd->bhts", q, k) / jnp.sqrt(jnp.float32(dh)).astype(q.dtype)
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, axis=-1), v)


class Block(nnx.Module):
    """One pre-norm transformer block: causal multi-head attention and a GELU MLP."""

    def __init__(self, d_model: int, n_heads: int, d_mlp: int, *, dtype, param_dtype, rngs):
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not a multiple of n_heads {n_heads}")
        self.n_heads = n_heads
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        init = nnx.initializers.normal(0.02)
        # Residual projections start smaller (GPT-2): their sum over blocks stays ~unit.
        self.ln1 = nnx.LayerNorm(d_model, epsilon=1e-5, **kw)
        self.qkv = nnx.Linear(d_model, 3 * d_model, kernel_init=init, **kw)
        self.proj = nnx.Linear(d_model, d_model, kernel_init=init, **kw)
        self.ln2 = nnx.LayerNorm(d_model, epsilon=1e-5, **kw)
        self.up = nnx.Linear(d_model, d_mlp, kernel_init=init, **kw)
        self.down = nnx.Linear(d_mlp, d_model, kernel_init=init, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        h = self.n_heads
        q, k, v = jnp.split(self.qkv(self.ln1(x)).reshape(b, t, 3 * h, d // h), 3, axis=2)
        att = attention(q, k, v)
        x = x + self.proj(att.reshape(b, t, d))
        return x + self.down(nnx.gelu(self.up(self.ln2(x))))


class CharTransformer(nnx.Module):
    """Bytes (B, T) -> next-byte logits (B, T, 256)."""

    def __init__(
        self,
        *,
        d_model: int,
        n_layers: int,
        n_heads: int,
        d_mlp: int,
        context: int,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.context = context
        self.dtype = dtype
        self.embed = nnx.Embed(VOCAB, d_model, embedding_init=nnx.initializers.normal(0.02), **kw)
        pos = 0.01 * jax.random.normal(rngs.params(), (context, d_model), jnp.float32)
        self.pos = nnx.Param(pos.astype(param_dtype))
        self.blocks = nnx.List([Block(d_model, n_heads, d_mlp, **kw) for _ in range(n_layers)])
        self.ln_f = nnx.LayerNorm(d_model, epsilon=1e-5, **kw)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        t = tokens.shape[1]
        if t > self.context:
            raise ValueError(f"sequence of {t} bytes is longer than the context {self.context}")
        x = self.embed(tokens) + self.pos[...][:t].astype(self.dtype)
        for block in self.blocks:
            x = block(x)
        return self.embed.attend(self.ln_f(x))


def count_params(model: nnx.Module) -> int:
    """Number of trainable scalars in ``model``."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
