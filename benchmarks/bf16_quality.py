"""Validation loss after fine-tuning in float32, bfloat16 rounded to nearest, and bfloat16 rounded
stochastically: what rounding the update into 16-bit weights costs, per optimizer.

    python benchmarks/bf16_quality.py [--steps 60] [--optimizers adalomo,lomo] [--json]

The real stories260K model (llama2.c, imported) on Alpaca (alpaca_data_1k.json, 10% held out),
batch 8 x 256, constant learning rate (AdaLomo 5e-4, LOMO 1e-2), seed 0; every run sees the same
batches. Reads ../shared/data beside the repository.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import lomo_jax

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
LR = {"adalomo": 5e-4, "lomo": 1e-2}
VARIANTS = (("float32", "nearest"), ("bfloat16", "nearest"), ("bfloat16", "stochastic"))


def run(model: Path, out: Path, optimizer: str, dtype: str, rounding: str, steps: int, **kw):
    """The validation loss at the end of one `lomo-jax train` run."""
    from lomo_jax.train import TrainConfig, train

    c = TrainConfig(
        model=str(model),
        data=str(DATA / "alpaca" / "alpaca_data_1k.json"),
        out=str(out),
        format="alpaca",
        optimizer=optimizer,
        lr=kw["lr"] if "lr" in kw else LR[optimizer],
        steps=steps,
        batch_size=kw.get("batch_size", 8),
        seq_len=kw.get("seq_len", 256),
        eval_fraction=0.1,
        seed=0,
        dtype=dtype,
        rounding=rounding,
        **{k: v for k, v in kw.items() if k not in ("lr", "batch_size", "seq_len")},
    )
    return [m["eval_loss"] for m in train(c) if "eval_loss" in m][-1]


def import_stories(out: Path) -> Path:
    from convert import import_checkpoint

    llama2c = DATA / "llama2c"
    return import_checkpoint(llama2c / "stories260K.bin", out, llama2c / "tok512.model")


@contextlib.contextmanager
def stories_model() -> Iterator[tuple[Path, Path]]:
    """(a temporary directory for the runs, stories260K imported in it)."""
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp), import_stories(Path(tmp) / "stories")


def start() -> None:
    """As the CLI, before JAX starts; the runs log warnings only."""
    lomo_jax.configure()
    logging.basicConfig(level=logging.WARNING)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--optimizers", default="adalomo,lomo")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    start()
    rows = []
    with stories_model() as (tmp, model):
        # One step at learning rate 0 changes nothing (float32): the loss before training.
        before = run(model, tmp / "start", "lomo", "float32", "nearest", 1, lr=0.0)
        for optimizer in a.optimizers.split(","):
            losses = {}
            for dtype, rounding in VARIANTS:
                name = f"{optimizer}-{dtype}-{rounding}"
                losses[dtype, rounding] = run(
                    model, tmp / name, optimizer, dtype, rounding, a.steps
                )
                rows.append(
                    {
                        "optimizer": optimizer,
                        "lr": LR[optimizer],
                        "dtype": dtype,
                        "rounding": rounding,
                        "steps": a.steps,
                        "start_eval_loss": round(before, 4),
                        "eval_loss": round(losses[dtype, rounding], 4),
                        "vs_float32": round(
                            losses[dtype, rounding] - losses["float32", "nearest"], 4
                        ),
                    }
                )
    if a.json:
        print(json.dumps(rows))
        return
    print(f"stories260K, Alpaca, {a.steps} steps, batch 8 x 256; validation loss from {before:.4f}")
    for r in rows:
        label = r["dtype"] if r["dtype"] == "float32" else f"{r['dtype']} {r['rounding']}"
        print(
            f"{r['optimizer']:8s} lr {r['lr']:<7g} {label:20s} {r['eval_loss']:.4f}  "
            f"{r['vs_float32']:+.4f} vs float32"
        )


if __name__ == "__main__":
    main()
