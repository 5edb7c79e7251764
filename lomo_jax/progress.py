"""What a run shows while it goes: the progress bar, peak memory, the loss plot."""

from __future__ import annotations

from pathlib import Path

import jax


def peak_memory_bytes() -> int:
    """Peak device memory where the backend reports it, else this process's peak RSS."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"])
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def plot_losses(path: Path, runs: dict[str, list[dict]], title: str | None = None) -> None:
    """Training and validation loss of one or more runs' metrics, in one PNG (a Figure of its
    own, without pyplot: matplotlib's backend and state stay as the caller had them)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
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


class ProgressBar:
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
