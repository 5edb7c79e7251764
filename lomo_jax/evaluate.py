"""Loss and perplexity of a model on training-format rows (response tokens only for alpaca)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from lomo_jax.config import LlamaConfig
from lomo_jax.data import Rows
from lomo_jax.loss import IGNORE, Batch, cross_entropy
from lomo_jax.model import forward
from lomo_jax.sharding import Layout


@functools.partial(jax.jit, static_argnums=0)
def _nll_and_count(cfg: LlamaConfig, params, batch: Batch):
    logits = forward(cfg, params, batch.input_ids, batch.positions, batch.segment_ids)
    count = jnp.sum(batch.labels[:, 1:] != IGNORE)
    return cross_entropy(logits, batch.labels) * jnp.maximum(count, 1), count


def evaluate_loss(
    cfg: LlamaConfig, params, rows: Rows, batch_size: int = 8, layout: Layout | None = None
) -> dict:
    """Token-weighted mean loss over all rows, its perplexity, and the number of scored tokens
    (with a `layout`: params sharded on its mesh, each batch split over it)."""
    total, tokens = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = rows.take(slice(start, start + batch_size)).batch()
        batch = layout.put_batch(batch) if layout else batch
        nll, count = _nll_and_count(cfg, params, batch)
        total, tokens = total + float(nll), tokens + int(count)
    loss = total / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": tokens}
