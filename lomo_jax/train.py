"""The training loop behind `lomo-jax train`: one config dataclass, one function."""

from __future__ import annotations

import dataclasses
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lomo_jax.data import build_rows, check_vocab
from lomo_jax.engine import Batch, init_train_state, make_fused_step, make_optax_step
from lomo_jax.loss_scale import DynamicLossScale
from lomo_jax.optim import AdaLomo, Lomo
from lomo_jax.schedule import Schedule

log = logging.getLogger("lomo_jax")

OPTIMIZERS = ("lomo", "adalomo", "sgd", "adamw")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class ConfigError(ValueError):
    pass


@dataclasses.dataclass
class TrainConfig:
    model: str
    data: str
    out: str
    optimizer: str = "adalomo"
    lr: float = 1e-3
    steps: int = 100
    batch_size: int = 8
    seq_len: int = 512
    weight_decay: float = 0.0
    clip_grad_norm: float | None = None
    clip_grad_value: float | None = None
    schedule: str = "constant"
    warmup_steps: int = 0
    shuffle: bool = True
    seed: int = 0
    dtype: str = "float32"
    gradient_accumulation_steps: int = 1
    format: str = "pretokenized"
    task: str | None = None
    tokenizer: str | None = None
    overwrite: bool = False

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; choose from {OPTIMIZERS}")
        if self.gradient_accumulation_steps != 1 and self.optimizer in ("lomo", "adalomo"):
            raise ConfigError(
                "gradient accumulation is impossible with fused LOMO/AdaLomo: each "
                "gradient is consumed by the update the moment it exists; raise "
                "--batch-size instead"
            )


def batch_indices(n_rows: int, batch_size: int, step: int, shuffle: bool, seed: int) -> np.ndarray:
    """Rows of step `step`: in file order without shuffling, else a fresh permutation per epoch."""
    per_epoch = max(1, n_rows // batch_size)
    epoch, k = divmod(step, per_epoch)
    order = (
        np.random.default_rng([seed, epoch]).permutation(n_rows) if shuffle else np.arange(n_rows)
    )
    return order[k * batch_size : (k + 1) * batch_size]


def peak_memory_bytes() -> int:
    """Peak device memory where the backend reports it, else this process's peak RSS."""
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"])
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _optax_tx(c: TrainConfig, schedule: Schedule) -> optax.GradientTransformation:
    parts = []
    if c.clip_grad_value:
        parts.append(optax.clip(c.clip_grad_value))
    if c.clip_grad_norm:
        parts.append(optax.clip_by_global_norm(c.clip_grad_norm))
    if c.optimizer == "sgd":
        if c.weight_decay:
            parts.append(optax.add_decayed_weights(c.weight_decay))
        parts.append(optax.sgd(schedule))
    else:
        parts.append(optax.adamw(schedule, weight_decay=c.weight_decay))
    return optax.chain(*parts)


def train(c: TrainConfig) -> list[dict]:
    from lomo_jax.pretrained import from_pretrained

    model = from_pretrained(c.model, c.tokenizer, dtype=DTYPES[c.dtype])
    cfg = model.config
    rows = build_rows(c.format, c.data, model.tokenizer, c.seq_len, c.task)
    check_vocab(rows, cfg.vocab_size, c.data)
    schedule = Schedule(c.lr, c.schedule, c.warmup_steps, c.steps)
    float16 = c.dtype == "float16"
    if c.optimizer in ("lomo", "adalomo"):
        cls = Lomo if c.optimizer == "lomo" else AdaLomo
        rule = cls(
            weight_decay=c.weight_decay,
            clip_grad_norm=c.clip_grad_norm,
            clip_grad_value=c.clip_grad_value,
        )
        scaler = DynamicLossScale() if float16 else None
        step_fn = make_fused_step(cfg, rule, schedule, scaler)
        state = init_train_state(rule, model.params, float16, scaler)
    else:
        tx = _optax_tx(c, schedule)
        optax_step = make_optax_step(cfg, tx)
        params, opt_state = model.params, tx.init(model.params)

    history = []
    for step in range(c.steps):
        b = rows.take(batch_indices(len(rows), c.batch_size, step, c.shuffle, c.seed))
        batch = Batch(
            *(jnp.asarray(a) for a in (b.input_ids, b.labels, b.segment_ids, b.positions))
        )
        t0 = time.perf_counter()
        if c.optimizer in ("lomo", "adalomo"):
            state, m = step_fn(state, batch)
        else:
            params, opt_state, loss = optax_step(params, opt_state, batch)
            m = {"loss": loss, "lr": schedule(step)}
        m = {k: float(v) for k, v in m.items()}  # waits for the step
        dt = time.perf_counter() - t0
        m.update(
            step=step + 1, tokens_per_s=b.input_ids.size / dt, peak_memory_bytes=peak_memory_bytes()
        )
        history.append(m)
        log.info(
            "step %d/%d  loss %.4f  lr %.3g  %.0f tok/s  peak mem %.2f GB",
            step + 1,
            c.steps,
            m["loss"],
            m["lr"],
            m["tokens_per_s"],
            m["peak_memory_bytes"] / 1e9,
        )
        if not np.isfinite(m["loss"]) and not float16:
            raise FloatingPointError(f"loss is {m['loss']} at step {step + 1}; stopping")
    final = state.params if c.optimizer in ("lomo", "adalomo") else params
    model.params = final
    model.save_pretrained(c.out, overwrite=c.overwrite)
    log.info("saved %s", c.out)
    return history
