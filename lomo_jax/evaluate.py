"""Loss and perplexity of a model on training-format rows (response tokens only for alpaca)."""

from __future__ import annotations

import math

from lomo_jax.compiler import jit
from lomo_jax.config import LlamaConfig
from lomo_jax.data import Rows
from lomo_jax.loss import eval_nll
from lomo_jax.sharding import Layout

_nll_and_count = jit(eval_nll, static_argnums=0)


def evaluate_loss(
    cfg: LlamaConfig, params, rows: Rows, batch_size: int = 8, layout: Layout | None = None
) -> dict:
    """Token-weighted mean loss over all rows, its perplexity, and the number of scored tokens
    (with a `layout`: params sharded on its mesh, each batch split over it)."""
    total, tokens = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = rows.take(slice(start, start + batch_size)).batch()
        batch = layout.put_batch(batch, sequence=False) if layout else batch
        nll, count = _nll_and_count(cfg, params, batch)
        total, tokens = total + float(nll), tokens + int(count)
    loss = total / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": tokens}
