"""A long sequence's per-token work (the MLP block) in blocks of tokens, so its intermediates --
Llama-3-8B's [tokens, 14336] gate and up projections, 1.75 GiB each at 64k tokens in bfloat16 --
exist for one block at a time.

The length axis may be split over `shards` devices (lomo_jax.sequence_sharding); block j is then
the j-th block of every shard's own tokens, so taking it moves nothing between devices. Blocks
are `lomo_jax.blocks`' equal blocks: the last one overlaps the one before when the size does not
divide the length, and only a block's own tokens are written back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from lomo_jax import blocks

# Bytes of one block of tokens' float32 per-token intermediates: Llama-3-8B's MLP runs 4681
# tokens at a time (its [tokens, 14336] float32 gate is 256 MiB), so short sequences, up to the
# lengths models are mostly trained at, are one block.
TOKEN_BLOCK_BYTES = 256 * 2**20


@dataclasses.dataclass(frozen=True)
class TokenBlocks:
    """`n` blocks of `size` tokens of each of `shards` equal parts of a `length`-token axis 1."""

    n: int
    size: int
    shards: int
    length: int  # tokens of one shard

    @classmethod
    def of(cls, length: int, cap: int, shards: int = 1) -> TokenBlocks:
        """Blocks of at most `cap` tokens of each shard of a `length`-token sequence."""
        n, size = blocks.even_blocks(length // shards, cap)
        return cls(n, size, shards, length // shards)

    def _shards(self, x: jax.Array) -> jax.Array:  # [B, T, ...] -> [B, shards, T / shards, ...]
        return x.reshape(x.shape[0], self.shards, self.length, *x.shape[2:])

    def take(self, x: jax.Array, j: jax.Array) -> jax.Array:
        """Block j of [B, T, ...] `x`: [B, shards * size, ...]."""
        block = blocks.take(self._shards(x), j, self.size, 2)
        return block.reshape(x.shape[0], self.shards * self.size, *x.shape[2:])

    def own(self, j: jax.Array, ndim: int) -> jax.Array:
        """[1, shards * size, 1, ...] (`ndim` axes) bool: block j's tokens no earlier block had."""
        own = jnp.tile(blocks.own(j, self.size, self.length), self.shards)
        return own.reshape(1, -1, *(1,) * (ndim - 2))

    def put(self, x: jax.Array, block: jax.Array, j: jax.Array) -> jax.Array:
        """`x` with block j's own tokens from `block` (as `take` gives it)."""
        new = jnp.where(self.own(j, x.ndim), block, self.take(x, j))
        new = new.reshape(x.shape[0], self.shards, self.size, *x.shape[2:])
        return blocks.put(self._shards(x), new, j, 2).reshape(x.shape)


def map_tokens(
    f: Callable[[jax.Array, jax.Array], jax.Array], x: jax.Array, tb: TokenBlocks
) -> jax.Array:
    """`f(x)` for a per-token `f(block, j)` ([B, t, ...] -> [B, t, ...]; j: the block's index),
    one block of tokens at a time (a `lax.scan`; `f(x, 0)` when there is one block)."""
    if tb.n == 1:
        return f(x, jnp.int32(0))
    out = jax.eval_shape(f, jax.ShapeDtypeStruct(tb.take(x, 0).shape, x.dtype), jnp.int32(0))
    init = jnp.zeros((x.shape[0], x.shape[1], *out.shape[2:]), out.dtype)
    return jax.lax.scan(
        lambda y, j: (tb.put(y, f(tb.take(x, j), j), j), None), init, jnp.arange(tb.n)
    )[0]
