"""What a training step carries from one step to the next, for every optimizer (fused or
optax), and the finiteness check a run makes before it trusts or saves it."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from lomo_jax.errors import UserError
from lomo_jax.loss_scale import ScaleState


class TrainState(NamedTuple):
    """A step's whole state: what a checkpoint saves and a resumed run restores."""

    params: Any  # the weights
    opt_state: Any  # the optimizer's state (AdaLomo's factors, optax's moments; LOMO: empty)
    step: jax.Array  # int32: optimizer steps taken (skipped float16 overflows included)
    scale: ScaleState  # float16's dynamic loss scale (1 and unused otherwise)


class NonFiniteError(UserError, FloatingPointError):
    """A loss or weights that are inf or NaN: the run stops (a lower learning rate may help)."""


def all_finite(tree) -> jax.Array:
    """Whether every element of every leaf is finite (one scalar). The largest magnitude is
    finite exactly when every element is (the max propagates NaN), and a reduction of `abs` fuses
    on XLA:CPU where `all(isfinite(x))` materializes a bool array as large as the leaf."""
    return jnp.all(jnp.stack([jnp.isfinite(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(tree)]))
