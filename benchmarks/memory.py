"""Compile-time memory of one training step per method (nothing is allocated).

    python benchmarks/memory.py --model llama-7b --batch-size 8 --seq-len 512 --dtype float32 --json

prints a JSON list of rows {method, param_bytes, peak_bytes, peak_over_params, ...} for
inference (forward + loss), fused-lomo, fused-adalomo, sgd and adamw (jax.grad + optax with the
same layer-boundary checkpointing). peak = arguments + outputs + temporaries - aliased.
"""

from __future__ import annotations

import argparse
import json

import jax.numpy as jnp

from lomo_jax.config import PRESETS, preset
from lomo_jax.memory import METHODS, analyze


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-7b", choices=list(PRESETS))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--json", action="store_true", help="one JSON list on stdout")
    a = p.parse_args()
    cfg = preset(a.model)
    rows = [
        analyze(cfg, m, a.batch_size, a.seq_len, jnp.dtype(a.dtype)) for m in a.methods.split(",")
    ]
    if a.json:
        print(json.dumps(rows))
        return
    print(f"{a.model}, batch {a.batch_size} x {a.seq_len}, {a.dtype}")
    print(f"{'method':15s} {'params GB':>10s} {'peak GB':>9s} {'peak/params':>12s}")
    for r in rows:
        print(
            f"{r['method']:15s} {r['param_bytes'] / 1e9:10.2f} {r['peak_bytes'] / 1e9:9.2f} "
            f"{r['peak_over_params']:12.3f}"
        )


if __name__ == "__main__":
    main()
