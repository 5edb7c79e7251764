"""Autoregressive sampling with a KV cache: greedy, temperature and top-p, stopping at EOS."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from lomo_jax.attention import Mask
from lomo_jax.compiler import jit
from lomo_jax.config import LlamaConfig
from lomo_jax.errors import UserError
from lomo_jax.model import KVCache, Params, decoder_layers, embed, head

MAX_SEED = 2**32 - 1  # jax.random.key's seeds are uint32


class GenerateError(UserError, ValueError):
    """Sampling settings or a prompt that cannot be generated from."""


def _run_layers(cfg: LlamaConfig, params: Params, ids_BT, cache: KVCache, index):
    """Runs the layers over new tokens at positions index.., reading and filling the cache."""
    B, T = ids_BT.shape
    positions_BT = jnp.broadcast_to(index + jnp.arange(T, dtype=jnp.int32), (B, T))
    h, new_cache = decoder_layers(
        cfg,
        params["layers"],
        embed(cfg, params["embed"], ids_BT),
        positions_BT,
        Mask(offset=index),
        cache,
        index,
    )
    return head(cfg, params, h[:, -1:])[:, 0], new_cache


def _sample(logits_BV, key, temperature: float, top_p: float):
    if temperature == 0.0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV / temperature
    if top_p < 1.0:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        cum_BV = jnp.cumsum(jax.nn.softmax(sorted_BV, axis=-1), axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least the best token).
        cutoff_idx = jnp.sum(cum_BV < top_p, axis=-1, keepdims=True)
        cutoff_B1 = jnp.take_along_axis(sorted_BV, cutoff_idx, axis=-1)
        logits_BV = jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)
    return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


@functools.partial(jit, static_argnums=(0, 4, 5), donate_argnums=(3,))
def _next_token(cfg, params, ids_BT, cache, temperature, top_p, index, key):
    logits_BV, cache = _run_layers(cfg, params, ids_BT, cache, index)
    return _sample(logits_BV, key, temperature, top_p), cache


def generate(
    cfg: LlamaConfig,
    params: Params,
    prompt_ids: list[list[int]] | np.ndarray,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_at_eos: bool = True,
) -> list[list[int]]:
    """New tokens for each prompt (all prompts the same length); a row stops after its EOS.
    Prompt and new tokens stay within the model's context (`max_position_embeddings`)."""
    if not 0 <= temperature < math.inf:
        raise GenerateError(f"temperature must be at least 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise GenerateError(f"top_p must be in (0, 1], got {top_p}")
    if max_new_tokens < 0:
        raise GenerateError(f"max_new_tokens must be at least 0, got {max_new_tokens}")
    if not 0 <= seed <= MAX_SEED:
        raise GenerateError(f"seed must be an integer in [0, {MAX_SEED}], got {seed}")
    prompt_BT = np.asarray(prompt_ids, dtype=np.int64)
    if prompt_BT.ndim != 2 or prompt_BT.shape[1] == 0:
        raise GenerateError("prompt_ids must be a non-empty [batch, length] array")
    if prompt_BT.min() < 0 or prompt_BT.max() >= cfg.vocab_size:
        bad = prompt_BT.min() if prompt_BT.min() < 0 else prompt_BT.max()
        raise GenerateError(
            f"prompt token id {bad} does not fit the model's vocab_size {cfg.vocab_size} "
            "(wrong tokenizer?)"
        )
    B, T = prompt_BT.shape
    context = cfg.max_position_embeddings
    if T + max_new_tokens > context:
        room = f"; at most {context - T}" if T < context else ""
        raise GenerateError(
            f"max_new_tokens {max_new_tokens}: with the prompt's {T} token(s) that is beyond the "
            f"model's context (max_position_embeddings {context}){room}"
        )
    prompt_BT = prompt_BT.astype(np.int32)
    S = T + max_new_tokens
    L, KVH, K = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    dtype = params["embed"]["embedding"].dtype
    cache = KVCache(jnp.zeros((L, B, S, KVH, K), dtype), jnp.zeros((L, B, S, KVH, K), dtype))
    key = jax.random.key(seed)
    eos = np.asarray(cfg.eos_ids if stop_at_eos else (), dtype=np.int32)
    out = np.zeros((B, 0), np.int32)
    done = np.zeros(B, bool)
    ids_BT, index = jnp.asarray(prompt_BT), 0
    for _ in range(max_new_tokens):
        key, sub = jax.random.split(key)
        next_B, cache = _next_token(
            cfg, params, ids_BT, cache, float(temperature), float(top_p), jnp.int32(index), sub
        )
        index += ids_BT.shape[1]
        next_B = np.asarray(next_B)
        out = np.concatenate([out, next_B[:, None]], axis=1)
        done |= np.isin(next_B, eos)
        if done.all():
            break
        ids_BT = jnp.asarray(next_B[:, None])
    return [_truncate_at_eos(row, eos) for row in out.tolist()]


def _truncate_at_eos(row: list[int], eos: np.ndarray) -> list[int]:
    for i, t in enumerate(row):
        if t in eos:
            return row[: i + 1]
    return row
