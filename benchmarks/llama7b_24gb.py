"""LLaMA-7B fine-tuned for real on a 24 GB machine: every command's peak RSS and time.

    python benchmarks/llama7b_24gb.py [--work-dir DIR] [--json]

Writes a random-weight LLaMA-7B Hugging Face checkpoint (bfloat16 safetensors, sharded), then
runs the CLI on it, each command in a fresh process: `import`; `train` with fused AdaLomo in
bfloat16 (batch 1 x 256 of the Alpaca data, 4 steps, uninterrupted); the same run stopped after
3 steps (a checkpoint) and `train --resume` for the 4th; `eval`; `export`. Prints each command's
peak RSS (VmHWM) against the parameter bytes, its wall time, the seconds per training step, the
resumed step's loss next to the uninterrupted run's, and the compile-time plans of fused AdaLomo
and of AdamW (jax.grad + optax) for the same batch.

Needs ../shared/data (the Alpaca file and a SentencePiece tokenizer) and about 60 GB free in
--work-dir: the source and imported checkpoints, a run's checkpoint and final model, and the
export, 13.5 GB each (the source is deleted after the import, the first run after it is read).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
from rss import child_peak_rss, dir_bytes

import lomo_jax
from convert.export import write_hf
from convert.synthetic import random_hf_tensors
from lomo_jax.memory import analyze
from lomo_jax.presets import preset

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
NEEDED_FREE_BYTES = 60 * 10**9
BATCH, SEQ, STEPS = 1, 256, 4


def losses(run: Path) -> dict[int, float]:
    rows = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return {m["step"]: m["loss"] for m in rows if "loss" in m}


def seconds_per_step(run: Path) -> list[float]:
    rows = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return [round(BATCH * SEQ / m["tokens_per_s"], 1) for m in rows if "tokens_per_s" in m]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work-dir", default=tempfile.gettempdir(), help="where the ~60 GB go")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    lomo_jax.configure()  # its plans below as the CLI's: before JAX starts
    alpaca = DATA / "alpaca" / "alpaca_data_1k.json"
    tokenizer = DATA / "llama2c" / "tok512.model"
    if not (alpaca.is_file() and tokenizer.is_file()):
        sys.exit(f"needs {alpaca} and {tokenizer} (the shared reference data)")
    free = shutil.disk_usage(a.work_dir).free
    if free < NEEDED_FREE_BYTES:
        sys.exit(f"{a.work_dir}: {free / 1e9:.0f} GB free, this benchmark needs about 60 GB")

    cfg = preset("llama-7b")
    param_bytes = 2 * cfg.num_params
    rows: list[dict] = []

    def run(name: str, argv: list[str]) -> None:
        peak, secs = child_peak_rss(argv)
        rows.append(
            {
                "command": name,
                "peak_rss_gb": round(peak / 1e9, 2),
                "peak_over_params": round(peak / param_bytes, 3),
                "seconds": round(secs),
            }
        )
        print(f"{name}: {peak / 1e9:.2f} GB peak RSS, {secs:.0f} s", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(dir=a.work_dir, prefix="llama7b-") as tmp:
        work = Path(tmp)
        hf = write_hf(
            work / "hf",
            cfg,
            random_hf_tensors(cfg, dtype=ml_dtypes.bfloat16),
            max_shard_bytes=2 * 2**30,
        )
        print(f"wrote {dir_bytes(hf) / 1e9:.1f} GB of safetensors", file=sys.stderr, flush=True)
        model = work / "llama-7b"
        run("import", ["import", str(hf), str(model), "--tokenizer", str(tokenizer)])
        shutil.rmtree(hf)
        # A few Alpaca records: an eval set small enough for a CPU.
        eval_file = work / "eval.json"
        eval_file.write_text(json.dumps(json.loads(alpaca.read_text())[:8]))

        def train(out: Path, *flags: str) -> list[str]:
            return [
                "train", "--model", str(model), "--data", str(alpaca), "--format", "alpaca",
                "--out", str(out), "--optimizer", "adalomo", "--lr", "1e-4", "--dtype",
                "bfloat16", "--batch-size", str(BATCH), "--seq-len", str(SEQ),
                "--keep-checkpoints", "1", *flags,
            ]  # fmt: skip

        straight = work / "straight"
        run(f"train ({STEPS} steps)", train(straight, "--steps", str(STEPS)))
        straight_losses, step_seconds = losses(straight), seconds_per_step(straight)
        shutil.rmtree(straight)
        resumed = work / "resumed"
        run(f"train ({STEPS - 1} steps)", train(resumed, "--steps", str(STEPS - 1)))
        run("train --resume (1 step)", ["train", "--resume", str(resumed), "--steps", str(STEPS)])
        resumed_losses = losses(resumed)
        run("eval", ["eval", str(resumed), "--data", str(eval_file), "--format", "alpaca",
                     "--seq-len", str(SEQ), "--batch-size", "1"])  # fmt: skip
        run("export", ["export", str(resumed), str(work / "exported")])

    plans = {
        m: analyze(cfg, m, BATCH, SEQ, jnp.bfloat16)["peak_bytes"]
        for m in ("fused-adalomo", "adamw")
    }
    result = {
        "param_bytes": param_bytes,
        "commands": rows,
        "seconds_per_step": step_seconds,
        "uninterrupted_losses": straight_losses,
        "resumed_losses": resumed_losses,
        "plan_bytes": plans,
    }
    if a.json:
        print(json.dumps(result))
        return
    print(f"LLaMA-7B, {param_bytes / 1e9:.2f} GB of bfloat16 parameters, batch {BATCH} x {SEQ}")
    print(f"{'command':26s} {'peak RSS GB':>12s} {'/ params':>9s} {'seconds':>8s}")
    for r in rows:
        print(
            f"{r['command']:26s} {r['peak_rss_gb']:12.2f} {r['peak_over_params']:9.3f} "
            f"{r['seconds']:8d}"
        )
    print(f"seconds per step: {step_seconds}")
    print(f"losses, uninterrupted: {straight_losses}")
    print(f"losses, resumed:       {resumed_losses}")
    for m, b in plans.items():
        print(f"plan {m:14s} {b / 1e9:6.2f} GB ({b / param_bytes:.2f} x params)")


if __name__ == "__main__":
    main()
