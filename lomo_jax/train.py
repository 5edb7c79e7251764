"""The training loop behind `lomo-jax train`: a config dataclass and one function.

The run directory's layout is `lomo_jax.rundir`'s; what the run shows while it goes is
`lomo_jax.progress`'s; how it stops on Ctrl-C or SIGTERM is `lomo_jax.interrupt`'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from lomo_jax import checkpoint, interrupt
from lomo_jax.atomic import copy_file
from lomo_jax.chat import TRAIN_ON
from lomo_jax.data import FORMATS, DataOptions, Rows, build_rows, check_seq_len, check_tokenizer
from lomo_jax.distributed import any_process, is_primary
from lomo_jax.errors import UserError
from lomo_jax.evaluate import evaluate_loss
from lomo_jax.inputs import load_yaml, shown, text_problem
from lomo_jax.lora import LoraConfig, LoraConfigError, init_factors, join
from lomo_jax.packing import SIDES
from lomo_jax.pretrained import LlamaModel, from_pretrained, read_weights
from lomo_jax.progress import ProgressBar, peak_memory_bytes, plot_losses
from lomo_jax.resume import (
    PATHS,
    ResumeError,
    absolute,
    check_steps,
    checkpoint_of,
    resumed_options,
    started_in,
)
from lomo_jax.rounding import ROUNDINGS
from lomo_jax.rundir import (
    CONFIG_FILE,
    METRICS_FILE,
    NotARunError,
    RunDir,
    load_state,
    read_history,
    step_of,
)
from lomo_jax.schedule import SCHEDULES
from lomo_jax.sharding import Layout, MeshError, abstract, put
from lomo_jax.state import NonFiniteError, TrainState
from lomo_jax.tokenizer import CHAT_TEMPLATE_FILE
from lomo_jax.train_step import DTYPES, OPTIMIZERS, StepOptions, abstract_state, make_train_step

log = logging.getLogger("lomo_jax")


class ConfigError(UserError, ValueError):
    """A training configuration that cannot run (the message names the option or file)."""


class OptionError(ConfigError):
    """A bad value of one option (`from_sources` says which file it came from)."""

    def __init__(self, name: str, problem: str):
        self.name, self.problem = name, problem
        super().__init__(f"--{name.replace('_', '-')}: {problem}")


class TrainingStopped(UserError, RuntimeError):
    """The run could not go on (a full disk, ...); the message says what is kept."""


_CHOICES = {
    "format": FORMATS,
    "optimizer": OPTIMIZERS,
    "schedule": SCHEDULES,
    "dtype": tuple(DTYPES),
    "rounding": ROUNDINGS,
    "train_on": TRAIN_ON,
    "truncation_side": SIDES,
}
_AT_LEAST = {
    "lr": 0,
    "steps": 1,
    "batch_size": 1,
    "seq_len": 2,
    "weight_decay": 0,
    "warmup_steps": 0,
    "seed": 0,
    "gradient_accumulation_steps": 1,
    "lora_rank": 0,
    "lora_warmup_steps": 0,
    "lora_dropout": 0,
    "lora_lr": 0,
    "lora_weight_decay": 0,
    "eval_every": 0,
    "save_every": 0,
    "keep_checkpoints": 0,
}
# The ranges the step takes: an int32 step count (and so every count of steps, rows or tokens),
# a uint32 seed (the rounding bits' key).
INT32 = 2**31 - 1
_AT_MOST = dict.fromkeys(
    (
        "steps",
        "batch_size",
        "seq_len",
        "warmup_steps",
        "gradient_accumulation_steps",
        "lora_rank",
        "lora_warmup_steps",
        "eval_every",
        "save_every",
        "keep_checkpoints",
    ),
    INT32,
) | {"seed": 2**32 - 1}
_EXPECTED = {"str": "a string", "bool": "true or false", "int": "an integer", "float": "a number"}


def _coerce(name: str, kind: str, value: Any) -> Any:
    """`value` as the field's type (`kind`, e.g. "float | None"): YAML reads `1e-3` as text."""
    base = kind.split("|")[0].strip()
    if value is None and "None" in kind:
        return None
    if isinstance(value, bool):  # an int to Python, never a number here
        if base == "bool":
            return value
    elif base == "str" and isinstance(value, str | os.PathLike):
        text = os.fspath(value)
        if isinstance(text, str):
            empty = "an empty path" if not text and name in PATHS else None
            if problem := text_problem(text) or empty:
                raise OptionError(name, problem)
            return text
    elif base == "int" and isinstance(value, int):
        return value
    elif base in ("int", "float") and isinstance(value, int | float | str):
        with contextlib.suppress(ValueError, OverflowError):
            number = float(value)
            if base == "float":
                return number
            if number.is_integer():
                return int(number)
    raise OptionError(name, f"expected {_EXPECTED[base]}, got {shown(value)}")


@dataclasses.dataclass
class TrainConfig:
    model: str
    data: str
    out: str
    format: str = "pretokenized"
    task: str | None = None
    template: str | None = None
    chat_template: str | None = None  # default: the tokenizer's own
    messages_field: str | None = None  # default: messages, else conversations
    train_on: str = "assistant"
    truncation_side: str = "right"
    pack: bool = False
    data_config: str | None = None  # of a Hugging Face dataset id
    tokenizer: str | None = None
    optimizer: str = "adalomo"
    lr: float = 1e-3
    steps: int = 100
    batch_size: int = 8
    seq_len: int = 512
    weight_decay: float = 0.0
    clip_grad_norm: float | None = None  # 0 = none, as in the Hugging Face Trainer
    clip_grad_value: float | None = None
    schedule: str = "constant"
    warmup_steps: int = 0
    shuffle: bool = True
    seed: int = 0
    dtype: str = "float32"
    rounding: str = "stochastic"  # of 16-bit weights after a fused update; "nearest" = the paper
    gradient_accumulation_steps: int = 1
    eval_data: str | None = None
    eval_fraction: float = 0.0
    eval_every: int = 0
    save_every: int = 0
    keep_checkpoints: int = 2
    mesh: str | None = None  # e.g. "fsdp=8", "data=2,fsdp=4"; default: every device on fsdp
    from_checkpoint: str | None = None  # a new run from another run's checkpoint (`resume`)
    offload_activations: bool = False  # the fused step's saved layer inputs in host memory
    # LoRA (lomo_jax.lora): fresh factors of this rank (0: none), or a peft adapter to start from
    lora_rank: int = 0
    lora_alpha: float | None = None  # default 2 x rank
    lora_targets: str = "q_proj,v_proj"
    lora_dropout: float = 0.0
    adapter: str | None = None
    lora_lr: float = 5e-4
    lora_schedule: str | None = None  # default: --schedule's
    lora_warmup_steps: int | None = None  # default: --warmup-steps
    lora_weight_decay: float = 0.0

    def __post_init__(self):
        """Every value checked before anything is written (files are checked by `train`)."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, str(f.type), getattr(self, f.name)))
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise OptionError(
                    name, f"{shown(getattr(self, name))}; choose from {', '.join(choices)}"
                )
        for name, low in _AT_LEAST.items():
            value = getattr(self, name)
            if value is None:  # unset: another option's (lora_warmup_steps: --warmup-steps)
                continue
            if name in _AT_MOST and value > _AT_MOST[name]:
                raise OptionError(name, f"must be at most {_AT_MOST[name]}, got {shown(value)}")
            if not (math.isfinite(value) and value >= low):
                raise OptionError(name, f"must be at least {low}, got {shown(value)}")
        for name in ("clip_grad_norm", "clip_grad_value"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise OptionError(name, f"must be positive (0 or absent: no clipping), got {value}")
            if value == 0:
                setattr(self, name, None)
        if self.rows_per_step * self.seq_len > INT32:
            raise OptionError(
                "batch_size",
                f"{self.rows_per_step} rows of {self.seq_len} tokens a step; at most {INT32} "
                "tokens (JAX indexes them with int32)",
            )
        if not 0 <= self.eval_fraction < 1:
            raise OptionError("eval_fraction", f"must be in [0, 1), got {self.eval_fraction}")
        if self.eval_fraction and self.eval_data:
            raise OptionError("eval_fraction", "give --eval-data or --eval-fraction, not both")
        if self.lora_schedule is not None and self.lora_schedule not in SCHEDULES:
            raise OptionError(
                "lora_schedule", f"{self.lora_schedule!r}; choose from {', '.join(SCHEDULES)}"
            )
        if self.lora_rank and self.adapter:
            raise ConfigError("give --lora-rank (fresh factors) or --adapter DIR, not both")
        if self.gradient_accumulation_steps != 1 and self.optimizer in ("lomo", "adalomo", "none"):
            raise ConfigError(
                "gradient accumulation is impossible with fused LOMO/AdaLomo: each "
                "gradient is consumed by the update the moment it exists; raise "
                "--batch-size instead"
            )

    def step_options(self) -> StepOptions:
        """The step's options (`lomo_jax.train_step`)."""
        return StepOptions(
            optimizer=self.optimizer,
            lr=self.lr,
            schedule=self.schedule,
            warmup_steps=self.warmup_steps,
            total_steps=self.steps,
            weight_decay=self.weight_decay,
            clip_grad_norm=self.clip_grad_norm,
            clip_grad_value=self.clip_grad_value,
            loss_scaling=self.dtype == "float16",
            rounding=self.rounding,
            seed=self.seed,
            micro_batches=self.gradient_accumulation_steps,
            offload_activations=self.offload_activations,
            lora_lr=self.lora_lr,
            lora_schedule=self.lora_schedule,
            lora_warmup_steps=self.lora_warmup_steps,
            lora_weight_decay=self.lora_weight_decay,
        )

    def lora(self) -> LoraConfig | None:
        """Fresh factors' settings (`--lora-rank`), or None."""
        if not self.lora_rank:
            return None
        targets = tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())
        try:
            return LoraConfig(self.lora_rank, self.lora_alpha, targets, self.lora_dropout)
        except LoraConfigError as e:
            raise ConfigError(f"--lora-*: {e}") from None

    @property
    def rows_per_step(self) -> int:
        return self.batch_size * self.gradient_accumulation_steps

    @classmethod
    def from_sources(cls, yaml_file: str | Path | None, overrides: dict[str, Any]) -> TrainConfig:
        """Dataclass defaults < YAML file < command-line flags that were given."""
        loaded = read_options(Path(yaml_file)) if yaml_file else {}
        where = dict.fromkeys(set(loaded) - set(overrides), str(yaml_file))
        return cls.from_values({**loaded, **overrides}, where)

    @classmethod
    def from_values(cls, values: dict[str, Any], where: dict[str, str]) -> TrainConfig:
        """The config of `values`; a bad one's error names the file it came from, `where[name]`
        (a flag's names the flag)."""
        missing = [k for k in ("model", "data", "out") if values.get(k) is None]
        if missing:
            raise ConfigError(f"missing required option --{missing[0]} (flag or config file)")
        try:
            return cls(**values)
        except OptionError as e:
            if e.name in where:
                raise ConfigError(f"{where[e.name]}: {e.name}: {e.problem}") from None
            raise

    @classmethod
    def resumed(
        cls,
        run: str | Path,
        yaml_file: str | Path | None,
        flags: dict[str, Any],
        from_checkpoint: str | None = None,
    ) -> tuple[TrainConfig, list[str]]:
        """The options of `--resume RUN`: the run's saved ones, with the given ones (a `--config`
        file, then flags) that a resumed run may change (`lomo_jax.resume`: a fixed one that
        differs is refused) -> (config, the changes taken). With `from_checkpoint` (one of RUN's
        checkpoints, or any checkpoint path), the options of a new run from it in `flags["out"]`."""
        run = Path(run)
        saved_file = run / CONFIG_FILE
        if not saved_file.is_file():
            raise NotARunError(f"{run}: not a training run (no {CONFIG_FILE}) to resume")
        saved = read_options(saved_file)
        loaded = read_options(Path(yaml_file)) if yaml_file else {}
        given = {**loaded, **flags}
        where = dict.fromkeys(saved, str(saved_file))
        where |= dict.fromkeys(loaded, str(yaml_file))
        where = {name: f for name, f in where.items() if name not in flags}
        out = given.pop("out", None)
        options, changes = resumed_options(saved, given, where, started_in(run, saved.get("out")))
        if from_checkpoint is None:
            if out is not None and os.path.abspath(out) != os.path.abspath(run):
                source = f"{where['out']}: out" if "out" in where else "--out"
                raise ResumeError(
                    f"{source}: a resumed run stays in {run}; to start a new run from one of "
                    "its checkpoints, add --from-checkpoint step_NNNNNNNN"
                )
            options["out"] = os.path.abspath(run)
        else:
            if out is None:
                raise ResumeError("--from-checkpoint starts a new run: give its --out")
            options["out"] = out
            options["from_checkpoint"] = str(checkpoint_of(from_checkpoint, run))
        return cls.from_values(options, where), changes


def read_options(p: Path) -> dict[str, Any]:
    """A YAML file of options (a `--config`, a run's train_config.yaml), each one known."""
    loaded = load_yaml(p, ConfigError) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p}: expected a mapping of option: value")
    unknown = sorted(set(loaded) - {f.name for f in dataclasses.fields(TrainConfig)}, key=str)
    if unknown:
        raise ConfigError(f"{p}: unknown option {shown(unknown[0])}")
    return loaded


def batch_indices(n_rows: int, batch_size: int, step: int, shuffle: bool, seed: int) -> np.ndarray:
    """Rows of step `step`: in file order without shuffling, else a fresh permutation per epoch."""
    per_epoch = max(1, n_rows // batch_size)
    epoch, k = divmod(step, per_epoch)
    order = (
        np.random.default_rng([seed, epoch]).permutation(n_rows) if shuffle else np.arange(n_rows)
    )
    return order[k * batch_size : (k + 1) * batch_size]


def _rows_of_step(c: TrainConfig, rows: Rows, step: int) -> Rows:
    return rows.take(batch_indices(len(rows), c.rows_per_step, step, c.shuffle, c.seed))


def _split_eval(c: TrainConfig, rows: Rows, tokenizer, vocab: int) -> tuple[Rows, Rows | None]:
    if c.eval_data:
        eval_rows = build_rows(
            c.format,
            c.eval_data,
            tokenizer,
            c.seq_len,
            c.task,
            c.template,
            vocab,
            DataOptions.of(c),
        )
        return rows, eval_rows
    if c.eval_fraction > 0:
        order = np.random.default_rng([c.seed, 2**31 - 1]).permutation(len(rows))
        n_eval = max(1, int(len(rows) * c.eval_fraction))
        return rows.take(np.sort(order[n_eval:])), rows.take(np.sort(order[:n_eval]))
    return rows, None


def _load_inputs(c: TrainConfig, layout: Layout):
    """The model (its weights abstract: they are read once the step is compiled) and the
    training / validation rows, every input checked."""
    model = from_pretrained(c.model, c.tokenizer, DTYPES[c.dtype], layout, weights=False)
    cfg = model.config
    check_seq_len(c.seq_len, cfg, c.model)
    check_tokenizer(model.tokenizer, cfg.vocab_size)
    rows = build_rows(
        c.format,
        c.data,
        model.tokenizer,
        c.seq_len,
        c.task,
        c.template,
        cfg.vocab_size,
        DataOptions.of(c),
    )
    rows, eval_rows = _split_eval(c, rows, model.tokenizer, cfg.vocab_size)
    if c.rows_per_step > len(rows):
        held = f" ({len(eval_rows)} held out for validation)" if c.eval_fraction else ""
        accumulated = (
            f" x {c.gradient_accumulation_steps}" if c.rows_per_step > c.batch_size else ""
        )
        raise OptionError(
            "batch_size",
            f"{c.batch_size}{accumulated} rows per step, but {c.data} gives "
            f"{len(rows)} training rows{held}",
        )
    return model, rows, eval_rows


def train(
    c: TrainConfig, resume: bool = False, after_phase: Callable[[str], None] | None = None
) -> list[dict]:
    """Trains (or resumes) the run in `c.out`; returns its metrics.

    The process is left as it was found: no signal handler is installed (run it inside
    `lomo_jax.interrupt.caught()`, as the CLI does, and Ctrl-C or SIGTERM stops it between steps
    with a checkpoint), no cache is cleared, no memory handed back. `after_phase(name)` is
    called when the step has compiled ("compiled") and when the weights are in memory
    ("loaded"), before the first step: where the CLI hands memory back to the system."""
    after_phase = after_phase or (lambda phase: None)
    with contextlib.ExitStack() as stack:
        if resume:  # refused at once when the run is in use, or when it would rewrite history
            run = stack.enter_context(RunDir.resume(c.out))
            check_steps(run.path, run.checkpoints(), c.steps)
            if run.finished(c.steps):
                log.info("%s: already trained to step %d; nothing to do", run.path, c.steps)
                return run.history_until(c.steps)
        else:
            RunDir.check_new(c.out)
        restart = resume and bool(run.checkpoints())  # the state comes from the run's checkpoint
        origin = (
            checkpoint_of(c.from_checkpoint, None) if c.from_checkpoint and not restart else None
        )
        if origin is not None and c.steps < step_of(origin):
            raise OptionError(
                "steps", f"{c.steps} is below the step of its --from-checkpoint {origin}"
            )
        try:
            layout = Layout.of(c.mesh)
            split = layout.sequence_split((c.batch_size, c.seq_len))
        except MeshError as e:
            raise ConfigError(str(e)) from None
        log.info("mesh %s over %d process(es)", dict(layout.mesh.shape), jax.process_count())
        splits = layout.mesh.shape["data"] * layout.mesh.shape["fsdp"]
        if split is not None:
            log.info("each sequence split over fsdp=%d (length=fsdp)", split.shards)
        elif c.batch_size % splits:
            log.warning(
                "batch size %d is not a multiple of data x fsdp = %d: devices will repeat "
                "each other's rows (correct, but wasted work)",
                c.batch_size,
                splits,
            )
        model, rows, eval_rows = _load_inputs(c, layout)
        model, factors = _with_lora(c, model, layout)
        try:
            init, step_fn = make_train_step(c.step_options(), model.config, layout)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        like = abstract_state(init, model.params)
        step_fn = _compile(step_fn, like, layout.put_batch(_rows_of_step(c, rows, 0).batch()))
        after_phase("compiled")
        if origin is not None:  # read before anything is written: a bad one leaves no run
            state = load_state(origin, like, layout)
        elif not restart:
            params = read_weights(c.model, c.tokenizer, DTYPES[c.dtype], layout)
            if factors is not None:
                params = join(params, factors())
            state = layout.on_mesh(init(params))
        if signum := _stop_requested():
            raise interrupt.Interrupted(signum, "before training started; nothing written")
        if not resume:
            run = stack.enter_context(RunDir.create(c.out))
        run.recover()
        if restart:
            state = run.load_latest(like, layout)
        if not resume and origin is not None:  # its history up to the checkpoint goes with it
            run.write_history(read_history(origin.parent.parent / METRICS_FILE, step_of(origin)))
        # The run has started: its options are those it goes on with (paths absolute, so that
        # it resumes from any directory).
        run.write_config(absolute(dataclasses.asdict(c), Path.cwd()))
        after_phase("loaded")
        return _Loop(c, run, model, step_fn, rows, eval_rows, layout, state).train()


def _with_lora(c: TrainConfig, model: LlamaModel, layout: Layout):
    """The model with the LoRA factors the run trains (its weights still abstract), and what
    makes their values on `layout`: fresh ones (peft's initialisation, seeded by --seed) for
    --lora-rank, a peft adapter's for --adapter; None when the model brings its own (a LoRA
    checkpoint trains on) or has none."""
    fresh = c.lora()
    if fresh is None and c.adapter is None:
        return model, None
    if model.config.lora is not None:
        raise ConfigError(
            f"{c.model} already has LoRA factors: drop --lora-rank / --adapter to train them on"
        )
    if fresh is not None:
        cfg = model.config.replace(lora=fresh)
        make = lambda: init_factors(cfg, jax.random.key(c.seed))  # noqa: E731
    else:
        from convert.peft import read_adapter

        cfg, values = read_adapter(c.adapter, model.config)
        make = lambda: values  # noqa: E731
    shapes = jax.eval_shape(lambda: init_factors(cfg, jax.random.key(0)))
    shardings = layout.params(shapes)
    params = join(model.params, abstract(shapes, shardings))
    return dataclasses.replace(model, config=cfg, params=params), lambda: put(make(), shardings)


def _compile(step_fn: Callable, like: TrainState, batch: Any) -> Callable:
    """The step compiled before any weight is in memory: the compiler's own peak, and what it
    leaves in malloc's heaps until handed back, never add to the weights'."""
    t0 = time.perf_counter()
    compiled = step_fn.lower(like, batch).compile()
    log.info("compiled the training step in %.0f s", time.perf_counter() - t0)
    return compiled


def _stop_requested() -> int | None:
    """The signal that asked any process to stop (all of them must stop at the same step)."""
    return any_process(interrupt.requested() or 0) or None


@dataclasses.dataclass
class _Loop:
    """A run's steps from its state to `c.steps`, its jobs in parts: a step, what follows one
    (metrics, validation, checkpoints), a stop on request, and the finish (the last validation
    and checkpoint, the model, the loss plot)."""

    c: TrainConfig
    run: RunDir
    model: LlamaModel
    step_fn: Callable
    rows: Rows
    eval_rows: Rows | None
    layout: Layout
    state: TrainState
    history: list[dict] = dataclasses.field(default_factory=list)
    saved: int = 0  # the step of the newest checkpoint on disk (or the start)

    def train(self) -> list[dict]:
        """Steps on to `c.steps`, then finishes; -> the run's metrics. A write that fails (a full
        disk, a file system gone read-only) stops the run with the checkpoint left intact."""
        start = int(self.state.step)
        self.history = self.run.history_until(start)  # keep the curve up to the checkpoint
        self.saved = start
        bar = ProgressBar(self.c.steps, start) if sys.stderr.isatty() else None
        try:
            t_start = time.perf_counter()
            for step in range(start, self.c.steps):
                if signum := _stop_requested():
                    if bar:
                        bar.close()
                    raise self._stopped(signum, step)
                m = self._step(step)
                eta = (
                    (time.perf_counter() - t_start) / (step + 1 - start) * (self.c.steps - step - 1)
                )
                self._show(m, bar, eta)
                self._after_step(step + 1)
            if bar:
                bar.close()
            self._finish()
        except OSError as e:  # a full disk, a file system gone read-only, ...
            where = f"{e.filename}: " if e.filename else ""
            raise TrainingStopped(
                f"{where}{e.strerror or e}; stopped at step {int(self.state.step)}, the last "
                f"checkpoint is untouched ({self.run.kept()})"
            ) from e
        log.info("saved the model in %s (loss plot: %s)", self.run.path, self.run.path / "loss.png")
        return self.history

    def _step(self, step: int) -> dict:
        """One optimizer step (the one after `step` taken) -> its metrics; a loss that is not
        finite (float16's overflows aside: the step skips them) stops the run, unsaved."""
        b = _rows_of_step(self.c, self.rows, step)
        t0 = time.perf_counter()
        new_state, m = self.step_fn(self.state, self.layout.put_batch(b.batch()))
        m = {k: float(v) for k, v in m.items()}  # waits for the step
        if not np.isfinite(m["loss"]) and self.c.dtype != "float16":
            raise NonFiniteError(
                f"loss is {m['loss']} at step {step + 1}; stopped, the last checkpoint is "
                f"untouched ({self.run.kept()})"
            )
        self.state = new_state
        dt = time.perf_counter() - t0
        m.update(
            step=step + 1, tokens_per_s=b.input_ids.size / dt, peak_memory_bytes=peak_memory_bytes()
        )
        self._record(m)
        return m

    def _show(self, m: dict, bar: ProgressBar | None, eta: float) -> None:
        lrs = [] if self.c.optimizer == "none" else [f"lr {m['lr']:.3g}"]  # a frozen base's
        lrs += [f"LoRA lr {m['lora_lr']:.3g}"] if "lora_lr" in m else []
        line = (
            f"loss {m['loss']:.4f}  {'  '.join(lrs)}  {m['tokens_per_s']:.0f} tok/s  "
            f"peak mem {m['peak_memory_bytes'] / 1e9:.2f} GB"
        )
        if bar:
            bar.update(m["step"], line)
        else:
            log.info("step %d/%d  %s  eta %.0fs", m["step"], self.c.steps, line, eta)

    def _after_step(self, step: int) -> None:
        """Validation and a checkpoint when `step` is due for them (the last step's are the
        finish's)."""
        c = self.c
        if self.eval_rows is not None and c.eval_every and step % c.eval_every == 0:
            self._evaluate(step)
        if c.save_every and step % c.save_every == 0 and step < c.steps:
            self._save()

    def _stopped(self, signum: int, step: int) -> interrupt.Interrupted:
        """A stop asked for by a signal before step `step`: the state saved unless the newest
        checkpoint already holds it."""
        kept = (
            f"saved {self._save()}"
            if step > self.saved
            else f"nothing new to save, the last checkpoint is untouched ({self.run.kept()})"
        )
        return interrupt.Interrupted(
            signum, f"at step {step}: {kept}; lomo-jax train --resume {self.run.path} goes on"
        )

    def _finish(self) -> None:
        """The last step's validation and checkpoint (unless the run holds them already: a
        resumed run that stopped before its model was written), then the model."""
        c = self.c
        evaluated = any(m["step"] == c.steps and "eval_loss" in m for m in self.history)
        if self.eval_rows is not None and not evaluated:
            self._evaluate(c.steps)
        if self.saved < c.steps:
            self._save()  # the final step is always saved
        files = self.model.tokenizer.files if self.model.tokenizer else ()
        checkpoint.write_model(
            self.run.path, self.model.config, self.state.params, files, self.model.generation_config
        )
        if c.format == "chat" and c.chat_template and is_primary():
            # The template the rows were rendered with (read before the first step) stays the
            # model's own: generate --chat, chat and the export use it.
            copy_file(Path(c.chat_template), self.run.path / CHAT_TEMPLATE_FILE)
        if is_primary():
            plot_losses(self.run.path / "loss.png", {"": self.history})

    def _save(self) -> Path:
        saved = self.run.save_state(self.state, self.c.keep_checkpoints)
        self.saved = int(self.state.step)
        return saved

    def _evaluate(self, step: int) -> None:
        cfg, c = self.model.config, self.c
        r = evaluate_loss(cfg, self.state.params, self.eval_rows, c.batch_size, self.layout)
        log.info("step %d  validation loss %.4f  perplexity %.3f", step, r["loss"], r["perplexity"])
        self._record({"step": step, "eval_loss": r["loss"], "eval_perplexity": r["perplexity"]})

    def _record(self, m: dict) -> None:
        self.history.append(m)
        self.run.record(m)
