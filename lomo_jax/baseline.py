"""The unfused baselines: a full gradient tree from `jax.grad`, then an optimizer.

`make_optax_train_step` is what `--optimizer sgd|adamw` trains with (through
`lomo_jax.train_step`) and what the benchmarks compare against; `unfused_step` drives the LOMO /
AdaLomo rules from a full gradient tree, the reference the fused step must equal.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from lomo_jax.compiler import jit
from lomo_jax.config import LlamaConfig
from lomo_jax.loss import IGNORE, Batch, checkpointed_loss, next_token_targets, num_targets
from lomo_jax.optim import StepScalars, UpdateRule, apply_updates, clip_coefficient, global_norm_sq
from lomo_jax.rounding import step_key
from lomo_jax.schedule import Schedule
from lomo_jax.sharding import Layout
from lomo_jax.state import TrainState


def optax_transform(
    optimizer: str,
    schedule: Schedule,
    weight_decay: float = 0.0,
    clip_grad_norm: float | None = None,
    clip_grad_value: float | None = None,
) -> optax.GradientTransformation:
    """`sgd` or `adamw` with lomo-optim's clipping order: by value, then by global norm."""
    parts = []
    if clip_grad_value:
        parts.append(optax.clip(clip_grad_value))
    if clip_grad_norm:
        parts.append(optax.clip_by_global_norm(clip_grad_norm))
    if optimizer == "sgd":
        if weight_decay:
            parts.append(optax.add_decayed_weights(weight_decay))
        parts.append(optax.sgd(schedule))
    elif optimizer == "adamw":
        parts.append(optax.adamw(schedule, weight_decay=weight_decay))
    else:
        raise ValueError(f"unknown optax baseline {optimizer!r}; choose sgd or adamw")
    return optax.chain(*parts)


def accumulated_value_and_grad(cfg: LlamaConfig, params, batch: Batch, micro_batches: int):
    """Loss and gradient of the batch, computed `micro_batches` rows-slices at a time (the
    activations of one slice alive at once) and summed weighted by their loss tokens, so they
    equal the whole batch's (row r goes to slice r % micro_batches)."""
    loss_fn = functools.partial(checkpointed_loss, cfg)
    if micro_batches == 1:
        return jax.value_and_grad(loss_fn)(params, batch)
    split = jax.tree.map(lambda x: x.reshape(-1, micro_batches, *x.shape[1:]).swapaxes(0, 1), batch)
    total = num_targets(batch.labels)

    def add(acc, micro: Batch):
        weight = jnp.sum(next_token_targets(micro.labels) != IGNORE) / total
        loss, grads = jax.value_and_grad(loss_fn)(params, micro)
        return jax.tree.map(lambda a, x: a + weight * x, acc, (loss, grads)), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), (jnp.float32(0), params))
    (loss, grads), _ = jax.lax.scan(add, zeros, split)
    return loss, jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)


def make_optax_train_step(
    cfg: LlamaConfig,
    tx: optax.GradientTransformation,
    schedule: Schedule,
    micro_batches: int = 1,
    layout: Layout | None = None,
):
    """`jax.grad` + optax behind the fused step's interface, jitted whole, `(TrainState, batch)
    -> (state, metrics)`, the state donated, so the training loop and its checkpoints treat every
    optimizer alike. With `micro_batches` > 1 the gradient is accumulated over slices of the
    batch (the Hugging Face Trainer's gradient_accumulation_steps, the whole batch given at
    once). `layout`: the mesh the state lives on (its devices' compiler options)."""

    def step(state: TrainState, batch: Batch):
        loss, grads = accumulated_value_and_grad(cfg, state.params, batch, micro_batches)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "lr": schedule(state.step)}
        return TrainState(params, opt_state, state.step + 1, state.scale), metrics

    return jit(step, devices=layout and layout.mesh.devices.flat, donate_argnums=0)


def unfused_step(
    cfg: LlamaConfig,
    rule: UpdateRule,
    schedule: Schedule,
    state: TrainState,
    batch: Batch,
    rounding: str = "stochastic",
    seed: int = 0,
):
    """LOMO / AdaLomo driven by a full `jax.grad` tree: the reference the fused step must equal
    (the same rounding keys, so the same random bits)."""
    loss, grads = jax.value_and_grad(functools.partial(checkpointed_loss, cfg))(state.params, batch)
    key = step_key(rounding, seed, state.step)
    sc = StepScalars(schedule(state.step), state.step + 1, jnp.float32(1.0), jnp.float32(1.0), key)
    if rule.clip_grad_norm is not None:
        sc = sc._replace(clip_coef=clip_coefficient(rule, jnp.sqrt(global_norm_sq(grads, 1.0))))
    params, opt_state = apply_updates(rule, state.params, grads, state.opt_state, sc)
    return TrainState(params, opt_state, state.step + 1, state.scale), loss
