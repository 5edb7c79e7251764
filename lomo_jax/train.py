"""The training loop behind `lomo-jax train`: one config dataclass, one function."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lomo_jax.engine import Batch, init_train_state, make_fused_step, make_optax_step
from lomo_jax.loss_scale import DynamicLossScale
from lomo_jax.optim import AdaLomo, Lomo
from lomo_jax.schedule import Schedule

log = logging.getLogger("lomo_jax")

OPTIMIZERS = ("lomo", "adalomo", "sgd", "adamw")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class DataError(ValueError):
    pass


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


def read_pretokenized(path: str | Path, seq_len: int) -> np.ndarray:
    """Rows of exactly `seq_len` token ids from JSON lines {"input_ids": [...]}."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: file not found")
    rows = []
    with open(p) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                ids = json.loads(line)["input_ids"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(f"{p}:{n}: expected a JSON object with 'input_ids'") from None
            if len(ids) != seq_len:
                raise DataError(f"{p}:{n}: row has {len(ids)} tokens, --seq-len is {seq_len}")
            rows.append(ids)
    if not rows:
        raise DataError(f"{p}: no rows")
    return np.asarray(rows, np.int32)


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

    rows = read_pretokenized(c.data, c.seq_len)
    model = from_pretrained(c.model, c.tokenizer, dtype=DTYPES[c.dtype])
    cfg = model.config
    if rows.max() >= cfg.vocab_size:
        raise DataError(
            f"{c.data}: token id {rows.max()} >= the model's vocab_size {cfg.vocab_size}"
        )
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
        ids = jnp.asarray(rows[batch_indices(len(rows), c.batch_size, step, c.shuffle, c.seed)])
        t0 = time.perf_counter()
        if c.optimizer in ("lomo", "adalomo"):
            state, m = step_fn(state, Batch(ids, ids))
        else:
            params, opt_state, loss = optax_step(params, opt_state, Batch(ids, ids))
            m = {"loss": loss, "lr": schedule(step)}
        m = {k: float(v) for k, v in m.items()}  # waits for the step
        dt = time.perf_counter() - t0
        m.update(step=step + 1, tokens_per_s=ids.size / dt, peak_memory_bytes=peak_memory_bytes())
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
