"""Peak RSS of `lomo-jax import` on a synthetic sharded Hugging Face checkpoint of >= 1 GB.

Conversion streams tensor by tensor into one preallocated tree, so the peak should be about one
copy of the model plus the libraries, not two. Usage:
    python benchmarks/convert_memory.py [--hidden 1024 --layers 20] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from rss import baseline_rss, child_peak_rss, dir_bytes

from convert.export import write_hf
from convert.synthetic import random_hf_tensors
from lomo_jax.config import LlamaConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=20)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    cfg = LlamaConfig(
        vocab_size=32000,
        hidden_size=a.hidden,
        intermediate_size=a.hidden * 11 // 4,
        num_hidden_layers=a.layers,
        num_attention_heads=a.hidden // 128,
    )
    with tempfile.TemporaryDirectory() as tmp:
        src = write_hf(Path(tmp) / "hf", cfg, random_hf_tensors(cfg), max_shard_bytes=2**28)
        size = dir_bytes(src)
        peak, secs = child_peak_rss(["import", str(src), str(Path(tmp) / "ckpt")])
    base = baseline_rss()
    row = {
        "checkpoint_bytes": size,
        "params": cfg.num_params,
        "peak_rss_bytes": peak,
        "libraries_rss_bytes": base,
        "peak_over_checkpoint": round(peak / size, 3),
        "peak_minus_libraries_over_checkpoint": round((peak - base) / size, 3),
        "seconds": round(secs, 1),
    }
    if a.json:
        print(json.dumps(row))
    else:
        for k, v in row.items():
            print(f"{k:40s} {v}")


if __name__ == "__main__":
    main()
