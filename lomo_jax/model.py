"""A LLaMA in Flax whose decoder layers are stacked, so it can be driven one layer at a time; the
families built on it differ in a few switches of the config (Qwen2's q/k/v biases, Qwen3's
per-head q/k norms, Mistral's sliding window).

The model is three pure functions of (params, inputs) that compose as

    h = embed(cfg, params["embed"], ids)                           # [B, T, D]
    for i in range(L):                                             # lax.scan over layers
        h = decoder_layer(cfg, tree.map(lambda w: w[i], params["layers"]), h, positions, mask)
    logits = head(cfg, params, h)                                  # final norm + lm_head

`params["layers"]` holds every decoder weight with a leading layer axis [L, ...], which is what
`lax.scan` consumes and what the fused LOMO engine walks backwards. `forward` is exactly that
composition. Names follow Hugging Face (`self_attn.q_proj`, `mlp.gate_proj`, ...) and every
tensor is a row of lomo_jax.parameters.TABLE; kernels are [in, out] (torch Linear weights
transposed).

`mask` is `attention.Mask`: segment ids and a KV-cache offset, never a [T, T] array; the
attention itself is `lomo_jax.attention` (dense, blockwise or cuDNN, as `cfg.attention` says).
RoPE rotates halves (the Hugging Face layout); Meta and llama2.c weights are permuted on import.
Norms, softmax and logits are computed in float32 whatever the parameter dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lomo_jax import attention, compiler, lora
from lomo_jax.attention import Mask
from lomo_jax.config import LlamaConfig
from lomo_jax.lora import LoraConfig
from lomo_jax.rounding import random_bits
from lomo_jax.token_blocks import TokenBlocks, map_tokens

Params = dict[str, Any]


# ---- rotary embedding -----------------------------------------------------------------------
def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
    """Inverse frequencies [head_dim / 2], "linear" or "llama3" scaled as transformers does."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    inv_freq = inv_freq.astype(np.float32)
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv_freq = inv_freq / np.float32(scaling["factor"])
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def apply_rope(x_BTHK: jax.Array, positions_BT: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    freqs_BTF = positions_BT[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)
    emb_BTK = jnp.concatenate([freqs_BTF, freqs_BTF], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb_BTK), jnp.sin(emb_BTK)
    x1, x2 = jnp.split(x_BTHK, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x_BTHK * cos + rotated * sin).astype(x_BTHK.dtype)


# ---- modules --------------------------------------------------------------------------------
@jax.custom_vjp
def _dense_dot(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


def _dense_dot_fwd(x, kernel):
    return _dense_dot(x, kernel), (x, kernel)


def _dense_dot_bwd(residuals, dy):
    """The usual backward, but on a CPU a 16-bit kernel is read through a fresh value (`kernel +
    0 * dy[0]`): XLA:CPU computes a 16-bit matmul on a float32 copy of its operands, and the
    backward's copy would otherwise be the forward's, kept alive in between -- in the fused
    engine, the float32 copies of every weight of a block at once."""
    x, kernel = residuals
    if kernel.dtype != jnp.float32 and compiler.target()[0] == "cpu":
        kernel = kernel + (0.0 * dy[(0,) * dy.ndim]).astype(kernel.dtype)
    dx = jax.lax.dot_general(dy, kernel, (((dy.ndim - 1,), (1,)), ((), ())))
    batch = tuple(range(x.ndim - 1))
    dk = jax.lax.dot_general(x, dy, ((batch, batch), ((), ())))
    return dx.astype(x.dtype), dk.astype(kernel.dtype)


_dense_dot.defvjp(_dense_dot_fwd, _dense_dot_bwd)


def _dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """`nn.Dense`'s dot_general (contracting the input's last axis with the kernel's first)."""
    return _dense_dot(lhs, rhs)


class Dense(nn.Dense):
    """nn.Dense (through `_dense_dot`), with LoRA factors beside the kernel when `lora` is set:
    y = x W + b + (alpha / r) dropout(x) A B, the LoRA path in float32 as peft computes it
    (lomo_jax.lora). Dropout needs the `lora_dropout` rng; without it (evaluation) there is none.
    Its bits are `rounding.random_bits`: elementwise in each element's index, so they fuse and
    are the same on any mesh."""

    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, x):
        y = super().__call__(x)
        if self.lora is None:
            return y
        r, p = self.lora.rank, self.lora.dropout
        a = self.param("lora_a", lora.kaiming_uniform(), (x.shape[-1], r), lora.DTYPE)
        b = self.param("lora_b", nn.initializers.zeros, (r, self.features), lora.DTYPE)
        x = x.astype(lora.DTYPE)
        if p and self.has_rng("lora_dropout"):
            keep = random_bits(self.make_rng("lora_dropout"), x.shape) >= np.uint32(p * 2**32)
            x = jnp.where(keep, x / (1 - p), 0.0)
        return (y.astype(lora.DTYPE) + self.lora.scale * ((x @ a) @ b)).astype(y.dtype)


def dense(cfg: LlamaConfig, name: str, features: int, use_bias: bool) -> Dense:
    """Projection `name` (q_proj, ...), with LoRA factors if the config's LoRA targets it."""
    targeted = cfg.lora is not None and name in cfg.lora.targets
    return Dense(
        features,
        use_bias=use_bias,
        dot_general=_dense_dot_general,
        lora=cfg.lora if targeted else None,
    )


class RMSNorm(nn.Module):
    eps: float

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        weight = self.param("weight", nn.initializers.ones, (x_BTD.shape[-1],), jnp.float32)
        x = x_BTD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return weight * x.astype(x_BTD.dtype)


class KVCache(NamedTuple):
    k_BSHK: jax.Array
    v_BSHK: jax.Array


class Attention(nn.Module):
    """Grouped-query attention in two halves, `project` (q, k, v with RoPE) and `attend` (softmax
    attention and the output projection), so a KV cache or the fused engine can sit between."""

    cfg: LlamaConfig

    def setup(self):
        cfg = self.cfg
        H, KVH, K = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        qkv = cfg.qkv_bias
        self.q_proj = dense(cfg, "q_proj", H * K, qkv)
        self.k_proj = dense(cfg, "k_proj", KVH * K, qkv)
        self.v_proj = dense(cfg, "v_proj", KVH * K, qkv)
        self.o_proj = dense(cfg, "o_proj", cfg.hidden_size, cfg.attention_bias)
        if cfg.qk_norm:  # Qwen3: each head of q and k normalized before RoPE
            self.q_norm, self.k_norm = RMSNorm(cfg.rms_norm_eps), RMSNorm(cfg.rms_norm_eps)

    def project(self, x_BTD, positions_BT):
        cfg = self.cfg
        H, KVH, K = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        B, T, _ = x_BTD.shape
        q_BTHK = self.q_proj(x_BTD).reshape(B, T, H, K)
        k_BTHK = self.k_proj(x_BTD).reshape(B, T, KVH, K)
        if cfg.qk_norm:
            q_BTHK, k_BTHK = self.q_norm(q_BTHK), self.k_norm(k_BTHK)
        inv_freq = rope_inv_freq(cfg)
        q_BTHK = apply_rope(q_BTHK, positions_BT, inv_freq)
        k_BTHK = apply_rope(k_BTHK, positions_BT, inv_freq)
        return q_BTHK, k_BTHK, self.v_proj(x_BTD).reshape(B, T, KVH, K)

    def attend(self, q_BTHK, k_BSHK, v_BSHK, mask: Mask):
        B, T, H, K = q_BTHK.shape
        cfg = self.cfg
        block = cfg.attention_block
        out_BTHK = attention.attend(
            q_BTHK, k_BSHK, v_BSHK, mask, cfg.attention, cfg.sliding_window, block, block
        )
        return self.o_proj(out_BTHK.reshape(B, T, H * K))


class MLP(nn.Module):
    """SwiGLU in two halves: `expand` (gate and up projections) and `contract` (down)."""

    cfg: LlamaConfig

    def setup(self):
        cfg = self.cfg
        bias, inter = cfg.mlp_bias, cfg.intermediate_size
        self.gate_proj = dense(cfg, "gate_proj", inter, bias)
        self.up_proj = dense(cfg, "up_proj", inter, bias)
        self.down_proj = dense(cfg, "down_proj", cfg.hidden_size, bias)

    def expand(self, x_BTD):
        return self.gate_proj(x_BTD), self.up_proj(x_BTD)

    def contract(self, gate_BTF, up_BTF):
        return self.down_proj(nn.silu(gate_BTF) * up_BTF)


class DecoderLayer(nn.Module):
    """Two residual blocks, attention then MLP, each behind its own RMSNorm, written as six
    stages (see LAYER_BLOCKS): a norm, or the projections that read the same input."""

    cfg: LlamaConfig

    def setup(self):
        eps = self.cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(eps)
        self.self_attn = Attention(self.cfg)
        self.post_attention_layernorm = RMSNorm(eps)
        self.mlp = MLP(self.cfg)

    def attention_norm(self, h_BTD, positions_BT, mask):
        return h_BTD, self.input_layernorm(h_BTD)

    def attention_in(self, h_BTD, x_BTD, positions_BT, mask):
        return h_BTD, *self.self_attn.project(x_BTD, positions_BT)

    def attention_out(self, h_BTD, q_BTHK, k_BSHK, v_BSHK, positions_BT, mask):
        return (h_BTD + self.self_attn.attend(q_BTHK, k_BSHK, v_BSHK, mask),)

    def mlp_norm(self, h_BTD, positions_BT, mask):
        return h_BTD, self.post_attention_layernorm(h_BTD)

    def mlp_in(self, h_BTD, x_BTD, positions_BT, mask):
        return h_BTD, *self.mlp.expand(x_BTD)

    def mlp_out(self, h_BTD, gate_BTF, up_BTF, positions_BT, mask):
        return (h_BTD + self.mlp.contract(gate_BTF, up_BTF),)

    def attention_block(self, h_BTD, positions_BT, mask, cache=None, index=None):
        ctx = (positions_BT, mask)
        h_BTD, q, k, v = self.attention_in(*self.attention_norm(h_BTD, *ctx), *ctx)
        if cache is not None:
            k = jax.lax.dynamic_update_slice_in_dim(cache.k_BSHK, k, index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(cache.v_BSHK, v, index, axis=1)
            cache = KVCache(k, v)
        (h_BTD,) = self.attention_out(h_BTD, q, k, v, *ctx)
        return h_BTD, cache

    def mlp_block(self, h_BTD, positions_BT, mask):
        ctx = (positions_BT, mask)
        return self.mlp_out(*self.mlp_in(*self.mlp_norm(h_BTD, *ctx), *ctx), *ctx)[0]

    def __call__(self, h_BTD, positions_BT, mask, cache=None, index=None):
        h_BTD, cache = self.attention_block(h_BTD, positions_BT, mask, cache, index)
        return self.mlp_block(h_BTD, positions_BT, mask), cache


# The decoder layer as two blocks of stages. A stage is a method of DecoderLayer mapping the
# previous stage's outputs (and positions, mask) to its own; the weights it reads are the rows of
# lomo_jax.parameters.TABLE that name it. Composed they are the layer. The fused engine recomputes
# one block at a time in the backward (the MLP first, then attention) and takes one vjp per
# stage, updating each stage's weights before going on, so at most one stage's gradients and one
# block's activations exist.
LAYER_BLOCKS: tuple[tuple[str, ...], ...] = (
    ("attention_norm", "attention_in", "attention_out"),
    ("mlp_norm", "mlp_in", "mlp_out"),
)


def _rngs(dropout_key: jax.Array | None) -> dict:
    """A layer's rngs: its LoRA dropout key (one per layer and step; None: no dropout)."""
    return {} if dropout_key is None else {"lora_dropout": dropout_key}


def layer_stage(
    cfg: LlamaConfig,
    name: str,
    positions_BT: jax.Array | None,
    mask: Mask | None,
    dropout_key: jax.Array | None = None,
):
    """Stage `name` of LAYER_BLOCKS as a pure function (its weights, its inputs) -> its outputs.
    With the layer's `dropout_key`, its LoRA dropout masks are those of `decoder_layer`'s. The
    MLP's stages work token by token and read neither `positions_BT` nor `mask`."""
    method = getattr(DecoderLayer, name)
    return lambda p, xs: DecoderLayer(cfg).apply(
        {"params": p}, *xs, positions_BT, mask, method=method, rngs=_rngs(dropout_key)
    )


# The MLP runs in blocks of tokens only from this many blocks on: the fused backward sums the
# blocks' gradients in float32, three [in, out] float32 sums at once, which outweigh the
# intermediates two or three blocks would save (docs/measurements.md).
MIN_TOKEN_BLOCKS = 4


def mlp_tokens(cfg: LlamaConfig, batch: int, length: int, mask: Mask) -> TokenBlocks:
    """The blocks of tokens the MLP block runs in, in the forward and the fused backward alike:
    each block's float32 [batch, tokens, intermediate] within `cfg.token_block_bytes`, so a long
    sequence's [T, intermediate] gate and up projections never exist whole; one block when that
    takes fewer than MIN_TOKEN_BLOCKS. A split sequence is blocked within each device's own
    tokens."""
    shards = 1 if mask.split is None else mask.split.shards
    cap = cfg.token_block_bytes // (4 * batch * cfg.intermediate_size)
    tokens = TokenBlocks.of(length, cap, shards)
    return tokens if tokens.n >= MIN_TOKEN_BLOCKS else TokenBlocks.of(length, length, shards)


def mlp_block(
    cfg: LlamaConfig,
    p_layer: Params,
    h_BTD: jax.Array,
    mask: Mask,
    dropout_key: jax.Array | None = None,
) -> jax.Array:
    """One layer's MLP block (norm, SwiGLU, residual), in the blocks of tokens of `mlp_tokens`,
    block j's LoRA dropout drawn from `token_block_key(dropout_key, j)`."""
    tokens = mlp_tokens(cfg, *h_BTD.shape[:2], mask)

    def f(h, j):
        rngs = _rngs(token_block_key(dropout_key, j, tokens))
        return DecoderLayer(cfg).apply(
            {"params": p_layer}, h, None, None, method=DecoderLayer.mlp_block, rngs=rngs
        )

    return map_tokens(f, h_BTD, tokens)


def token_block_key(key: jax.Array | None, j: jax.Array, tokens: TokenBlocks):
    """Block j's LoRA dropout key (dropout bits are a function of an element's index in its
    block: each block its own key); the layer's key itself when the MLP runs whole."""
    return key if key is None or tokens.n == 1 else jax.random.fold_in(key, j)


# ---- the pure pieces ------------------------------------------------------------------------
def embed(cfg: LlamaConfig, p_embed: Params, ids_BT: jax.Array) -> jax.Array:
    return jnp.take(p_embed["embedding"], ids_BT, axis=0)


def decoder_layer(
    cfg: LlamaConfig,
    p_layer: Params,
    h_BTD: jax.Array,
    positions_BT: jax.Array,
    mask: Mask,
    dropout_key: jax.Array | None = None,
) -> jax.Array:
    """One decoder layer; `p_layer` is one slice of `params["layers"]` (no layer axis);
    `dropout_key` draws its LoRA dropout (None: none, as in evaluation)."""
    return _layer(cfg, p_layer, h_BTD, positions_BT, mask, dropout_key=dropout_key)[0]


def _layer(cfg, p_layer, h_BTD, positions_BT, mask, cache=None, index=None, dropout_key=None):
    """decoder_layer with an optional KV cache -> (output, the cache): attention, then the MLP
    in blocks of tokens."""
    h_BTD, cache = DecoderLayer(cfg).apply(
        {"params": p_layer},
        h_BTD,
        positions_BT,
        mask,
        cache,
        index,
        method=DecoderLayer.attention_block,
        rngs=_rngs(dropout_key),
    )
    return mlp_block(cfg, p_layer, h_BTD, mask, dropout_key), cache


def head_weight(cfg: LlamaConfig, params: Params) -> jax.Array:
    """The [D, V] output projection (the embedding table, transposed, when tied)."""
    if cfg.tie_word_embeddings:
        return params["embed"]["embedding"].T
    return params["lm_head"]["kernel"]


def head_columns(cfg: LlamaConfig, params: Params, start: jax.Array, size: int) -> jax.Array:
    """Columns start .. start + size of the output projection, [D, size]: one vocabulary piece
    (a slice of the table's rows when tied)."""
    if cfg.tie_word_embeddings:
        return jax.lax.dynamic_slice_in_dim(params["embed"]["embedding"], start, size, 0).T
    return jax.lax.dynamic_slice_in_dim(params["lm_head"]["kernel"], start, size, 1)


def final_norm(cfg: LlamaConfig, params: Params, h_BTD: jax.Array) -> jax.Array:
    return RMSNorm(cfg.rms_norm_eps).apply({"params": params["norm"]}, h_BTD)


def head(cfg: LlamaConfig, params: Params, h_BTD: jax.Array) -> jax.Array:
    """Final norm and output projection -> float32 logits [B, T, V]."""
    x_BTD = final_norm(cfg, params, h_BTD)
    return jnp.einsum("btd,dv->btv", x_BTD, head_weight(cfg, params)).astype(jnp.float32)


def default_positions(ids_BT: jax.Array) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(ids_BT.shape[1], dtype=jnp.int32), ids_BT.shape)


def decoder_layers(
    cfg: LlamaConfig,
    p_layers: Params,
    h_BTD: jax.Array,
    positions_BT: jax.Array,
    mask: Mask,
    cache: KVCache | None = None,
    index: jax.Array | None = None,
    *,
    remat: bool = False,
    keep_inputs: bool = False,
    store: Callable[[jax.Array], jax.Array] | None = None,
    dropout_key: jax.Array | None = None,
) -> tuple[jax.Array, Any]:
    """The stacked layers `p_layers` ([L, ...] leaves) over h_BTD, one `lax.scan` -> (the last
    layer's output, what each layer gives besides).

    With a `cache` (a KVCache of [L, ...] stacks, the new tokens at `index`) each layer reads and
    fills its slice and the second result is the new cache. `keep_inputs`: the second result is
    every layer's input [L, B, T, D] (the fused engine's saved activations), each as `store`
    gives it (`lomo_jax.offload.to_host`: in host memory). `remat`: a layer's activations are
    recomputed for `jax.grad` instead of kept (only the layer inputs are). `dropout_key`: LoRA
    dropout, layer i's drawn from `layer_dropout_key(dropout_key, i)`."""

    def layer(p, h, kv, i):
        key = None if dropout_key is None else layer_dropout_key(dropout_key, i)
        return _layer(cfg, p, h, positions_BT, mask, kv, index, key)

    if remat:
        layer = jax.checkpoint(layer)

    def body(h, layer_slices):
        p, kv, i = layer_slices
        out, kv = layer(p, h, kv, i)
        kept = h if store is None else store(h)
        return out, (kept if keep_inputs else kv)

    idx = None if dropout_key is None else jnp.arange(cfg.num_hidden_layers)
    return jax.lax.scan(body, h_BTD, (p_layers, cache, idx))


def layer_dropout_key(key: jax.Array, i: jax.Array) -> jax.Array:
    """Layer i's LoRA dropout key of a step's `key`: the forward and the fused backward's
    recomputation draw the same masks."""
    return jax.random.fold_in(key, i)


def hidden_states(
    cfg: LlamaConfig,
    params: Params,
    ids_BT: jax.Array,
    positions_BT: jax.Array | None = None,
    segment_ids_BT: jax.Array | None = None,
) -> jax.Array:
    """The last layer's output [B, T, D], before the final norm and the head."""
    positions_BT = default_positions(ids_BT) if positions_BT is None else positions_BT
    h_BTD = embed(cfg, params["embed"], ids_BT)
    return decoder_layers(cfg, params["layers"], h_BTD, positions_BT, Mask(segment_ids_BT))[0]


def forward(
    cfg: LlamaConfig,
    params: Params,
    ids_BT: jax.Array,
    positions_BT: jax.Array | None = None,
    segment_ids_BT: jax.Array | None = None,
) -> jax.Array:
    """Logits [B, T, V] in float32."""
    return head(cfg, params, hidden_states(cfg, params, ids_BT, positions_BT, segment_ids_BT))


# ---- parameters -----------------------------------------------------------------------------
def init_params(cfg: LlamaConfig, key: jax.Array, dtype=jnp.float32) -> Params:
    """Random parameters (normal, std 0.02, like transformers' `initializer_range`)."""
    k_emb, k_layers, k_head = jax.random.split(key, 3)
    init = nn.initializers.normal(0.02)
    B, T = 1, 1
    dummy = (jnp.zeros((B, T, cfg.hidden_size), dtype), jnp.zeros((B, T), jnp.int32), Mask())
    layer_init = lambda k: DecoderLayer(cfg).init(k, *dummy)["params"]  # noqa: E731
    layers = jax.vmap(layer_init)(jax.random.split(k_layers, cfg.num_hidden_layers))
    params = {
        "embed": {"embedding": init(k_emb, (cfg.vocab_size, cfg.hidden_size), jnp.float32)},
        "layers": layers,
        "norm": {"weight": jnp.ones((cfg.hidden_size,), jnp.float32)},
    }
    if not cfg.tie_word_embeddings:
        params["lm_head"] = {"kernel": init(k_head, (cfg.hidden_size, cfg.vocab_size), jnp.float32)}
    return cast(params, dtype)


def cast(params: Params, dtype) -> Params:
    """The weights as `dtype` (sharded ones keep their sharding); LoRA factors stay float32."""

    def one(path, x):
        return x if lora.is_factor(tuple(getattr(k, "key", k) for k in path)) else x.astype(dtype)

    return jax.tree_util.tree_map_with_path(one, params)


def param_shapes(cfg: LlamaConfig, dtype=jnp.float32) -> Params:
    """Shapes and dtypes only (`jax.ShapeDtypeStruct`): plans a 65B model without allocating it."""
    return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0), dtype))
