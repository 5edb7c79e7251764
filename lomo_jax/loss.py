"""The training objective: the batch the steps consume and the next-token cross-entropy.

Every training step (fused, `jax.grad` + optax) and evaluation score the same `Batch` with these
functions, so their losses agree by construction.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lomo_jax import blocks
from lomo_jax.attention import Mask
from lomo_jax.config import LlamaConfig
from lomo_jax.model import (
    decoder_layers,
    default_positions,
    embed,
    final_norm,
    forward,
    head,
    head_columns,
    hidden_states,
)

IGNORE = -100


class Batch(NamedTuple):
    input_ids: jax.Array  # [B, T] int32
    labels: jax.Array  # [B, T] int32, IGNORE where no loss; position t is predicted from < t
    segment_ids: jax.Array | None = None  # [B, T] packed documents (0 = padding)
    positions: jax.Array | None = None  # [B, T] RoPE positions (restart per document)


def batch_inputs(batch: Batch) -> tuple[jax.Array, Mask]:
    """(RoPE positions, attention mask) of a batch."""
    positions = default_positions(batch.input_ids) if batch.positions is None else batch.positions
    return positions, Mask(batch.segment_ids)


def next_token_targets(labels_BT: jax.Array) -> jax.Array:
    """Position t is scored on labels[t + 1]; the last position has no target."""
    pad = jnp.full((labels_BT.shape[0], 1), IGNORE, labels_BT.dtype)
    return jnp.concatenate([labels_BT[:, 1:], pad], axis=1)


def nll_sum(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """Summed negative log-likelihood of the targets != IGNORE."""
    valid = targets_BT != IGNORE
    logits = logits_BTV.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, jnp.where(valid, targets_BT, 0)[..., None], -1)[..., 0]
    return jnp.sum((logz - picked) * valid)


def num_targets(labels_BT: jax.Array) -> jax.Array:
    """How many positions carry a loss (at least 1, so an empty batch divides safely)."""
    return jnp.maximum(1, jnp.sum(next_token_targets(labels_BT) != IGNORE))


def cross_entropy(logits_BTV: jax.Array, labels_BT: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy over labels != -100, like transformers' `labels=input_ids`."""
    return nll_sum(logits_BTV, next_token_targets(labels_BT)) / num_targets(labels_BT)


def vocab_pieces(cfg: LlamaConfig, tokens: int) -> tuple[int, int]:
    """(n, size): the head computes its logits one vocabulary piece at a time, each piece's
    float32 logits within `cfg.block_bytes`, so the [B, T, V] logits (LLaMA-3 at 8 x 1024:
    4 GiB) never exist and the output projection is read piece by piece (XLA:CPU upcasts what a
    bfloat16 matmul reads)."""
    return blocks.even_blocks(cfg.vocab_size, cfg.block_bytes // (4 * tokens))


def _piece_logits(cfg: LlamaConfig, params, x_BTD: jax.Array, j: jax.Array, size: int):
    """Piece j's logits [B, T, size] (float32, rounded to the weights' dtype first, as a 16-bit
    framework's head produces them), its columns' token ids, which of them are its own, and its
    [D, size] weights."""
    start = blocks.start(j, size, cfg.vocab_size)
    w_DV = head_columns(cfg, params, start, size)
    logits_BTV = jnp.einsum("btd,dv->btv", x_BTD, w_DV).astype(jnp.float32)
    return logits_BTV, start + jnp.arange(size), blocks.own(j, size, cfg.vocab_size), w_DV


def _logsumexp_and_picked(cfg: LlamaConfig, params, x_BTD: jax.Array, targets_BT: jax.Array):
    """logsumexp of each position's logits and the target's logit, piece by piece (an online
    logsumexp: running maximum and rescaled sum)."""
    B, T, _ = x_BTD.shape
    n, size = vocab_pieces(cfg, B * T)

    def body(carry, j):
        m_BT, s_BT, picked_BT = carry
        logits_BTV, cols_V, own_V, _ = _piece_logits(cfg, params, x_BTD, j, size)
        logits_BTV = jnp.where(own_V, logits_BTV, -jnp.inf)
        new_m_BT = jnp.maximum(m_BT, logits_BTV.max(-1))
        s_BT = s_BT * jnp.exp(m_BT - new_m_BT) + jnp.exp(logits_BTV - new_m_BT[..., None]).sum(-1)
        hit_BTV = (cols_V == targets_BT[..., None]) & own_V
        picked_BT = picked_BT + jnp.sum(jnp.where(hit_BTV, logits_BTV, 0.0), -1)
        return (new_m_BT, s_BT, picked_BT), None

    zeros = jnp.zeros((B, T), jnp.float32)
    init = (jnp.full((B, T), -jnp.inf), zeros, zeros)
    (m_BT, s_BT, picked_BT), _ = jax.lax.scan(body, init, jnp.arange(n))
    return m_BT + jnp.log(s_BT), picked_BT


def head_nll(cfg: LlamaConfig, params, h_BTD: jax.Array, labels_BT: jax.Array) -> jax.Array:
    """Summed next-token negative log-likelihood of the last layer's output `h_BTD`, the logits
    computed one vocabulary piece at a time."""
    targets_BT = next_token_targets(labels_BT)
    lse_BT, picked_BT = _logsumexp_and_picked(
        cfg, params, final_norm(cfg, params, h_BTD), targets_BT
    )
    return jnp.sum((lse_BT - picked_BT) * (targets_BT != IGNORE))


def head_loss_and_grads(
    cfg: LlamaConfig,
    hp: dict,
    h_BTD: jax.Array,
    targets_BT: jax.Array,
    cotangent: jax.Array,
    weight_grads: bool = True,
):
    """Mean loss, the gradients of `cotangent` x loss for the head's weights `hp` (final norm and
    output projection, in their own dtype, as a framework's `.grad`; none without
    `weight_grads`, for a frozen head) and for `h_BTD`. `targets_BT`: each position's target
    (`next_token_targets` of the labels; the positions may be in any order, as a split
    sequence's are).

    A first pass over the vocabulary pieces finds each position's logsumexp, a second recomputes
    each piece's logits, writes its columns' gradient (complete: one matmul over every position)
    and adds its share of dx; one piece's logits exist at a time."""
    B, T, _ = h_BTD.shape
    n, size = vocab_pieces(cfg, B * T)
    count = jnp.maximum(1, jnp.sum(targets_BT != IGNORE))
    x_BTD, norm_vjp = jax.vjp(lambda p, h: final_norm(cfg, {"norm": p}, h), hp["norm"], h_BTD)
    lse_BT, picked_BT = _logsumexp_and_picked(cfg, hp, x_BTD, targets_BT)
    valid_BT = targets_BT != IGNORE
    scale_BT = valid_BT * (cotangent / count)
    tied = cfg.tie_word_embeddings
    w = hp["embed"]["embedding"] if tied else hp["lm_head"]["kernel"]

    def body(carry, j):
        g_w, dx_BTD = carry
        logits_BTV, cols_V, own_V, w_DV = _piece_logits(cfg, hp, x_BTD, j, size)
        probs_BTV = jnp.exp(logits_BTV - lse_BT[..., None])
        onehot_BTV = cols_V == targets_BT[..., None]
        # Cast as the matmul's backward sees it in a 16-bit model (a no-op in float32).
        dlogits_BTV = ((probs_BTV - onehot_BTV) * scale_BT[..., None]).astype(x_BTD.dtype)
        # In the weight's dtype: the matmul accumulates in float32 either way, and XLA:CPU has no
        # 16-bit matmul with a float32 result in every layout (the tied one's).
        if not weight_grads:
            pass
        elif tied:
            g_VD = jnp.einsum("btd,btv->vd", x_BTD, dlogits_BTV, preferred_element_type=w.dtype)
            g_w = blocks.put(g_w, g_VD, j, 0)
        else:
            g_DV = jnp.einsum("btd,btv->dv", x_BTD, dlogits_BTV, preferred_element_type=w.dtype)
            g_w = blocks.put(g_w, g_DV, j, 1)
        own_dlogits_BTV = jnp.where(own_V, dlogits_BTV, jnp.zeros((), dlogits_BTV.dtype))
        dx_BTD = dx_BTD + jnp.einsum(
            "btv,dv->btd", own_dlogits_BTV, w_DV, preferred_element_type=jnp.float32
        )
        return (g_w, dx_BTD), None

    g_w = jnp.zeros(w.shape if weight_grads else (), w.dtype)
    (g_w, dx_BTD), _ = jax.lax.scan(body, (g_w, jnp.zeros(x_BTD.shape, jnp.float32)), jnp.arange(n))
    g_norm, dh_BTD = norm_vjp(dx_BTD.astype(x_BTD.dtype))
    grads = {
        "norm": g_norm,
        **({"embed": {"embedding": g_w}} if tied else {"lm_head": {"kernel": g_w}}),
    }
    if not weight_grads:
        grads = {}
    loss = jnp.sum((lse_BT - picked_BT) * valid_BT) / count
    return loss, grads, dh_BTD


def eval_nll(cfg: LlamaConfig, params, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """(summed loss, number of scored tokens) of a forward pass that keeps nothing for a backward
    and never holds the whole logits: what evaluation and the inference memory plan run."""
    h_BTD = hidden_states(cfg, params, batch.input_ids, batch.positions, batch.segment_ids)
    return head_nll(cfg, params, h_BTD, batch.labels), jnp.sum(
        next_token_targets(batch.labels) != IGNORE
    )


def loss_fn(cfg: LlamaConfig, params, batch: Batch) -> jax.Array:
    """The loss of a plain forward pass (inference: nothing kept for a backward)."""
    return cross_entropy(
        forward(cfg, params, batch.input_ids, batch.positions, batch.segment_ids), batch.labels
    )


def checkpointed_loss(cfg: LlamaConfig, params, batch: Batch) -> jax.Array:
    """The same loss with the fused step's checkpointing policy: only layer inputs are saved
    for `jax.grad`."""
    positions, mask = batch_inputs(batch)
    h = embed(cfg, params["embed"], batch.input_ids)
    h, _ = decoder_layers(cfg, params["layers"], h, positions, mask, remat=True)
    return cross_entropy(head(cfg, params, h), batch.labels)
