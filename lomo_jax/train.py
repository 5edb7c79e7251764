"""The training loop behind `lomo-jax train`: a config dataclass, a run directory, one function.

The run directory OUT holds the final model (a lomo-jax checkpoint: config.json, params/,
tokenizer) and beside it the run: train_config.yaml (resolved), metrics.jsonl, tensorboard/,
loss.png and checkpoints/step_NNNNNNNN/. A checkpoint is complete state -- params, optimizer state
(AdaLomo factors), step, loss scale -- and the data position and RNG are functions of (seed,
step), so a resumed run is bit-identical to one never interrupted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml

from lomo_jax import checkpoint
from lomo_jax.atomic import OutputExistsError, atomic_directory
from lomo_jax.data import Rows, build_rows, check_tokenizer, check_vocab
from lomo_jax.distributed import barrier, is_primary
from lomo_jax.engine import (
    Batch,
    TrainState,
    init_train_state,
    make_fused_step,
    make_optax_step,
)
from lomo_jax.evaluate import evaluate_loss
from lomo_jax.loss_scale import DynamicLossScale, ScaleState, no_scaling
from lomo_jax.optim import AdaLomo, Lomo
from lomo_jax.schedule import Schedule
from lomo_jax.sharding import Layout, MeshError, make_mesh, put

log = logging.getLogger("lomo_jax")

OPTIMIZERS = ("lomo", "adalomo", "sgd", "adamw")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
CONFIG_FILE = "train_config.yaml"
CKPT_DIR = "checkpoints"


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


def peak_memory_bytes() -> int:
    """Peak device memory where the backend reports it, else this process's peak RSS."""
    stats = jax.local_devices()[0].memory_stats() or {}
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
    tx = _optax_tx(c, schedule)
    optax_step = make_optax_step(cfg, tx)

    def step(state: TrainState, batch: Batch):
        params, opt_state, loss = optax_step(state.params, state.opt_state, batch)
        metrics = {"loss": loss, "lr": schedule(state.step)}
        return TrainState(params, opt_state, state.step + 1, state.scale), metrics

    state = TrainState(params, jax.jit(tx.init)(params), jnp.int32(0), no_scaling())
    return _on_mesh(state, layout), step


def _on_mesh(tree: Any, layout: Layout) -> Any:
    """Leaves not yet laid out on the mesh (step counters, scalars) become replicated there."""

    def one(x):
        s = getattr(x, "sharding", None)
        if isinstance(s, jax.sharding.NamedSharding) and s.mesh == layout.mesh:
            return x
        return put(np.asarray(x), layout.replicated())

    return jax.tree.map(one, tree)


# ---- checkpoints ------------------------------------------------------------------------------
def _checkpoints(out: Path) -> list[Path]:
    d = out / CKPT_DIR
    return sorted(p for p in d.glob("step_*") if p.is_dir()) if d.is_dir() else []


def save_state(out: Path, state: TrainState, keep: int) -> Path:
    step = int(state.step)
    dest = out / CKPT_DIR / f"step_{step:08d}"
    with atomic_directory(dest, overwrite=True) as tmp:  # a kill here leaves the previous one
        checkpoint.write_params(tmp / "params", state.params)
        checkpoint.write_params(tmp / "opt_state", state.opt_state)
        meta = {
            "step": step,
            "loss_scale": float(state.scale.scale),
            "clean_steps": int(state.scale.clean_steps),
        }
        if is_primary():
            (tmp / "state.json").write_text(json.dumps(meta) + "\n")
    for old in _checkpoints(out)[:-keep] if keep > 0 and is_primary() else []:
        shutil.rmtree(old, ignore_errors=True)
    log.info("saved checkpoint %s", dest)
    return dest


def load_state(ckpt: Path, like: TrainState, layout: Layout) -> TrainState:
    """The checkpoint's state in the shapes and layout of `like` (arrays or ShapeDtypeStructs;
    the mesh may differ from the saving one)."""
    meta = json.loads((ckpt / "state.json").read_text())
    opt_state = (
        checkpoint.read_like(ckpt / "opt_state", like.opt_state)
        if jax.tree.leaves(like.opt_state)
        else like.opt_state
    )
    state = TrainState(
        checkpoint.read_like(ckpt / "params", like.params),
        opt_state,
        np.int32(meta["step"]),
        ScaleState(np.float32(meta["loss_scale"]), np.int32(meta["clean_steps"])),
    )
    return _on_mesh(state, layout)


# ---- the run ----------------------------------------------------------------------------------
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


def _prepare_out(c: TrainConfig, resume: bool) -> Path:
    out = Path(c.out)
    if resume:
        if not (out / CONFIG_FILE).is_file():
            raise ConfigError(f"{out}: not a training run (no {CONFIG_FILE}) to resume")
        return out
    if out.exists() and any(out.iterdir()):
        raise OutputExistsError(f"{out}: already exists (pass --resume {out} to continue it)")
    barrier("checked the output directory")  # before any process creates it
    out.mkdir(parents=True, exist_ok=True)
    return out


def plot_losses(path: Path, runs: dict[str, list[dict]], title: str | None = None) -> None:
    """Training and validation loss of one or more runs' metrics, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, history in runs.items():
        prefix = f"{name} " if name else ""
        train = [(m["step"], m["loss"]) for m in history if "loss" in m]
        evals = [(m["step"], m["eval_loss"]) for m in history if "eval_loss" in m]
        if train:
            ax.plot(*zip(*train), label=f"{prefix}training loss", lw=1)
        if evals:
            ax.plot(*zip(*evals), "o--", label=f"{prefix}validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if title:
        ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@contextlib.contextmanager
def _deferred_interrupt():
    """Ctrl-C takes effect between steps: the state is donated to each step, so an interrupt
    inside one would lose it. A second Ctrl-C interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    flag = []

    def handler(signum, frame):
        flag.append(signum)
        signal.signal(signal.SIGINT, previous)
        log.info("Ctrl-C: stopping after this step (press again to abort now)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(flag)
    finally:
        signal.signal(signal.SIGINT, previous)


class _ProgressBar:
    """A rich progress bar (step, loss, lr, tokens/s, memory, ETA) for interactive terminals."""

    def __init__(self, total: int, start: int):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        )
        self.task = self.progress.add_task("train", total=total, completed=start, info="")
        self.progress.start()

    def update(self, completed: int, info: str) -> None:
        self.progress.update(self.task, completed=completed, info=info)

    def close(self) -> None:
        self.progress.stop()


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
    out = _prepare_out(c, resume)  # only after every input has been checked
    primary = is_primary()  # the one process that writes the run's files
    if primary:
        (out / CONFIG_FILE).write_text(yaml.safe_dump(dataclasses.asdict(c), sort_keys=False))

    state, step_fn = _make_step(c, cfg, model.params, layout)
    history: list[dict] = []
    metrics_file = out / "metrics.jsonl"
    if resume and _checkpoints(out):
        ckpt = _checkpoints(out)[-1]
        like = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
        )
        model.params = state = None  # free the starting weights: never hold two copies
        state = load_state(ckpt, like, layout)
        log.info("resuming from %s", ckpt)
    start = int(state.step)
    if metrics_file.exists():  # keep the curve up to the checkpoint, drop what followed it
        history = [
            m for m in map(json.loads, metrics_file.read_text().splitlines()) if m["step"] <= start
        ]
    barrier("read the metrics")
    if primary:
        metrics_file.write_text("".join(json.dumps(m) + "\n" for m in history))
    tb = SummaryWriter(str(out / "tensorboard")) if primary else None

    def record(m: dict) -> None:
        history.append(m)
        if not primary:
            return
        with open(metrics_file, "a") as f:
            f.write(json.dumps(m) + "\n")
        for k, v in m.items():
            if k != "step":
                tb.add_scalar(k, v, m["step"])

    def evaluate(step: int) -> None:
        r = evaluate_loss(cfg, state.params, eval_rows, c.batch_size, layout)
        log.info("step %d  validation loss %.4f  perplexity %.3f", step, r["loss"], r["perplexity"])
        record({"step": step, "eval_loss": r["loss"], "eval_perplexity": r["perplexity"]})

    t_start = time.perf_counter()
    step = start
    bar = _ProgressBar(c.steps, start) if sys.stderr.isatty() else None
    with _deferred_interrupt() as interrupted:
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
                save_state(out, state, c.keep_checkpoints)
            if interrupted():
                if bar:
                    bar.close()
                log.info("interrupted: saving a checkpoint at step %d", int(state.step))
                save_state(out, state, c.keep_checkpoints)
                if tb:
                    tb.close()
                raise KeyboardInterrupt
    if bar:
        bar.close()
    if eval_rows is not None and not (c.eval_every and c.steps % c.eval_every == 0):
        evaluate(c.steps)
    save_state(out, state, c.keep_checkpoints)  # the final step is always saved
    checkpoint.write_model(out, cfg, state.params, model.tokenizer.files if model.tokenizer else ())
    if primary:
        tb.close()
        plot_losses(out / "loss.png", {"": history})
    log.info("saved the model in %s (loss plot: %s)", out, out / "loss.png")
    return history
