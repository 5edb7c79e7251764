"""Blockwise (flash-style) attention against the dense reference, its block skipping, its memory,
and the model, the fused step and cached generation running on it."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lomo_jax
from lomo_jax import attention, compiler
from lomo_jax.attention import Mask
from lomo_jax.engine import init_train_state, make_fused_step
from lomo_jax.generate import generate
from lomo_jax.loss import Batch, loss_fn
from lomo_jax.optim import Lomo
from lomo_jax.schedule import Schedule
from tests.conftest import CONFIGS, random_ids
from tests.test_engine import assert_trees_close


@dataclasses.dataclass
class Case:
    T: int
    heads: int = 4
    kv_heads: int = 2
    segments: bool = False
    window: int | None = None
    offset: int = 0  # a KV cache holding `offset` tokens before the queries
    S: int | None = None  # keys (default T)
    block_q: int = 16
    block_k: int = 16


CASES = {
    "gqa": Case(64),
    "mqa-ragged-blocks": Case(50, kv_heads=1, block_k=8),
    "mha-padding-packed": Case(64, kv_heads=4, segments=True),
    "gqa-packed-uneven": Case(40, segments=True, block_q=16, block_k=8),
    "window-packed": Case(64, segments=True, window=20, block_q=8),
    "kv-cache-window": Case(10, offset=20, S=40, window=7, block_q=4, block_k=8),
}


def inputs(c: Case, seed=0):
    rng = np.random.default_rng(seed)
    S, K, B = c.S or c.T, 8, 2
    q = rng.normal(size=(B, c.T, c.heads, K)).astype(np.float32)
    k, v = (rng.normal(size=(B, S, c.kv_heads, K)).astype(np.float32) for _ in "kv")
    segs = None
    if c.segments:  # row 0: two packed documents; row 1: one document, then 7 padding tokens
        segs = np.ones((B, c.T), np.int32)
        segs[0, c.T // 3 :] = 2
        segs[1, c.T - 7 :] = 0
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), Mask(segs, c.offset)


@pytest.mark.parametrize("name", list(CASES))
def test_blockwise_equals_dense_forward_and_grad(name):
    c = CASES[name]
    q, k, v, mask = inputs(c)
    w = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)

    @functools.partial(jax.jit, static_argnums=0)
    def output_and_grads(impl, q, k, v):
        def f(q, k, v):
            return attention.attend(q, k, v, mask, impl, c.window, c.block_q, c.block_k)

        return f(q, k, v), jax.grad(lambda *qkv: jnp.sum(f(*qkv) * w), (0, 1, 2))(q, k, v)

    blockwise = jax.tree.leaves(output_and_grads("blockwise", q, k, v))
    dense = jax.tree.leaves(output_and_grads("dense", q, k, v))
    for a, b in zip(blockwise, dense, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_dense_is_the_softmax_of_the_masked_scores():
    """The reference itself, written out with repeated k / v heads and an explicit mask."""
    c = CASES["window-packed"]
    q, k, v, mask = inputs(c)
    G = c.heads // c.kv_heads
    k_rep, v_rep = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
    i = jnp.arange(c.T)
    seg = jnp.asarray(mask.segment_ids_BT)
    visible = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < c.window)
    visible = visible[None] & (seg[:, :, None] == seg[:, None, :])
    scores = jnp.einsum("bthk,bshk->bhts", q, k_rep) / np.sqrt(q.shape[-1])
    probs = jax.nn.softmax(jnp.where(visible[:, None], scores, -jnp.inf), axis=-1)
    expected = jnp.einsum("bhts,bshk->bthk", probs, v_rep)
    np.testing.assert_allclose(attention.dense(q, k, v, mask, c.window), expected, atol=1e-6)


@pytest.mark.parametrize("name", ["gqa", "window-packed", "kv-cache-window"])
def test_skipped_blocks_are_exactly_the_invisible_ones(name):
    """key_range / query_range (what the loops visit) against the dense mask, block by block."""
    c = CASES[name]
    S = c.S or c.T
    nq, nk = -(-c.T // c.block_q), -(-S // c.block_k)
    g = attention._Blocks(None, jnp.int32(c.offset), c.window, c.block_q, c.block_k)
    q_idx = c.offset + np.arange(nq * c.block_q)
    k_idx = np.arange(nk * c.block_k)
    ok = (k_idx[None, :] <= q_idx[:, None]) & (
        True if c.window is None else q_idx[:, None] - k_idx[None, :] < c.window
    )
    ok = ok.reshape(nq, c.block_q, nk, c.block_k).any(axis=(1, 3))  # [nq, nk]
    for i in range(nq):
        lo, hi = (int(x) for x in g.key_range(i, nk))
        assert list(range(lo, hi)) == list(np.flatnonzero(ok[i])), (i, lo, hi)
    for j in range(nk):
        lo, hi = (int(x) for x in g.query_range(j, nq))
        assert list(range(lo, hi)) == list(np.flatnonzero(ok[:, j])), (j, lo, hi)


def _grad_temp_bytes(impl, T, heads=8, K=64):
    x = jax.ShapeDtypeStruct((1, T, heads, K), jnp.float32)

    def loss(q, k, v):
        return jnp.sum(attention.attend(q, k, v, Mask(), impl, None, 256, 256))

    compiled = jax.jit(jax.grad(loss, (0, 1, 2))).lower(x, x, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_blockwise_memory_is_linear_in_length():
    """The gradient's temporaries at 4096 tokens against 1024: 4x for blockwise (every [T, T]
    array is gone), 16x for dense."""
    growth = _grad_temp_bytes("blockwise", 4096) / _grad_temp_bytes("blockwise", 1024)
    dense_growth = _grad_temp_bytes("dense", 4096) / _grad_temp_bytes("dense", 1024)
    assert growth <= 4.5, growth
    assert dense_growth >= 12, dense_growth


def test_auto_chooses_dense_for_one_block_and_blockwise_beyond():
    small = jax.ShapeDtypeStruct((1, 512, 4, 8), jnp.float32)
    large = jax.ShapeDtypeStruct((1, 1024, 4, 8), jnp.float32)
    with compiler.compiling_for("cpu"):
        assert attention.choose(small, small, Mask(), 512, 512) == "dense"
        assert attention.choose(large, large, Mask(), 512, 512) == "blockwise"
    with compiler.compiling_for("gpu"):  # float32: never cuDNN
        assert attention.choose(large, large, Mask(), 512, 512) == "blockwise"
    half = jax.ShapeDtypeStruct((1, 1024, 4, 64), jnp.bfloat16)
    with compiler.compiling_for("gpu", devices=8):  # sharded: never cuDNN
        assert attention.choose(half, half, Mask(), 512, 512) == "blockwise"


@pytest.mark.slow
def test_fused_lomo_on_blockwise_attention_equals_jax_grad_sgd_on_dense():
    """Blocks of 16 over 40 tokens (three query blocks, the last padded), causal skipping, packed
    segments and padding; the fused step's recompute under jax.vjp runs the custom vjp."""
    cfg = CONFIGS["gqa"].replace(attention_block=16)
    params = lomo_jax.init_params(cfg, jax.random.key(0))
    ids = random_ids(cfg, 2, 40, seed=9)
    segs = np.ones_like(ids)
    segs[0, 17:] = 2
    segs[1, 33:] = 0
    batch = Batch(jnp.asarray(ids), jnp.asarray(ids), jnp.asarray(segs))
    step = make_fused_step(cfg.replace(attention="blockwise"), Lomo(), Schedule(0.05))
    state, _ = step(init_train_state(Lomo(), jax.tree.map(jnp.array, params)), batch)
    grads = jax.grad(loss_fn, argnums=1)(cfg.replace(attention="dense"), params, batch)
    ref = jax.tree.map(lambda p, g: p - 0.05 * g, params, grads)
    assert_trees_close(state.params, ref, rtol=1e-5)


@pytest.mark.slow
def test_cached_generation_on_blockwise_attention_matches_dense():
    """Prefill (5 queries against 11 cache slots, blocks of 4) and decoding through the
    blockwise path pick the dense path's tokens."""
    cfg = CONFIGS["gqa"].replace(attention_block=4)
    params = lomo_jax.init_params(cfg, jax.random.key(3))
    prompt = random_ids(cfg, 2, 5, seed=2)
    dense = generate(cfg.replace(attention="dense"), params, prompt, 6, end_ids=())
    blockwise = generate(cfg.replace(attention="blockwise"), params, prompt, 6, end_ids=())
    assert blockwise == dense


def test_attention_choice_stays_out_of_the_exported_config():
    cfg = CONFIGS["gqa"].replace(attention="blockwise")
    assert "attention" not in cfg.to_hf_dict()
    assert lomo_jax.LlamaConfig.from_hf_dict(cfg.to_hf_dict()) == cfg.replace(attention="auto")
    with pytest.raises(ValueError, match="unknown attention"):
        cfg.replace(attention="flash")
