"""The run directory's disk format.

    OUT/train_config.yaml          the resolved options (what --resume reads back)
    OUT/metrics.jsonl              one JSON object per step / evaluation
    OUT/tensorboard/               the same metrics as TensorBoard events
    OUT/checkpoints/step_NNNNNNNN/ params/, opt_state/ (orbax), state.json (step, loss scale),
                                   checksums.json (each file's size and checksum)
    OUT/loss.png, and the final model (config.json, params/, tokenizer)

A checkpoint is complete state -- params, optimizer state (AdaLomo factors), step, loss scale --
and the data position and RNG are functions of (seed, step), so a resumed run is bit-identical to
one never interrupted.

One process at a time trains in a run directory, and no other command writes there meanwhile: it
holds the directory's claim (`lomo_jax.lock`), which the kernel releases when the process dies, so
a crash leaves no stale lock. Holding it, a run puts back or removes what a crash left half-done
(`atomic.recover_all`). Non-finite weights are never saved;
a checkpoint is checked (checksums, finite weights) before it is resumed from, and a damaged one
gives way to the one before it, with a warning.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import yaml
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto.event_pb2 import Event
from tensorboardX.summary import scalar

from lomo_jax import checkpoint
from lomo_jax.atomic import (
    OutputExistsError,
    atomic_directory,
    check_location,
    discard,
    recover_all,
    write_file,
)
from lomo_jax.checkpoint import CheckpointError
from lomo_jax.compiler import jit
from lomo_jax.distributed import barrier, is_primary
from lomo_jax.errors import UserError
from lomo_jax.inputs import read_json
from lomo_jax.lock import OutputInUseError, claim
from lomo_jax.loss_scale import ScaleState
from lomo_jax.sharding import Layout
from lomo_jax.state import NonFiniteError, TrainState, all_finite

log = logging.getLogger("lomo_jax")

CONFIG_FILE = "train_config.yaml"
CKPT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
EVENTS_DIR = "tensorboard"
STATE_FILE = "state.json"
STEP_DIR = re.compile(r"step_\d{8,10}")  # zero-padded to 8 digits; an int32 has up to 10
INT32 = 2**31 - 1  # a step is an int32


class NotARunError(UserError, ValueError):
    """`--resume` of a directory that holds no training run."""


class RunInUseError(OutputInUseError):
    """A run directory another process is training in."""


_all_finite = jit(all_finite)  # the project's jit: its CPU compile options, as every step's


def _finite(tree: Any) -> bool:
    return not jax.tree.leaves(tree) or bool(_all_finite(tree))


class Events:
    """TensorBoard scalars written and flushed in the caller's thread, so a full disk raises
    here (tensorboardX's SummaryWriter writes from a thread that dies on it, and the training
    loop then blocks on its queue forever)."""

    def __init__(self, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        self._writer = EventsWriter(str(directory / "events"))

    def add(self, m: dict) -> None:
        for k, v in m.items():
            if k != "step":
                event = Event(wall_time=time.time(), step=m["step"], summary=scalar(k, v))
                self._writer.write_event(event)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class RunDir:
    """A run directory, claimed by this process while it is open (a context manager)."""

    def __init__(self, path: Path, claimed: contextlib.ExitStack):
        self.path, self._claim = path, claimed
        self._events: Events | None = None

    @staticmethod
    def check_new(out: str | Path) -> None:
        """A new run can go to OUT: it is absent or an empty directory."""
        path = Path(out)
        check_location(path)
        if path.is_file() or (path.is_dir() and any(path.iterdir())):
            raise OutputExistsError(f"{path}: already exists (pass --resume {path} to continue it)")

    @classmethod
    def create(cls, out: str | Path) -> RunDir:
        """A new run: OUT must not exist or be empty."""
        path = Path(out)
        with _claimed(path) as claimed:
            cls.check_new(path)
            barrier("checked the output directory")  # before any process creates it
            path.mkdir(parents=True, exist_ok=True)
            return cls(path, claimed.pop_all())

    @classmethod
    def resume(cls, out: str | Path) -> RunDir:
        """A run to resume, claimed at once: a run in use is refused before anything loads."""
        path = Path(out)
        with _claimed(path) as claimed:
            if not (path / CONFIG_FILE).is_file():
                raise NotARunError(f"{path}: not a training run (no {CONFIG_FILE}) to resume")
            return cls(path, claimed.pop_all())

    def close(self) -> None:
        if self._events:
            events, self._events = self._events, None
            try:
                events.close()
            except OSError as e:  # a full disk: the error that stopped the run says more
                log.warning("%s: %s", self.path / EVENTS_DIR, e.strerror or e)
        self._claim.close()

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def recover(self) -> None:
        """Puts back or removes what a crash left half-done (holding the lock, nothing else is
        writing here)."""
        if is_primary():
            recover_all(self.path)
            recover_all(self.path / CKPT_DIR)
        barrier("recovered the run directory")

    # ---- the options --------------------------------------------------------------------
    def write_config(self, options: dict[str, Any]) -> None:
        """The run's options, replaced whole (unchanged ones leave the file as it is)."""
        f, text = self.path / CONFIG_FILE, yaml.safe_dump(options, sort_keys=False)
        if is_primary() and not (f.is_file() and f.read_text(errors="replace") == text):
            write_file(f, text)

    # ---- metrics ------------------------------------------------------------------------
    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILE

    def history_until(self, step: int) -> list[dict]:
        """The metrics up to `step`, rewritten so: what followed the checkpoint is dropped, and
        so is a line a crash cut short."""
        history = read_history(self.metrics_file, step)
        barrier("read the metrics")
        self.write_history(history)
        return history

    def write_history(self, history: list[dict]) -> None:
        """metrics.jsonl replaced whole by `history` (left as it is when it holds just that)."""
        f, text = self.metrics_file, "".join(json.dumps(m) + "\n" for m in history)
        if is_primary() and not (f.is_file() and f.read_text(errors="replace") == text):
            write_file(f, text)
        barrier("wrote the metrics")  # every process reads them back whole

    def record(self, m: dict) -> None:
        """One step's or evaluation's metrics, in metrics.jsonl and TensorBoard."""
        if not is_primary():
            return
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps(m) + "\n")
        if self._events is None:
            self._events = Events(self.path / EVENTS_DIR)
        self._events.add(m)

    # ---- checkpoints --------------------------------------------------------------------
    def checkpoints(self) -> list[Path]:
        d = self.path / CKPT_DIR
        steps = (p for p in d.iterdir() if STEP_DIR.fullmatch(p.name)) if d.is_dir() else ()
        return sorted((p for p in steps if p.is_dir()), key=step_of)

    def finished(self, steps: int) -> bool:
        """Whether the run holds its checkpoint of step `steps` and the model written after it
        (a model of an earlier finish is older than the checkpoint)."""
        ckpts = self.checkpoints()
        if not (ckpts and ckpts[-1].name == f"step_{steps:08d}"):
            return False
        model, state = self.path / checkpoint.CONFIG_FILE, ckpts[-1] / STATE_FILE
        return (
            checkpoint.is_checkpoint(self.path)
            and state.is_file()
            and model.stat().st_mtime_ns >= state.stat().st_mtime_ns
        )

    def kept(self) -> str:
        """The checkpoint the run would resume from, for messages."""
        ckpts = self.checkpoints()
        return str(ckpts[-1]) if ckpts else "none was saved"

    def save_state(self, state: TrainState, keep: int) -> Path:
        step = int(state.step)
        if not (_finite(state.params) and _finite(state.opt_state)):
            raise NonFiniteError(
                f"the weights are not finite (inf/NaN) after step {step}; not saved, stopped, the "
                f"last checkpoint is untouched ({self.kept()}); try a lower --lr"
            )
        dest = self.path / CKPT_DIR / f"step_{step:08d}"
        with atomic_directory(dest, overwrite=True) as tmp:  # a kill here leaves the previous one
            checkpoint.write_params(tmp / "params", state.params)
            checkpoint.write_params(tmp / "opt_state", state.opt_state)
            meta = {
                "step": step,
                "loss_scale": float(state.scale.scale),
                "clean_steps": int(state.scale.clean_steps),
            }
            if is_primary():
                (tmp / STATE_FILE).write_text(json.dumps(meta) + "\n")
                checkpoint.write_checksums(tmp)
        for old in self.checkpoints()[:-keep] if keep > 0 and is_primary() else []:
            discard(old)
        log.info("saved checkpoint %s", dest)
        return dest

    def load_latest(self, like: TrainState, layout: Layout) -> TrainState | None:
        """The newest checkpoint that loads whole, in the shapes and layout of `like`; a damaged
        one is skipped, with a warning, for the one before it. None without checkpoints."""
        ckpts = self.checkpoints()
        for ckpt in reversed(ckpts):
            try:
                state = load_state(ckpt, like, layout)
            except CheckpointError as e:
                if ckpt == ckpts[0]:
                    raise CheckpointError(f"{e} (and no older checkpoint loads)") from None
                log.warning("%s; resuming from the checkpoint before it", e)
                continue
            log.info("resuming from %s", ckpt)
            return state
        return None


def step_of(ckpt: Path) -> int:
    """The step a checkpoint directory's name says it holds."""
    return int(ckpt.name[5:])


def read_history(f: Path, step: int) -> list[dict]:
    """The lines of metrics file `f` up to `step` (none when it is absent); an unreadable one is
    dropped with a warning."""
    lines = f.read_text(errors="replace").splitlines() if f.exists() else []
    history, bad = [], []
    for n, line in enumerate(lines, 1):
        try:
            m = json.loads(line)
            if not isinstance(m, dict) or type(m.get("step")) is not int:
                raise ValueError
        except (ValueError, RecursionError):
            bad.append(n)
            continue
        if m["step"] <= step:
            history.append(m)
    if bad:
        log.warning("%s: dropped unreadable line(s) %s", f, ", ".join(map(str, bad)))
    return history


@contextlib.contextmanager
def _claimed(path: Path):
    """The claim on run directory `path` (a run in use is a RunInUseError), in an ExitStack the
    caller keeps with pop_all() once the run directory is open."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(claim(path, "train"))
        except OutputInUseError as e:
            raise RunInUseError(str(e)) from None
        yield stack


def _read_state(f: Path) -> dict:
    """state.json's step, loss scale and clean steps, each in the range the step takes."""
    if not f.exists():
        raise CheckpointError(f"{f}: missing")
    meta = read_json(f, error=CheckpointError)
    try:
        if not (
            type(meta["step"]) is int
            and 0 <= meta["step"] <= INT32
            and type(meta["clean_steps"]) is int
            and 0 <= meta["clean_steps"] <= INT32
            and type(meta["loss_scale"]) in (float, int)
            and 0 < meta["loss_scale"] <= np.finfo(np.float32).max
        ):
            raise ValueError
        return meta
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{f}: damaged (expected step, loss_scale, clean_steps)") from None


def load_state(ckpt: Path, like: TrainState, layout: Layout) -> TrainState:
    """The checkpoint's state in the shapes and layout of `like` (arrays or ShapeDtypeStructs;
    the mesh may differ from the saving one), after checking every file and value."""
    checkpoint.verify_checksums(ckpt)
    meta = _read_state(ckpt / STATE_FILE)
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
    if not (_finite(state.params) and _finite(opt_state)):
        raise CheckpointError(f"{ckpt}: holds inf/NaN weights")
    return layout.on_mesh(state)
