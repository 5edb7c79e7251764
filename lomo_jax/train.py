"""The training loop behind `lomo-jax train`: a config dataclass and one function.

The run directory's layout is `lomo_jax.rundir`'s; what the run shows while it goes (progress,
plot, Ctrl-C) is `lomo_jax.progress`'s.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from lomo_jax import checkpoint
from lomo_jax.baseline import make_optax_train_step, optax_transform
from lomo_jax.data import Rows, build_rows, check_tokenizer, check_vocab
from lomo_jax.distributed import is_primary
from lomo_jax.engine import TrainState, init_train_state, make_fused_step
from lomo_jax.evaluate import evaluate_loss
from lomo_jax.loss_scale import DynamicLossScale, no_scaling
from lomo_jax.optim import AdaLomo, Lomo
from lomo_jax.progress import ProgressBar, deferred_interrupt, peak_memory_bytes, plot_losses
from lomo_jax.rundir import RunDir, load_state
from lomo_jax.schedule import Schedule
from lomo_jax.sharding import Layout, MeshError, make_mesh

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
    format: str = "pretokenized"
    task: str | None = None
    template: str | None = None
    tokenizer: str | None = None
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
    eval_data: str | None = None
    eval_fraction: float = 0.0
    eval_every: int = 0
    save_every: int = 0
    keep_checkpoints: int = 2
    mesh: str | None = None  # e.g. "fsdp=8", "data=2,fsdp=4"; default: every device on fsdp

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; choose from {OPTIMIZERS}")
        if self.gradient_accumulation_steps != 1 and self.optimizer in ("lomo", "adalomo"):
            raise ConfigError(
                "gradient accumulation is impossible with fused LOMO/AdaLomo: each "
                "gradient is consumed by the update the moment it exists; raise "
                "--batch-size instead"
            )

    @classmethod
    def from_sources(cls, yaml_file: str | Path | None, overrides: dict[str, Any]) -> TrainConfig:
        """Dataclass defaults < YAML file < command-line flags that were given."""
        values: dict[str, Any] = {}
        if yaml_file:
            p = Path(yaml_file)
            if not p.is_file():
                raise ConfigError(f"{p}: file not found")
            try:
                loaded = yaml.safe_load(p.read_text()) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{p}: invalid YAML: {str(e).splitlines()[0]}") from None
            if not isinstance(loaded, dict):
                raise ConfigError(f"{p}: expected a mapping of option: value")
            unknown = sorted(set(loaded) - {f.name for f in dataclasses.fields(cls)})
            if unknown:
                raise ConfigError(f"{p}: unknown option {unknown[0]!r}")
            values.update(loaded)
        values.update(overrides)
        missing = [k for k in ("model", "data", "out") if values.get(k) is None]
        if missing:
            raise ConfigError(f"missing required option --{missing[0]} (flag or config file)")
        return cls(**values)


def batch_indices(n_rows: int, batch_size: int, step: int, shuffle: bool, seed: int) -> np.ndarray:
    """Rows of step `step`: in file order without shuffling, else a fresh permutation per epoch."""
    per_epoch = max(1, n_rows // batch_size)
    epoch, k = divmod(step, per_epoch)
    order = (
        np.random.default_rng([seed, epoch]).permutation(n_rows) if shuffle else np.arange(n_rows)
    )
    return order[k * batch_size : (k + 1) * batch_size]


def _make_step(c: TrainConfig, cfg, params, layout: Layout):
    """(initial TrainState, step function (state, batch) -> (state, metrics)) for any optimizer."""
    schedule = Schedule(c.lr, c.schedule, c.warmup_steps, c.steps)
    if c.optimizer in ("lomo", "adalomo"):
        cls = Lomo if c.optimizer == "lomo" else AdaLomo
        rule = cls(
            weight_decay=c.weight_decay,
            clip_grad_norm=c.clip_grad_norm,
            clip_grad_value=c.clip_grad_value,
        )
        scaler = DynamicLossScale() if c.dtype == "float16" else None
        return (
            init_train_state(rule, params, scaler is not None, scaler, layout),
            make_fused_step(cfg, rule, schedule, scaler, layout),
        )
    tx = optax_transform(c.optimizer, schedule, c.weight_decay, c.clip_grad_norm, c.clip_grad_value)
    state = TrainState(params, jax.jit(tx.init)(params), jnp.int32(0), no_scaling())
    return layout.on_mesh(state), make_optax_train_step(cfg, tx, schedule)


def _split_eval(c: TrainConfig, rows: Rows, tokenizer, vocab: int) -> tuple[Rows, Rows | None]:
    if c.eval_data:
        eval_rows = build_rows(c.format, c.eval_data, tokenizer, c.seq_len, c.task, c.template)
        check_vocab(eval_rows, vocab, c.eval_data)
        return rows, eval_rows
    if c.eval_fraction > 0:
        order = np.random.default_rng([c.seed, 2**31 - 1]).permutation(len(rows))
        n_eval = max(1, int(len(rows) * c.eval_fraction))
        return rows.take(np.sort(order[n_eval:])), rows.take(np.sort(order[:n_eval]))
    return rows, None


def train(c: TrainConfig, resume: bool = False) -> list[dict]:
    from tensorboardX import SummaryWriter

    from lomo_jax.pretrained import from_pretrained

    try:
        layout = Layout(make_mesh(c.mesh))
    except MeshError as e:
        raise ConfigError(str(e)) from None
    log.info("mesh %s over %d process(es)", dict(layout.mesh.shape), jax.process_count())
    splits = layout.mesh.shape["data"] * layout.mesh.shape["fsdp"]
    if c.batch_size % splits:
        log.warning(
            "batch size %d is not a multiple of data x fsdp = %d: devices will repeat "
            "each other's rows (correct, but wasted work)",
            c.batch_size,
            splits,
        )
    model = from_pretrained(c.model, c.tokenizer, dtype=DTYPES[c.dtype], layout=layout)
    cfg = model.config
    check_tokenizer(model.tokenizer, cfg.vocab_size)
    rows = build_rows(c.format, c.data, model.tokenizer, c.seq_len, c.task, c.template)
    check_vocab(rows, cfg.vocab_size, c.data)
    rows, eval_rows = _split_eval(c, rows, model.tokenizer, cfg.vocab_size)
    # Only after every input has been checked.
    run = RunDir.existing(c.out) if resume else RunDir.create(c.out)
    run.write_config(dataclasses.asdict(c))
    primary = is_primary()  # the one process that writes the run's files

    state, step_fn = _make_step(c, cfg, model.params, layout)
    if resume and run.checkpoints():
        ckpt = run.checkpoints()[-1]
        like = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
        )
        model.params = state = None  # free the starting weights: never hold two copies
        state = load_state(ckpt, like, layout)
        log.info("resuming from %s", ckpt)
    start = int(state.step)
    history = run.history_until(start)  # keep the curve up to the checkpoint
    tb = SummaryWriter(str(run.path / "tensorboard")) if primary else None

    def record(m: dict) -> None:
        history.append(m)
        run.append_metrics(m)
        for k, v in m.items() if tb else ():
            if k != "step":
                tb.add_scalar(k, v, m["step"])

    def evaluate(step: int) -> None:
        r = evaluate_loss(cfg, state.params, eval_rows, c.batch_size, layout)
        log.info("step %d  validation loss %.4f  perplexity %.3f", step, r["loss"], r["perplexity"])
        record({"step": step, "eval_loss": r["loss"], "eval_perplexity": r["perplexity"]})

    t_start = time.perf_counter()
    bar = ProgressBar(c.steps, start) if sys.stderr.isatty() else None
    with deferred_interrupt() as interrupted:
        for step in range(start, c.steps):
            b = rows.take(batch_indices(len(rows), c.batch_size, step, c.shuffle, c.seed))
            t0 = time.perf_counter()
            new_state, m = step_fn(state, layout.put_batch(b.batch()))
            m = {k: float(v) for k, v in m.items()}  # waits for the step
            if not np.isfinite(m["loss"]) and c.dtype != "float16":
                raise FloatingPointError(
                    f"loss is {m['loss']} at step {step + 1}; stopped, the "
                    "last checkpoint is untouched"
                )
            state = new_state
            dt = time.perf_counter() - t0
            eta = (time.perf_counter() - t_start) / (step + 1 - start) * (c.steps - step - 1)
            m.update(
                step=step + 1,
                tokens_per_s=b.input_ids.size / dt,
                peak_memory_bytes=peak_memory_bytes(),
            )
            record(m)
            line = (
                f"loss {m['loss']:.4f}  lr {m['lr']:.3g}  {m['tokens_per_s']:.0f} tok/s  "
                f"peak mem {m['peak_memory_bytes'] / 1e9:.2f} GB"
            )
            if bar:
                bar.update(step + 1, line)
            else:
                log.info("step %d/%d  %s  eta %.0fs", step + 1, c.steps, line, eta)
            if eval_rows is not None and c.eval_every and (step + 1) % c.eval_every == 0:
                evaluate(step + 1)
            if c.save_every and (step + 1) % c.save_every == 0 and step + 1 < c.steps:
                run.save_state(state, c.keep_checkpoints)
            if interrupted():
                if bar:
                    bar.close()
                log.info("interrupted: saving a checkpoint at step %d", int(state.step))
                run.save_state(state, c.keep_checkpoints)
                if tb:
                    tb.close()
                raise KeyboardInterrupt
    if bar:
        bar.close()
    if eval_rows is not None and not (c.eval_every and c.steps % c.eval_every == 0):
        evaluate(c.steps)
    run.save_state(state, c.keep_checkpoints)  # the final step is always saved
    files = model.tokenizer.files if model.tokenizer else ()
    checkpoint.write_model(run.path, cfg, state.params, files)
    if primary:
        tb.close()
        plot_losses(run.path / "loss.png", {"": history})
    log.info("saved the model in %s (loss plot: %s)", run.path, run.path / "loss.png")
    return history
