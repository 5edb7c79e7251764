"""The training objective: the batch the steps consume and the next-token cross-entropy.

Every step -- fused, `jax.grad` + optax, evaluation -- scores the same `Batch` with these
functions, so their losses agree by construction.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lomo_jax.config import LlamaConfig
from lomo_jax.model import causal_mask, decoder_layer, default_positions, embed, forward, head

IGNORE = -100


class Batch(NamedTuple):
    input_ids: jax.Array  # [B, T] int32
    labels: jax.Array  # [B, T] int32, IGNORE where no loss; position t is predicted from < t
    segment_ids: jax.Array | None = None  # [B, T] packed documents (0 = padding)
    positions: jax.Array | None = None  # [B, T] RoPE positions (restart per document)


def batch_inputs(batch: Batch) -> tuple[jax.Array, jax.Array]:
    """(RoPE positions, attention mask) of a batch."""
    B, T = batch.input_ids.shape
    positions = default_positions(batch.input_ids) if batch.positions is None else batch.positions
    return positions, causal_mask(batch.segment_ids, B, T)


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


def loss_fn(cfg: LlamaConfig, params, batch: Batch) -> jax.Array:
    """The loss of a plain forward pass (inference: nothing kept for a backward)."""
    return cross_entropy(
        forward(cfg, params, batch.input_ids, batch.positions, batch.segment_ids), batch.labels
    )


def checkpointed_loss(cfg: LlamaConfig, params, batch: Batch) -> jax.Array:
    """The same loss with the fused step's checkpointing policy: only layer inputs are saved
    for `jax.grad`."""
    positions, mask = batch_inputs(batch)
    layer = jax.checkpoint(lambda p, h: decoder_layer(cfg, p, h, positions, mask))
    h, _ = jax.lax.scan(
        lambda h, p: (layer(p, h), None),
        embed(cfg, params["embed"], batch.input_ids),
        params["layers"],
    )
    return cross_entropy(head(cfg, params, h), batch.labels)
