"""Rounding an update's float32 result into a 16-bit parameter: to nearest, or stochastically.

There is no float32 master copy (as in the paper), so the cast back is where a 16-bit weight
learns or not: rounding to nearest drops every change below half an ulp (relative 2^-9..2^-8 in
bfloat16), about the size of an AdaLomo step. Stochastic rounding (Zamirai et al. 2020,
arXiv 2010.06192) picks one of the two neighbours, the far one with probability distance /
spacing, so the expected weight is the float32 one and small steps add up.

The random bits cost no memory and no state: each tensor slice gets a key folded from (seed,
step, tensor name, layer), and its bits are threefry2x32 of (key, flat index) -- the bits
`jax.random.bits(key, shape, uint32)` gives with `jax_threefry_partitionable` (the default since
JAX 0.5), written as elementwise integer ops. They depend only on an element's index in the
whole tensor, never on how it is sharded, and XLA fuses them into the update; jax.random.bits
itself lowers on XLA:CPU to a rolled loop that materializes five uint32 buffers of the tensor's
size (docs/measurements.md). A resumed run recomputes the same bits from its step.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np

ROUNDINGS = ("stochastic", "nearest")

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def step_key(rounding: str, seed: int, step: jax.Array) -> jax.Array | None:
    """The key of one optimizer step's rounding (`StepScalars.key`); None rounds to nearest."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r}; choose from {ROUNDINGS}")
    if rounding == "nearest":
        return None
    return jax.random.fold_in(jax.random.key(seed, impl="threefry2x32"), step)


def tensor_key(key: jax.Array, name: str, layer: jax.Array | None = None) -> jax.Array:
    """The key of tensor `name` (a stable number: its CRC-32) and, for a stacked weight, layer."""
    key = jax.random.fold_in(key, np.uint32(zlib.crc32(name.encode())))
    return key if layer is None else jax.random.fold_in(key, layer)


def _threefry2x32(k0: jax.Array, k1: jax.Array, x0: jax.Array, x1: jax.Array):
    """The Threefry-2x32 block cipher, 20 rounds (Salmon et al. 2011), as JAX computes it."""
    ks = (k0, k1, k0 ^ k1 ^ np.uint32(0x1BD11BDA))
    x0, x1 = x0 + ks[0], x1 + ks[1]
    for group in range(5):
        for r in _ROTATIONS[group % 2]:
            x0 = x0 + x1
            x1 = ((x1 << np.uint32(r)) | (x1 >> np.uint32(32 - r))) ^ x0
        x0 = x0 + ks[(group + 1) % 3]
        x1 = x1 + ks[(group + 2) % 3] + np.uint32(group + 1)
    return x0, x1


def random_bits(
    key: jax.Array,
    shape: tuple[int, ...],
    origin: tuple[jax.Array | int, ...] | None = None,
    whole: tuple[int, ...] | None = None,
) -> jax.Array:
    """uint32 bits of `shape`, equal to `jax.random.bits(key, whole, jnp.uint32)` (partitionable
    threefry) at the block of `shape` starting at `origin` (default: the block is the whole
    tensor), as elementwise ops of each element's flat index in the whole tensor."""
    whole = shape if whole is None else whole
    origin = (0,) * len(shape) if origin is None else origin
    if int(np.prod(whole, dtype=np.int64)) >= 2**32:
        raise ValueError(f"random_bits: a tensor of {whole} has 2^32 elements or more")
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for d in reversed(range(len(shape))):
        at = jax.lax.broadcasted_iota(jnp.uint32, shape, d) + jnp.asarray(origin[d], jnp.uint32)
        index = index + at * np.uint32(stride)
        stride *= whole[d]
    k = jax.random.key_data(key)
    hi, lo = _threefry2x32(k[0], k[1], jnp.zeros(shape, jnp.uint32), index)
    return hi ^ lo


def stochastic_round(x: jax.Array, dtype, bits: jax.Array) -> jax.Array:
    """float32 `x` rounded to `dtype` (bfloat16 or float16): to the neighbour of larger
    magnitude with probability (|x| - |low|) / spacing, decided by uint32 `bits`.

    On the float32 bit pattern: add random bits below the target's last mantissa bit, then cut
    them off (a carry is the round-up). How many bits to drop depends on the exponent where the
    target is subnormal (float16 below 2^-14); below the target's smallest subnormal both
    neighbours are 0 and that subnormal, chosen by comparing the bits with |x| / subnormal.
    Representable values come back unchanged; NaN and inf pass through; a value that rounds up
    past the target's largest finite becomes inf, as an overflow does.
    """
    info = jnp.finfo(dtype)
    xb = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    exponent = jnp.maximum((xb >> 23) & 0xFF, 1).astype(jnp.int32) - 127  # float32 subnormal: -126
    drop = (23 - info.nmant) + jnp.maximum(0, info.minexp - exponent)
    low = (np.uint32(1) << jnp.minimum(drop, 23).astype(jnp.uint32)) - 1
    rounded = (xb + (bits & low)) & ~low
    # Below the smallest subnormal: |x| / smallest is exact (a power of two), bits give 24.
    smallest = float(info.smallest_subnormal)
    up = (bits >> 8).astype(jnp.float32) * 2.0**-24 < jnp.abs(x) / smallest
    sign = xb & np.uint32(0x80000000)
    tiny = sign | jnp.where(up, np.float32(smallest).view(np.uint32), np.uint32(0))
    special = (xb & np.uint32(0x7F800000)) == np.uint32(0x7F800000)  # inf, NaN: unchanged
    out = jnp.where(special, xb, jnp.where(drop > 23, tiny, rounded))
    return jax.lax.bitcast_convert_type(out, jnp.float32).astype(dtype)


def round_to(
    x: jax.Array,
    dtype,
    key: jax.Array | None,
    origin: tuple[jax.Array | int, ...] | None = None,
    whole: tuple[int, ...] | None = None,
) -> jax.Array:
    """float32 `x` as `dtype`: stochastically for a 16-bit float with a `key`, else to nearest.
    `x` may be the block at `origin` of a tensor shaped `whole`: it draws that block's bits."""
    if key is None or jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return x.astype(dtype)
    return stochastic_round(x, dtype, random_bits(key, x.shape, origin, whole))
