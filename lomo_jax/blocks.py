"""An axis split into equal blocks of bounded size, for loops that must never hold a whole
intermediate: the head's vocabulary pieces, AdaLomo's column blocks, the embedding gradient.

Block j nominally covers [j * size, (j + 1) * size); the last one starts at total - size instead,
overlapping the one before when size does not divide total, so every block has the same static
shape. Its "own" entries are those no earlier block covered.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Bytes of one block's float32 intermediates.
BLOCK_BYTES = 32 * 2**20


def even_blocks(total: int, cap: int) -> tuple[int, int]:
    """(n, size): n blocks of `size` <= cap entries covering `total`."""
    n = -(-total // max(1, min(total, cap)))
    return n, -(-total // n)


def start(j: jax.Array, size: int, total: int) -> jax.Array:
    return jnp.minimum(j * size, total - size)


def own(j: jax.Array, size: int, total: int) -> jax.Array:
    """[size] bool: which of block j's entries no earlier block covered."""
    return start(j, size, total) + jnp.arange(size) >= j * size


def take(x: jax.Array, j: jax.Array, size: int, axis: int) -> jax.Array:
    """Block j of `x` along `axis`."""
    return jax.lax.dynamic_slice_in_dim(x, start(j, size, x.shape[axis]), size, axis)


def put(x: jax.Array, block: jax.Array, j: jax.Array, axis: int) -> jax.Array:
    """`x` with block j along `axis` replaced by `block`."""
    size = block.shape[axis]
    return jax.lax.dynamic_update_slice_in_dim(x, block, start(j, size, x.shape[axis]), axis)
