"""The one way to build a training step, for every optimizer: `make_train_step(options, cfg,
layout)` -> (init, step).

LOMO and AdaLomo are the fused step (`lomo_jax.engine`: each gradient consumed by the update in
the reverse layer scan); SGD and AdamW are `jax.grad` + optax (`lomo_jax.baseline`), behind the
same interface. A model with LoRA factors (`cfg.lora`) trains them with AdamW after the fused
step's scan: beside LOMO / AdaLomo (the LOMO paper's hybrid), or alone with the base frozen
(`none`: plain LoRA). `lomo-jax train` runs the step; `lomo-jax plan` and `lomo_jax.memory`
compile it on abstract inputs (`abstract_state`, `abstract_batch`), the same function with the
same shapes and shardings, so a plan measures the step that trains.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from lomo_jax.baseline import make_optax_train_step, optax_transform
from lomo_jax.config import LlamaConfig
from lomo_jax.engine import LoraTraining, init_train_state, make_fused_step
from lomo_jax.loss import Batch
from lomo_jax.loss_scale import DynamicLossScale, no_scaling
from lomo_jax.optim import AdaLomo, AdamW, Lomo, UpdateRule
from lomo_jax.rounding import ROUNDINGS
from lomo_jax.schedule import Schedule
from lomo_jax.sharding import Layout, abstract
from lomo_jax.state import TrainState

FUSED: dict[str, type] = {"lomo": Lomo, "adalomo": AdaLomo}  # the fused update rules
FROZEN = "none"  # the base frozen: only LoRA factors train
OPTIMIZERS = (*FUSED, FROZEN, "sgd", "adamw")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """What a training step computes besides the model: the optimizer and its settings.

    optimizer: `lomo`, `adalomo` (fused), `sgd` or `adamw` (`jax.grad` + optax).
    lr, schedule, warmup_steps, total_steps: the learning rate as `lomo_jax.schedule.Schedule`
        gives it for the step count.
    weight_decay, clip_grad_norm, clip_grad_value: as lomo-optim's (None: no clipping).
    loss_scaling: float16's dynamic loss scaling (an overflow skips the step).
    rounding, seed: how a fused update rounds 16-bit weights (`lomo_jax.rounding`).
    micro_batches: `sgd` / `adamw` only: the gradient summed over this many slices of the batch.
    offload_activations: fused only: the saved layer inputs wait in host memory
        (`lomo_jax.offload`).
    lora_lr, lora_schedule, lora_warmup_steps, lora_weight_decay: the LoRA factors' AdamW (the
        schedule and warmup default to the base's). With `none` the clipping options clip the
        factors' gradients; beside LOMO / AdaLomo they clip the base's only, as the authors'
        LoRA + LOMO does.
    """

    optimizer: str = "adalomo"
    lr: float = 1e-3
    schedule: str = "constant"
    warmup_steps: int = 0
    total_steps: int = 1
    weight_decay: float = 0.0
    clip_grad_norm: float | None = None
    clip_grad_value: float | None = None
    loss_scaling: bool = False
    rounding: str = "stochastic"
    seed: int = 0
    micro_batches: int = 1
    offload_activations: bool = False
    lora_lr: float = 5e-4
    lora_schedule: str | None = None
    lora_warmup_steps: int | None = None
    lora_weight_decay: float = 0.0

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose from {OPTIMIZERS}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"unknown rounding {self.rounding!r}; choose from {ROUNDINGS}")
        if self.micro_batches != 1 and self.fused:
            raise ValueError(f"{self.optimizer} keeps no gradient to accumulate over micro-batches")
        if self.offload_activations and not self.fused:
            raise ValueError(f"{self.optimizer}: only the fused step offloads its layer inputs")

    @property
    def fused(self) -> bool:
        """The fused engine's step: LOMO, AdaLomo or plain LoRA."""
        return self.optimizer in FUSED or self.optimizer == FROZEN

    def learning_rate(self) -> Schedule:
        return Schedule(self.lr, self.schedule, self.warmup_steps, self.total_steps)

    def lora_training(self) -> LoraTraining:
        """How the LoRA factors train: AdamW at their own learning rate and schedule."""
        clip = self.optimizer == FROZEN  # beside a fused optimizer the clipping is the base's
        rule = AdamW(
            weight_decay=self.lora_weight_decay,
            clip_grad_norm=self.clip_grad_norm if clip else None,
            clip_grad_value=self.clip_grad_value if clip else None,
        )
        schedule = Schedule(
            self.lora_lr,
            self.lora_schedule or self.schedule,
            self.warmup_steps if self.lora_warmup_steps is None else self.lora_warmup_steps,
            self.total_steps,
        )
        return LoraTraining(rule, schedule)

    def rule(self) -> UpdateRule | None:
        """The fused optimizer's per-tensor update rule (None: the base is frozen)."""
        if self.optimizer == FROZEN:
            return None
        return FUSED[self.optimizer](
            weight_decay=self.weight_decay,
            clip_grad_norm=self.clip_grad_norm,
            clip_grad_value=self.clip_grad_value,
        )


class TrainStep(NamedTuple):
    init: Callable[[Any], TrainState]  # weights -> the step-0 state around them
    step: Callable  # jitted (state, batch) -> (state, metrics), the state donated


def make_train_step(
    options: StepOptions, cfg: LlamaConfig, layout: Layout | None = None
) -> TrainStep:
    """The step of `options.optimizer` for a model of config `cfg`, with everything on
    `layout`'s mesh (None: this process's default device). Its metrics: `loss`, `lr`, and for
    the fused step `loss_scale`, `grad_norm` (with norm clipping or loss scaling) and `overflow`
    (with loss scaling)."""
    schedule = options.learning_rate()
    _check_lora(options, cfg)
    if options.fused:
        rule = options.rule()
        scaler = DynamicLossScale() if options.loss_scaling else None
        lora = options.lora_training() if cfg.lora is not None else None
        init = functools.partial(
            init_train_state,
            rule,
            float16=scaler is not None,
            loss_scale=scaler,
            layout=layout,
            factor_rule=lora and lora.rule,
        )
        step = make_fused_step(
            cfg,
            rule,
            schedule,
            scaler,
            layout,
            options.rounding,
            options.seed,
            lora_training=lora,
            offload_activations=options.offload_activations,
        )
        return TrainStep(init, step)
    tx = optax_transform(
        options.optimizer,
        schedule,
        options.weight_decay,
        options.clip_grad_norm,
        options.clip_grad_value,
    )

    def init(params):
        return TrainState(params, jax.jit(tx.init)(params), jnp.int32(0), no_scaling())

    return TrainStep(init, make_optax_train_step(cfg, tx, schedule, options.micro_batches, layout))


def _check_lora(options: StepOptions, cfg: LlamaConfig) -> None:
    if options.optimizer == FROZEN and cfg.lora is None:
        raise ValueError("optimizer none trains LoRA factors only: give the model a LoRA rank")
    if cfg.lora is None:
        return
    if not options.fused:
        raise ValueError(
            f"LoRA factors train beside lomo or adalomo, or alone (none), not {options.optimizer}"
        )
    if options.loss_scaling:
        raise ValueError("LoRA is not supported with float16 (loss scaling): use bfloat16")


def abstract_state(init: Callable[[Any], TrainState], params: Any) -> TrainState:
    """What `init(params)` would build (shapes, dtypes, shardings), from abstract weights: what
    a step compiles for before any weight is read, and what a checkpoint is restored into."""
    shardings = jax.jit(init).lower(params).compile().output_shardings
    return abstract(jax.eval_shape(init, params), shardings)


def abstract_batch(layout: Layout, batch_size: int, seq_len: int) -> Batch:
    """A batch of training rows as `lomo_jax.data` gives them (ids, labels, segment ids and
    positions, int32 [batch_size, seq_len]), split over `layout`'s mesh as a step receives it."""
    shape = (batch_size, seq_len)
    one = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=layout.batch(shape))
    return Batch(one, one, one, one)
