"""Per-token work in blocks of tokens: every block of every shard, the last one overlapping."""

import jax.numpy as jnp
import numpy as np
import pytest

from lomo_jax.token_blocks import TokenBlocks, map_tokens


@pytest.mark.parametrize("shards", [1, 2, 3])
@pytest.mark.parametrize("cap", [7, 8, 10, 20, 100])
def test_map_tokens_equals_the_function_on_every_token(shards, cap):
    rng = np.random.default_rng(cap)
    x = jnp.asarray(rng.normal(size=(2, 60, 3)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
    tb = TokenBlocks.of(60, cap, shards)
    assert tb.size <= cap and tb.n * tb.size >= 60 // shards
    taken = []
    for j in range(tb.n):  # every token is some block's own, once
        own = np.asarray(tb.own(j, 3))[0, :, 0]
        order = np.arange(60).reshape(1, 60, 1)
        taken.extend(np.asarray(tb.take(jnp.asarray(order), j))[0, own, 0].tolist())
    assert sorted(taken) == list(range(60))
    np.testing.assert_array_equal(map_tokens(lambda x: jnp.tanh(x @ w), x, tb), jnp.tanh(x @ w))
