"""Compile-time memory planning: lower a step on abstract shapes (`jax.ShapeDtypeStruct`) and
read XLA's memory analysis, so a 65B model can be planned on a laptop without allocating it.

peak = arguments + outputs + temporaries - aliased (donated buffers reused as outputs).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from lomo_jax.baseline import make_optax_step
from lomo_jax.compiler import jit
from lomo_jax.config import LlamaConfig
from lomo_jax.engine import init_train_state, make_fused_step
from lomo_jax.loss import Batch, eval_nll
from lomo_jax.loss_scale import DynamicLossScale
from lomo_jax.model import param_shapes
from lomo_jax.optim import AdaLomo, Lomo
from lomo_jax.schedule import Schedule
from lomo_jax.sharding import Layout

METHODS = ("inference", "fused-lomo", "fused-adalomo", "sgd", "adamw")
SHARDED_METHODS = ("inference", "fused-lomo", "fused-adalomo")


def _bytes(tree: Any) -> int:
    """Bytes one device holds of `tree` (all of it, unsharded)."""

    def one(x):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) else x.shape
        return math.prod(shape) * x.dtype.itemsize

    return sum(one(x) for x in jax.tree.leaves(tree))


def _abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def lower(
    cfg: LlamaConfig,
    method: str,
    batch_size: int,
    seq_len: int,
    dtype=jnp.float32,
    layout: Layout | None = None,
    rounding: str = "stochastic",
):
    """The jitted step for `method`, lowered on abstract inputs (nothing is allocated); with a
    `layout`, sharded over its mesh (SHARDED_METHODS only); fused steps round 16-bit weights
    as `rounding` says."""
    params = param_shapes(cfg, dtype)
    ids = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32)
    if layout is not None:
        if method not in SHARDED_METHODS:
            raise ValueError(f"{method}: sharded plans exist for {SHARDED_METHODS}")
        params = _abstract(params, layout.params(params))
        ids = _abstract(ids, layout.batch(ids.shape))
    batch = Batch(ids, ids)
    if method == "inference":
        devices = layout and layout.mesh.devices.flat
        return jit(functools.partial(eval_nll, cfg), devices=devices).lower(params, batch), params
    if method.startswith("fused-"):
        rule = Lomo() if method == "fused-lomo" else AdaLomo()
        float16 = jnp.dtype(dtype) == jnp.float16
        state = jax.eval_shape(lambda p: init_train_state(rule, p, float16), params)
        if layout is not None:
            state = state._replace(
                opt_state=_abstract(state.opt_state, layout.opt_state(rule, params))
            )
        scaler = DynamicLossScale() if float16 else None
        step = make_fused_step(cfg, rule, Schedule(1e-3), scaler, layout, rounding)
        return step.lower(state, batch), params
    tx = {"sgd": optax.sgd(1e-3), "adamw": optax.adamw(1e-3)}[method]
    opt_state = jax.eval_shape(tx.init, params)
    return make_optax_step(cfg, tx).lower(params, opt_state, batch), params


def analyze(
    cfg: LlamaConfig,
    method: str,
    batch_size: int,
    seq_len: int,
    dtype=jnp.float32,
    layout: Layout | None = None,
    rounding: str = "stochastic",
) -> dict:
    """Per-device figures: with a layout, param_bytes is one device's share."""
    lowered, params = lower(cfg, method, batch_size, seq_len, dtype, layout, rounding)
    m = lowered.compile().memory_analysis()
    peak = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )
    param_bytes = _bytes(params)
    return {
        "method": method,
        "param_bytes": param_bytes,
        "peak_bytes": peak,
        "peak_over_params": round(peak / param_bytes, 4),
        "argument_bytes": m.argument_size_in_bytes,
        "output_bytes": m.output_size_in_bytes,
        "temp_bytes": m.temp_size_in_bytes,
        "alias_bytes": m.alias_size_in_bytes,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "dtype": jnp.dtype(dtype).name,
        "rounding": rounding,
        "devices": layout.mesh.size if layout else 1,
    }
