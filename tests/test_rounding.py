"""Stochastic rounding into bfloat16 / float16 against numpy's (ml_dtypes') floats, and its bits
against jax.random.bits."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from lomo_jax.optim import AdaLomo, Lomo, StepScalars
from lomo_jax.rounding import random_bits, round_to, step_key, stochastic_round, tensor_key

DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def spread(dtype, n: int, seed: int = 0) -> np.ndarray:
    """float32 values over the whole range of `dtype` and beyond: normals, subnormals, values
    below the smallest subnormal and around the largest finite, both signs."""
    info = ml_dtypes.finfo(dtype)
    rng = np.random.default_rng(seed)
    scales = [
        10.0 ** rng.uniform(-5, 4, n),  # normals
        float(info.smallest_normal) * rng.uniform(0, 1, n),  # subnormals of dtype
        float(info.smallest_subnormal) * rng.uniform(0, 1, n),  # below the smallest one
        float(info.max) * rng.uniform(0.99, 1.01, n),  # around the largest finite
    ]
    x = np.concatenate(scales) * rng.choice([-1.0, 1.0], 4 * n)
    with np.errstate(over="ignore"):
        return x.astype(np.float32)  # float64 -> float32 may overflow to inf: also a case


def neighbours(x: np.ndarray, dtype) -> tuple[np.ndarray, np.ndarray]:
    """(nearest, the other neighbour on x's side of it) in `dtype`, by numpy."""
    with np.errstate(over="ignore"):
        near = x.astype(dtype)
        toward = np.where(near.astype(np.float64) < x, np.inf, -np.inf).astype(dtype)
        return near, np.nextafter(near, toward)


def sround(x, dtype, key) -> np.ndarray:
    out = jax.jit(stochastic_round, static_argnums=1)(
        jnp.asarray(x), dtype, random_bits(key, x.shape)
    )
    return np.asarray(out)


def same(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise: equal bit patterns, or both NaN."""
    a, b = np.asarray(a), np.asarray(b)
    return (a.view(np.uint16) == b.view(np.uint16)) | (np.isnan(a) & np.isnan(b))


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4)])
def test_bits_are_jax_random_bits(shape):
    """The elementwise threefry equals jax.random.bits with partitionable threefry, jitted and
    vmapped over keys (how the unfused path draws each layer's bits)."""
    keys = jax.random.split(jax.random.key(11, impl="threefry2x32"), 3)
    with jax.threefry_partitionable(True):
        bits = jax.jit(lambda k: jax.random.bits(k, shape, jnp.uint32))
        ref = np.stack([bits(k) for k in keys])
    ours = jax.jit(jax.vmap(lambda k: random_bits(k, shape)))(keys)
    np.testing.assert_array_equal(np.asarray(ours), ref)


@pytest.mark.parametrize("name", list(DTYPES))
def test_each_value_becomes_one_of_its_two_neighbours(name):
    dtype = DTYPES[name]
    x = spread(dtype, 2000)
    near, other = neighbours(x, dtype)
    took = np.zeros(x.shape, bool)
    for k in range(4):
        r = sround(x, jnp.dtype(dtype), jax.random.key(k))
        assert r.dtype == dtype
        is_near, is_other = same(r, near), same(r, other)
        assert np.all(is_near | is_other), x[~(is_near | is_other)][:5]
        took |= is_other & ~is_near
    # Both neighbours occur wherever x lies strictly between them.
    a, b = near.astype(np.float64), other.astype(np.float64)
    inexact = (a != x) & np.isfinite(a) & np.isfinite(b)
    assert took[inexact].mean() > 0.5


@pytest.mark.parametrize("name", list(DTYPES))
def test_representable_values_stay_exact(name):
    """Every bit pattern of the 16-bit type (NaNs, infinities, subnormals, -0 included)."""
    dtype = DTYPES[name]
    every = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(dtype)
    for k in range(3):
        r = sround(every.astype(np.float32), jnp.dtype(dtype), jax.random.key(k))
        assert np.all(same(r, every))


@pytest.mark.parametrize("name", list(DTYPES))
def test_mean_of_many_roundings_is_the_float32_value(name):
    dtype = DTYPES[name]
    x = spread(dtype, 64, seed=1)
    near, other = neighbours(x, dtype)
    x64, a, b = x.astype(np.float64), near.astype(np.float64), other.astype(np.float64)
    keep = np.isfinite(a) & np.isfinite(b) & (a != x64)
    x, x64, a, b = x[keep], x64[keep], a[keep], b[keep]
    n = 2048
    keys = jax.random.split(jax.random.key(5), n)
    draws = jax.jit(
        jax.vmap(
            lambda k: stochastic_round(jnp.asarray(x), jnp.dtype(dtype), random_bits(k, x.shape))
        )
    )(keys)
    draws = np.asarray(draws).astype(np.float64)
    p = (x64 - a) / (b - a)  # the probability of the far neighbour
    freq = (draws == b).mean(axis=0)
    sigma = np.sqrt(p * (1 - p) / n) + 1e-12
    assert np.all(np.abs(freq - p) <= 5 * sigma + 1 / n)
    mean_err = np.abs(draws.mean(axis=0) - x64) / np.abs(b - a)  # in units of the spacing
    assert mean_err.mean() < 0.02  # rounding to nearest: about 0.25 on average
    assert np.mean(np.abs(a - x64) / np.abs(b - a)) > 0.2  # ...which this data would show


@pytest.mark.parametrize("name", list(DTYPES))
def test_nan_inf_and_overflow(name):
    dtype = DTYPES[name]
    big = float(ml_dtypes.finfo(dtype).max)
    with np.errstate(over="ignore"):  # 2 x bfloat16's largest is inf in float32 too
        x = np.array([np.nan, np.inf, -np.inf, 2 * big, -2 * big, big, -big], np.float32)
    for k in range(3):
        r = sround(x, jnp.dtype(dtype), jax.random.key(k)).astype(np.float64)
        assert np.isnan(r[0])
        np.testing.assert_array_equal(r[1:], [np.inf, -np.inf, np.inf, -np.inf, big, -big])


def test_keys_are_reproducible_and_distinct():
    def bits(rounding="stochastic", seed=0, step=3, name="layers.mlp.up_proj.kernel", layer=1):
        key = tensor_key(step_key(rounding, seed, jnp.int32(step)), name, jnp.int32(layer))
        return np.asarray(random_bits(key, (4, 8)))

    reference = bits()
    np.testing.assert_array_equal(bits(), reference)
    with jax.threefry_partitionable(False):  # computed elementwise: the flag does not matter
        np.testing.assert_array_equal(bits(), reference)
    for other in (
        bits(seed=1),
        bits(step=4),
        bits(name="layers.mlp.down_proj.kernel"),
        bits(layer=2),
    ):
        assert np.mean(other == reference) < 0.1
    assert step_key("nearest", 0, jnp.int32(0)) is None
    with pytest.raises(ValueError, match="unknown rounding"):
        step_key("up", 0, jnp.int32(0))


def test_float32_and_nearest_are_plain_casts():
    x = jnp.asarray(spread(ml_dtypes.bfloat16, 100))
    key = jax.random.key(0)
    assert np.asarray(round_to(x, jnp.float32, key)).tobytes() == np.asarray(x).tobytes()
    nearest = np.asarray(round_to(x, jnp.bfloat16, None))
    assert np.all(same(nearest, np.asarray(x).astype(ml_dtypes.bfloat16)))


@pytest.mark.parametrize("rule", [Lomo(), AdaLomo()], ids=["lomo", "adalomo"])
def test_the_bits_are_made_inside_the_update(rule):
    """No buffer of random bits: a stochastically rounded update of a bfloat16 matrix needs no
    more memory than one rounded to nearest (jax.random.bits would hold five uint32 buffers of
    the matrix's size on XLA:CPU: 10 MB here)."""
    shape = (512, 1024)
    p = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    g = jax.ShapeDtypeStruct(shape, jnp.float32)
    s = jax.eval_shape(rule.init, p)
    sc = StepScalars(jnp.float32(1e-3), jnp.int32(1), jnp.float32(1.0), jnp.float32(1.0))

    def temp(key) -> int:
        update = jax.jit(lambda p, g, s: rule.update(p, g, s, sc, key), donate_argnums=0)
        return update.lower(p, g, s).compile().memory_analysis().temp_size_in_bytes

    grown = temp(jax.random.key(0)) - temp(None)
    assert grown < 512 * 1024 // 4, grown  # far below one float32 matrix (2 MB)
