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
    # Exactly, token by token; a matmul on a block may round unlike the whole one (XLA's
    # kernels differ with the shape: jax 0.12 on CPU), by a float32 ulp or so.
    np.testing.assert_array_equal(map_tokens(lambda x, j: 2 * x + 1, x, tb), 2 * x + 1)
    got = map_tokens(lambda x, j: jnp.tanh(x @ w), x, tb)
    np.testing.assert_allclose(got, jnp.tanh(x @ w), rtol=1e-5, atol=1e-6)


def test_the_mlp_of_a_long_sequence_runs_in_blocks_of_tokens():
    """model.mlp_tokens: each block's float32 [batch, tokens, intermediate] within
    token_block_bytes, per device when the sequence is split; Llama-3-8B's default is one block
    up to 4681 tokens, 8 blocks of 4096 at 32768; one block where it would take fewer than
    MIN_TOKEN_BLOCKS."""
    from lomo_jax.attention import Mask
    from lomo_jax.model import MIN_TOKEN_BLOCKS, mlp_tokens
    from lomo_jax.presets import find_config

    cfg = find_config("llama3.1-8b")
    assert mlp_tokens(cfg, 1, 4681, Mask()).n == 1
    assert mlp_tokens(cfg, 1, 4681 * (MIN_TOKEN_BLOCKS - 1), Mask()).n == 1
    assert mlp_tokens(cfg, 1, 4681 * (MIN_TOKEN_BLOCKS - 1) + 1, Mask()).n == MIN_TOKEN_BLOCKS
    assert mlp_tokens(cfg, 1, 32768, Mask()) == TokenBlocks(8, 4096, 1, 32768)
    assert mlp_tokens(cfg, 8, 4096, Mask()) == TokenBlocks(8, 512, 1, 4096)  # 8 rows: <= 585 each
    small = cfg.replace(token_block_bytes=4 * 2 * cfg.intermediate_size * 5)
    assert mlp_tokens(small, 2, 24, Mask()) == TokenBlocks(5, 5, 1, 24)  # the engine tests'
