"""Dynamic loss scaling for float16: halve on overflow (the step is skipped), double again after
`window` clean steps. The reference never grows the scale back; this one does."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp


class ScaleState(NamedTuple):
    scale: jax.Array  # float32
    clean_steps: jax.Array  # int32, steps since the last overflow or growth


@dataclasses.dataclass(frozen=True)
class DynamicLossScale:
    init_scale: float = 2.0**16
    factor: float = 2.0
    window: int = 1000
    min_scale: float = 1.0

    def init(self) -> ScaleState:
        return ScaleState(jnp.float32(self.init_scale), jnp.int32(0))

    def update(self, s: ScaleState, overflow: jax.Array) -> ScaleState:
        shrunk = ScaleState(jnp.maximum(s.scale / self.factor, self.min_scale), jnp.int32(0))
        clean = s.clean_steps + 1
        grown = ScaleState(
            jnp.where(clean >= self.window, s.scale * self.factor, s.scale),
            jnp.where(clean >= self.window, 0, clean).astype(jnp.int32),
        )
        return jax.tree.map(lambda a, b: jnp.where(overflow, a, b), shrunk, grown)


def no_scaling() -> ScaleState:
    return ScaleState(jnp.float32(1.0), jnp.int32(0))
