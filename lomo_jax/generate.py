"""Autoregressive sampling with a KV cache: greedy, or temperature with top-k / top-p, stopping at
the end ids. A `Context` keeps its cache between calls, so a chat's next turn runs only the
tokens the cache does not already hold."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator, Sequence

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


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How each token is drawn, with transformers' names and in its order: temperature, then
    top_k, then top_p. Temperature 0 is greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no limit

    def __post_init__(self):
        if not 0 <= self.temperature < math.inf:
            raise GenerateError(
                f"temperature must be at least 0 (0 = greedy), got {self.temperature}"
            )
        if not 0 < self.top_p <= 1:
            raise GenerateError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise GenerateError(f"top_k must be an integer >= 0 (0 = no limit), got {self.top_k}")

    def __str__(self) -> str:
        if self.temperature == 0:
            return "greedy"
        return f"sampling at temperature {self.temperature:g}, top_p {self.top_p:g}, top_k " + (
            str(self.top_k) if self.top_k else "off"
        )


def _run_layers(cfg: LlamaConfig, params: Params, ids_BT, cache: KVCache, index, last):
    """Runs the layers over new tokens at positions index.., reading and filling the cache;
    -> the logits after token `last` of them."""
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
    h_B1D = jax.lax.dynamic_slice_in_dim(h, last, 1, axis=1)
    return head(cfg, params, h_B1D)[:, 0], new_cache


def warp(logits_BV: jax.Array, s: Sampling) -> jax.Array:
    """The logits divided by the temperature, with the tokens top_k and top_p leave out at -inf
    (what transformers' temperature, top-k and top-p logits warpers do, in that order)."""
    logits_BV = logits_BV / s.temperature
    if 0 < s.top_k < logits_BV.shape[-1]:
        kth_B1 = jax.lax.top_k(logits_BV, s.top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    if s.top_p < 1.0:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        cum_BV = jnp.cumsum(jax.nn.softmax(sorted_BV, axis=-1), axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least the best token).
        cutoff_idx = jnp.sum(cum_BV < s.top_p, axis=-1, keepdims=True)
        cutoff_B1 = jnp.take_along_axis(sorted_BV, cutoff_idx, axis=-1)
        logits_BV = jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)
    return logits_BV


def _sample(logits_BV, key, s: Sampling):
    if s.temperature == 0.0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, warp(logits_BV, s), axis=-1).astype(jnp.int32)


@functools.partial(jit, static_argnums=(0, 4), donate_argnums=(3,))
def _next_token(cfg, params, ids_BT, cache, sampling, index, last, key):
    logits_BV, cache = _run_layers(cfg, params, ids_BT, cache, index, last)
    return _sample(logits_BV, key, sampling), cache


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _common_prefix(a_BN: np.ndarray, b_BT: np.ndarray) -> int:
    n = min(a_BN.shape[1], b_BT.shape[1])
    same_N = (a_BN[:, :n] == b_BT[:, :n]).all(axis=0)
    return n if same_N.all() else int(same_N.argmin())


MIN_CACHE = 256  # tokens: the first few turns of a chat need no larger cache (nor compile)


class Context:
    """A KV cache over the tokens the model has read. Each call takes whole sequences (a chat's
    whole conversation so far): the cache serves the longest prefix they share with what it
    holds, and only the rest is run through the model.

    Shapes are rounded up to powers of two (the new tokens of a call; the cache, from MIN_CACHE
    tokens up to the model's context), so a growing conversation compiles a few shapes, not one
    per turn."""

    def __init__(self, cfg: LlamaConfig, params: Params, batch: int = 1):
        self.cfg, self.params, self.batch = cfg, params, batch
        self.forget()

    def forget(self) -> None:
        self.tokens = np.zeros((self.batch, 0), np.int32)  # whose keys and values are cached
        self.cache: KVCache | None = None
        self.prefilled = 0  # tokens the last call ran before its first new one

    def _reserve(self, n: int) -> None:
        """Room for `n` tokens, what the cache holds kept."""
        have = 0 if self.cache is None else self.cache.k_BSHK.shape[2]
        if have >= n:
            return
        S = max(n, min(_pow2(max(n, MIN_CACHE)), self.cfg.max_position_embeddings))
        L, KVH, K = self.cfg.num_hidden_layers, self.cfg.num_key_value_heads, self.cfg.head_dim
        if self.cache is None:
            dtype = self.params["embed"]["embedding"].dtype
            shape = (L, self.batch, S, KVH, K)
            self.cache = KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
        else:
            grow = ((0, 0), (0, 0), (0, S - have), (0, 0), (0, 0))
            self.cache = KVCache(*(jnp.pad(x, grow) for x in self.cache))

    def stream(
        self,
        ids_BT,
        max_new_tokens: int,
        sampling: Sampling = Sampling(),
        seed: int = 0,
        end_ids: Sequence[int] = (),
    ) -> Iterator[np.ndarray]:
        """Each step's next tokens [batch] after `ids_BT`, until every row has drawn one of
        `end_ids` or `max_new_tokens` steps are done."""
        ids_BT = _checked_prompt(self.cfg, ids_BT, self.batch, max_new_tokens)
        if not 0 <= seed <= MAX_SEED:
            raise GenerateError(f"seed must be an integer in [0, {MAX_SEED}], got {seed}")
        if max_new_tokens == 0:
            return
        T = ids_BT.shape[1]
        kept = min(_common_prefix(self.tokens, ids_BT), T - 1)  # the last one gives the logits
        fed_BN = ids_BT[:, kept:]
        self.tokens, self.prefilled = ids_BT[:, :kept], fed_BN.shape[1]
        padded = _pow2(fed_BN.shape[1])
        self._reserve(max(kept + padded, T + max_new_tokens))
        ids = jnp.asarray(np.pad(fed_BN, ((0, 0), (0, padded - fed_BN.shape[1]))))
        key, ends = jax.random.key(seed), np.asarray(end_ids, np.int32)
        done = np.zeros(self.batch, bool)
        for _ in range(max_new_tokens):
            key, sub = jax.random.split(key)
            index, last = self.tokens.shape[1], fed_BN.shape[1] - 1
            try:
                next_B, self.cache = _next_token(
                    self.cfg, self.params, ids, self.cache, sampling, index, last, sub
                )
            except BaseException:  # the cache was donated: it may be gone
                self.forget()
                raise
            self.tokens = np.concatenate([self.tokens, fed_BN], axis=1)
            next_B = np.asarray(next_B)
            done |= np.isin(next_B, ends)
            yield next_B
            if done.all():
                return
            fed_BN = next_B[:, None]
            ids = jnp.asarray(fed_BN)

    def generate(
        self,
        ids_BT,
        max_new_tokens: int,
        sampling: Sampling = Sampling(),
        seed: int = 0,
        end_ids: Sequence[int] | None = None,
    ) -> list[list[int]]:
        """New tokens after each row of `ids_BT`, each row cut after its first end id
        (`end_ids`; default the config's EOS ids, () never stops)."""
        ends = self.cfg.eos_ids if end_ids is None else tuple(end_ids)
        steps = list(self.stream(ids_BT, max_new_tokens, sampling, seed, ends))
        out = np.stack(steps, axis=1) if steps else np.zeros((self.batch, 0), np.int32)
        return [_cut_after_end(row, ends) for row in out.tolist()]


def generate(
    cfg: LlamaConfig,
    params: Params,
    prompt_ids: list[list[int]] | np.ndarray,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    seed: int = 0,
    end_ids: Sequence[int] | None = None,
) -> list[list[int]]:
    """New tokens for each prompt (all prompts the same length), each cut after its first end
    id (`end_ids`; default the config's EOS ids, () never stops). Prompt and new tokens stay
    within the model's context (`max_position_embeddings`)."""
    batch = np.shape(prompt_ids)[0] if np.ndim(prompt_ids) == 2 else 1
    return Context(cfg, params, batch).generate(prompt_ids, max_new_tokens, sampling, seed, end_ids)


def _checked_prompt(cfg: LlamaConfig, ids_BT, batch: int, max_new_tokens: int) -> np.ndarray:
    """The prompt as int32 [batch, T], its ids within the vocabulary, and the new tokens within
    the model's context."""
    ids_BT = np.asarray(ids_BT, dtype=np.int64)
    if ids_BT.ndim != 2 or ids_BT.shape[1] == 0 or ids_BT.shape[0] != batch:
        raise GenerateError(f"prompt ids must be a non-empty [{batch}, length] array")
    if ids_BT.min() < 0 or ids_BT.max() >= cfg.vocab_size:
        bad = ids_BT.min() if ids_BT.min() < 0 else ids_BT.max()
        raise GenerateError(
            f"prompt token id {bad} does not fit the model's vocab_size {cfg.vocab_size} "
            "(wrong tokenizer?)"
        )
    if max_new_tokens < 0:
        raise GenerateError(f"max_new_tokens must be at least 0, got {max_new_tokens}")
    T, context = ids_BT.shape[1], cfg.max_position_embeddings
    if T + max_new_tokens > context:
        room = f"; at most {context - T}" if T < context else ""
        raise GenerateError(
            f"max_new_tokens {max_new_tokens}: with the prompt's {T} token(s) that is beyond the "
            f"model's context (max_position_embeddings {context}){room}"
        )
    return ids_BT.astype(np.int32)


def _cut_after_end(row: list[int], ends: Sequence[int]) -> list[int]:
    for i, t in enumerate(row):
        if t in ends:
            return row[: i + 1]
    return row
