"""What a run resumes with: the options it may change, and those it keeps.

A run's checkpoints hold its weights and optimizer state, so the options that made them stay the
run's (`FIXED`: the model and its tokenizer, the weights' dtype, the optimizer, the LoRA factors'
shape and the adapter they began from; and the checkpoint it began from, if another run's).
Everything else says how the run goes on and may change when it resumes, given as flags or in a
`--config` file alike: the steps and the learning-rate schedules (the factors' AdamW's too),
validation and checkpoint cadence, the data of a continued run, batch and sequence length, seed,
rounding, LoRA dropout, the mesh, host offload. A change of a fixed option is refused with one
line before anything is read or written; the changes taken are logged.

A run stays in its directory: going back to an earlier step is a new run started from one of its
checkpoints (`--from-checkpoint`), never a rewrite of its history.

Paths are saved absolute, so a run resumes from any working directory. A config an older version
saved with relative paths is read relative to the directory that run was started from: the one
from which its saved `out` leads to the run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lomo_jax.errors import UserError
from lomo_jax.hub import is_repo_id
from lomo_jax.records import is_dataset_id
from lomo_jax.rundir import CKPT_DIR, CONFIG_FILE, STEP_DIR, step_of

# The options a run keeps, and why.
FIXED = {
    "model": "its checkpoints hold that model's weights",
    "tokenizer": "its data were tokenized with it",
    "dtype": "its checkpoints hold weights of that dtype",
    "optimizer": "its checkpoints hold that optimizer's state",
    "lora_rank": "its checkpoints hold LoRA factors of that rank",
    "lora_alpha": "its factors were trained at that scale (alpha / rank)",
    "lora_targets": "its checkpoints hold the factors of those projections",
    "adapter": "its factors began from that adapter",
    "from_checkpoint": "that is where the run began",
}
PATHS = (
    "model",
    "data",
    "eval_data",
    "template",
    "chat_template",
    "tokenizer",
    "adapter",
    "out",
    "from_checkpoint",
)
# The options that may name the Hugging Face Hub instead of a path: a model or a dataset id.
HUB_IDS = {"model": is_repo_id, "data": is_dataset_id, "eval_data": is_dataset_id}


class ResumeError(UserError, ValueError):
    """A resume that would change what the run's checkpoints hold, or rewrite its history."""


def absolute(options: dict[str, Any], base: Path) -> dict[str, Any]:
    """`options` with every path absolute (a relative one taken from `base`); a Hugging Face Hub
    model or dataset id that is no path stays as it is."""
    out = dict(options)
    for name in PATHS:
        value = out.get(name)
        if isinstance(value, str) and value and not _is_hub_id(name, value, base):
            out[name] = os.path.normpath(base / value)
    return out


def _is_hub_id(name: str, value: str, base: Path) -> bool:
    is_id = HUB_IDS.get(name)
    return is_id is not None and is_id(value) and not (base / value).exists()


def started_in(run: Path, saved_out: Any) -> Path:
    """The directory a run was started from: the one from which its saved `out` (relative, as
    older versions saved it) leads to `run`; else the working directory."""
    run = Path(os.path.abspath(run))
    if isinstance(saved_out, str) and saved_out and not Path(saved_out).is_absolute():
        parts = Path(os.path.normpath(saved_out)).parts
        if ".." not in parts and run.parts[-len(parts) :] == parts:
            return Path(*run.parts[: -len(parts)])
    return Path.cwd()


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def resumed_options(
    saved: dict[str, Any], given: dict[str, Any], where: dict[str, str], base: Path
) -> tuple[dict[str, Any], list[str]]:
    """The options of the resumed run: the `saved` ones with the `given` ones (flags and a config
    file, `where[name]` saying which file an option came from) that may change; -> (options,
    the changes as "--lr 0.005 (was 0.01)"). A given fixed option that differs is refused."""
    saved = absolute(saved, base)
    given = absolute(given, Path.cwd())
    options, changes = dict(saved), []
    for name, value in sorted(given.items()):
        if value == saved.get(name) or _same_file(name, value, saved.get(name)):
            continue
        if name in FIXED and not _moved(name, saved.get(name)):
            source = f"{where[name]}: {name}" if name in where else _flag(name)
            kept = saved.get(name) or ("its model's" if name == "tokenizer" else "none")
            raise ResumeError(
                f"{source}: a resumed run keeps its {name} ({kept}): {FIXED[name]}; "
                "start a new run for another"
            )
        options[name] = value
        changes.append(f"{_flag(name)} {value} (was {saved.get(name)})")
    return options, changes


def _same_file(name: str, a: Any, b: Any) -> bool:
    """Two names of one file or directory (a link, `..`)."""
    return (
        name in PATHS
        and isinstance(a, str)
        and isinstance(b, str)
        and os.path.exists(a)
        and os.path.exists(b)
        and os.path.samefile(a, b)
    )


def _moved(name: str, saved: Any) -> bool:
    """A model or tokenizer the run was started with that is no longer where it was: another
    path may take its place (the checkpoint's shapes are checked against it when it loads)."""
    return (
        name in ("model", "tokenizer")
        and isinstance(saved, str)
        and not is_repo_id(saved)
        and not Path(saved).exists()
    )


def checkpoint_of(spec: str, run: str | Path | None) -> Path:
    """The checkpoint `--from-checkpoint SPEC` names: a checkpoint directory, or with `--resume
    RUN` the name of one of RUN's (step_00000002)."""
    path = Path(spec)
    if run is not None and len(path.parts) == 1:
        path = Path(run) / CKPT_DIR / spec
    if not (STEP_DIR.fullmatch(path.name) and path.is_dir()):
        kept = sorted(
            (p for p in path.parent.glob("step_*") if STEP_DIR.fullmatch(p.name)), key=step_of
        )
        it_has = f"; it has {', '.join(p.name for p in kept)}" if kept else ""
        raise ResumeError(f"{path}: no such checkpoint{it_has}")
    return Path(os.path.abspath(path))


def check_steps(run: Path, checkpoints: list[Path], steps: int) -> None:
    """A resume to `steps` below the run's newest checkpoint would rewrite its history: refused,
    with the command that goes back instead (a new run from the latest checkpoint at or below
    `steps`, or from the start when there is none)."""
    if not checkpoints or steps >= step_of(checkpoints[-1]):
        return
    earlier = [c for c in checkpoints if step_of(c) <= steps]
    back = (
        f"start a new run from an earlier checkpoint: lomo-jax train --resume {run} "
        f"--from-checkpoint {earlier[-1].name} --out NEW --steps {steps}"
        if earlier
        else f"start a new run with its options: lomo-jax train --config {run / CONFIG_FILE} "
        f"--out NEW --steps {steps}"
    )
    raise ResumeError(
        f"{run}: --steps {steps} is below its checkpoint of step {step_of(checkpoints[-1])}, and "
        f"a run's history is never rewritten; to go back, {back}"
    )
