"""The longest context each preset trains at, with and without offloaded layer inputs: README's
long-context table (deviceless plans, fused AdaLomo, bfloat16, batch 1, multiples of 1024, up to
--limit whatever context the model was trained at: what memory allows, not what the model reads
well).

    python benchmarks/longest_context.py                      # every row of ROWS
    python benchmarks/longest_context.py --rows llama3.1-8b:rtx4090 --limit 131072

prints one markdown row per model and target as each finishes (`lomo-jax plan --max-seq-len`
for each: a handful of compiled plans), then the whole table.
"""

from __future__ import annotations

import argparse

import lomo_jax
from lomo_jax import cuda_plugin

# (model, target, devices): the 7-8B models on one GPU (the Llamas on each kind), the larger
# ones on one H100 when they fit it, else on 8 (a 70B on 8 of each kind).
ROWS = (
    ("llama-7b", "rtx4090", 1),
    ("llama-7b", "h100", 1),
    ("llama3.1-8b", "rtx4090", 1),
    ("llama3.1-8b", "h100", 1),
    ("qwen2.5-7b", "h100", 1),
    ("qwen3-8b", "h100", 1),
    ("mistral-7b", "h100", 1),
    ("llama-13b", "h100", 1),
    ("qwen3-32b", "h100", 8),
    ("llama3.1-70b", "h100", 8),
    ("llama3.1-70b", "rtx4090", 8),
    ("qwen2.5-72b", "h100", 8),
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", help="model:target[:devices],... (default: ROWS)")
    p.add_argument(
        "--limit",
        type=int,
        default=131072,
        help="the longest length tried (default 131072, past some models' own context)",
    )
    a = p.parse_args()
    rows = ROWS
    if a.rows:
        rows = [(*r.split(":")[:2], int((r.split(":") + ["1"])[2])) for r in a.rows.split(",")]
    lomo_jax.configure()
    cuda_plugin.import_jax()
    from lomo_jax.longest import max_seq_len
    from lomo_jax.memory import GPUS
    from lomo_jax.presets import find_config

    print("| model | target | without offload | offloaded (host per device) |")
    print("|---|---|---:|---:|")
    for model, target, devices in rows:
        cfg = find_config(model)
        cells = []
        for offload in ("off", "on"):
            row = max_seq_len(
                cfg, "fused-adalomo", 1, a.limit, target=target, devices=devices, offload=offload
            )
            cell = f"{row['max_seq_len']} ({row['peak_bytes'] / 2**30:.2f} GiB)"
            if row["max_seq_len"] == row["limit"]:
                cell = f">= {row['limit']} ({row['peak_bytes'] / 2**30:.2f} GiB)"
            if offload == "on":
                cell += f", {row['host_bytes'] / 2**30:.1f} GiB"
            cells.append(cell)
        name = f"{devices} x {GPUS[target].name}"
        print(f"| {model} | {name} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
