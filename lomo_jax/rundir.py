"""The run directory's disk format.

    OUT/train_config.yaml          the resolved options (what --resume reads back)
    OUT/metrics.jsonl              one JSON object per step / evaluation
    OUT/checkpoints/step_NNNNNNNN/ params/, opt_state/ (orbax), state.json (step, loss scale)
    OUT/tensorboard/, OUT/loss.png, and the final model (config.json, params/, tokenizer)

A checkpoint is complete state -- params, optimizer state (AdaLomo factors), step, loss scale --
and the data position and RNG are functions of (seed, step), so a resumed run is bit-identical to
one never interrupted.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
import yaml

from lomo_jax import checkpoint
from lomo_jax.atomic import OutputExistsError, atomic_directory
from lomo_jax.distributed import barrier, is_primary
from lomo_jax.engine import TrainState
from lomo_jax.loss_scale import ScaleState
from lomo_jax.sharding import Layout

log = logging.getLogger("lomo_jax")

CONFIG_FILE = "train_config.yaml"
CKPT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"


class NotARunError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class RunDir:
    path: Path

    @classmethod
    def create(cls, out: str | Path) -> RunDir:
        """A new run: OUT must not exist or be empty."""
        path = Path(out)
        if path.exists() and any(path.iterdir()):
            raise OutputExistsError(f"{path}: already exists (pass --resume {path} to continue it)")
        barrier("checked the output directory")  # before any process creates it
        path.mkdir(parents=True, exist_ok=True)
        return cls(path)

    @classmethod
    def existing(cls, out: str | Path) -> RunDir:
        """A run to resume."""
        path = Path(out)
        if not (path / CONFIG_FILE).is_file():
            raise NotARunError(f"{path}: not a training run (no {CONFIG_FILE}) to resume")
        return cls(path)

    # ---- the options --------------------------------------------------------------------
    def write_config(self, options: dict[str, Any]) -> None:
        if is_primary():
            (self.path / CONFIG_FILE).write_text(yaml.safe_dump(options, sort_keys=False))

    # ---- metrics ------------------------------------------------------------------------
    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILE

    def history_until(self, step: int) -> list[dict]:
        """The metrics up to `step`, rewritten so: what followed the checkpoint is dropped."""
        f = self.metrics_file
        lines = f.read_text().splitlines() if f.exists() else []
        history = [m for m in map(json.loads, lines) if m["step"] <= step]
        barrier("read the metrics")
        if is_primary():
            f.write_text("".join(json.dumps(m) + "\n" for m in history))
        return history

    def append_metrics(self, m: dict) -> None:
        if is_primary():
            with open(self.metrics_file, "a") as f:
                f.write(json.dumps(m) + "\n")

    # ---- checkpoints --------------------------------------------------------------------
    def checkpoints(self) -> list[Path]:
        d = self.path / CKPT_DIR
        return sorted(p for p in d.glob("step_*") if p.is_dir()) if d.is_dir() else []

    def save_state(self, state: TrainState, keep: int) -> Path:
        step = int(state.step)
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
                (tmp / "state.json").write_text(json.dumps(meta) + "\n")
        for old in self.checkpoints()[:-keep] if keep > 0 and is_primary() else []:
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
    return layout.on_mesh(state)
