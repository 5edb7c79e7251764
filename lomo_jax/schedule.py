"""Learning-rate schedules as the Hugging Face Trainer defines them: `lr(step)` where step counts
the optimizer steps already taken, so a warmup starts at 0."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax.numpy as jnp

SCHEDULES = ("constant", "linear", "cosine")


@dataclasses.dataclass(frozen=True)
class Schedule:
    lr: float
    kind: str = "constant"
    warmup_steps: int = 0
    total_steps: int = 1

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.kind!r}; choose from {', '.join(SCHEDULES)}")

    def __call__(self, step) -> jnp.ndarray:
        step = jnp.asarray(step, jnp.float32)
        warm = max(1, self.warmup_steps)
        warmup = step / warm
        decay_len = max(1, self.total_steps - self.warmup_steps)
        progress = jnp.clip((step - self.warmup_steps) / decay_len, 0.0, 1.0)
        after: Callable = {
            "constant": lambda: jnp.float32(1.0),
            "linear": lambda: 1.0 - progress,
            "cosine": lambda: 0.5 * (1.0 + jnp.cos(jnp.pi * progress)),
        }[self.kind]
        factor = jnp.where(step < self.warmup_steps, warmup, after())
        return (self.lr * factor).astype(jnp.float32)
