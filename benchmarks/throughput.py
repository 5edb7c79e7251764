"""Tokens/s of one training step per method, in one run, same threads, same model.

    python benchmarks/throughput.py [--steps 3] [--batch-size 4] [--seq-len 512] [--json]
    python benchmarks/throughput.py --dtype bfloat16 --methods fused-adalomo,fused-adalomo-nearest \
        --in-turns
    python benchmarks/throughput.py --methods fused-adalomo --attention dense,blockwise \
        --batch-size 1 --seq-len 4096

Methods: fused-lomo, fused-adalomo (this library), sgd, adamw (jax.grad + optax with the same
layer-boundary checkpointing), torch-lomo, torch-adalomo (the paper authors' lomo-optim on
transformers' LlamaForCausalLM with gradient checkpointing); fused-lomo-nearest and
fused-adalomo-nearest round 16-bit weights to nearest instead of stochastically (the same in
float32); fused-lomo-lora and fused-adalomo-lora add LoRA factors (rank 8 on q_proj, v_proj),
trained by AdamW after the fused step's scan (the LOMO paper's hybrid). Default
model: a ~130M-parameter LLaMA (hidden 768, 12 layers, vocab 32000), in --dtype. The first
step of each method (compilation) is not timed. --attention runs each JAX method once per
attention implementation (lomo_jax.attention; default auto), named method/impl.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time

import numpy as np

import lomo_jax
from lomo_jax.config import LlamaConfig
from lomo_jax.lora import LoraConfig

METHODS = ("fused-lomo", "fused-adalomo", "sgd", "adamw", "torch-lomo", "torch-adalomo")
EXTRA_METHODS = (
    "fused-lomo-nearest",
    "fused-adalomo-nearest",
    "fused-lomo-lora",
    "fused-adalomo-lora",
)
LORA = LoraConfig(8, targets=("q_proj", "v_proj"))
CONFIG = LlamaConfig(
    vocab_size=32000,
    hidden_size=768,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=1024,
)


def time_in_turns(steps: dict, n: int) -> dict[str, float]:
    """Mean seconds per step of each method, timed in turns (A, B, A, B, ...) so that load
    changes on a shared machine hit every method alike."""
    for step in steps.values():
        step()  # compile / warm up
    times = {m: 0.0 for m in steps}
    for _ in range(n):
        for m, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[m] += time.perf_counter() - t0
    return {m: t / n for m, t in times.items()}


def jax_step(method: str, ids: np.ndarray, dtype: str, attention: str = "auto"):
    """One step of `method` as `lomo-jax train` builds it (`lomo_jax.train_step`)."""
    import jax
    import jax.numpy as jnp

    from lomo_jax.loss import Batch
    from lomo_jax.model import init_params
    from lomo_jax.train_step import StepOptions, make_train_step

    cfg = CONFIG.replace(attention=attention, lora=LORA if method.endswith("-lora") else None)
    params = init_params(cfg, jax.random.key(0), jnp.dtype(dtype))
    batch = Batch(jnp.asarray(ids), jnp.asarray(ids))
    optimizer = method.removeprefix("fused-").removesuffix("-lora").removesuffix("-nearest")
    rounding = "nearest" if method.endswith("-nearest") else "stochastic"
    init, fn = make_train_step(StepOptions(optimizer, rounding=rounding), cfg)
    box = {"state": init(params)}

    def step():
        box["state"], m = fn(box["state"], batch)
        jax.block_until_ready(m["loss"])

    return step


def torch_step(method: str, ids: np.ndarray, dtype: str):
    import torch
    from torch_reference import make_optimizer, random_model

    model = random_model(CONFIG, dtype)
    opt = make_optimizer(model, method.removeprefix("torch-"), lr=1e-3)
    t = torch.from_numpy(ids).long()

    def step():
        loss = model(input_ids=t, labels=t).loss
        opt.fused_backward(loss, 1e-3)

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--methods", default=",".join(METHODS), help=f"also {', '.join(EXTRA_METHODS)}")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--attention", default="auto", help="comma-separated: auto,dense,blockwise")
    p.add_argument(
        "--in-turns",
        action="store_true",
        help="hold every method at once and time their steps in turns (an A/B on a busy machine)",
    )
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    lomo_jax.configure()  # as the CLI, before JAX starts
    import torch

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    ids = np.random.default_rng(0).integers(
        0, CONFIG.vocab_size, (a.batch_size, a.seq_len), dtype=np.int32
    )
    attentions = a.attention.split(",")
    runs = {}  # name -> a function making its step
    for m in a.methods.split(","):
        if m.startswith("torch"):
            runs[m] = functools.partial(torch_step, m, ids, a.dtype)
            continue
        for att in attentions:
            name = m if len(attentions) == 1 else f"{m}/{att}"
            runs[name] = functools.partial(jax_step, m, ids, a.dtype, att)

    if a.in_turns:
        seconds_by = time_in_turns({name: make() for name, make in runs.items()}, a.steps)
    else:
        seconds_by = {
            name: time_in_turns({name: make()}, a.steps)[name] for name, make in runs.items()
        }
    rows = []
    for method, seconds in seconds_by.items():
        rows.append(
            {
                "method": method,
                "seconds_per_step": round(seconds, 3),
                "tokens_per_s": round(ids.size / seconds, 1),
                "threads": threads,
                "params": CONFIG.num_params,
                "batch_size": a.batch_size,
                "seq_len": a.seq_len,
                "dtype": a.dtype,
            }
        )
    by = {r["method"]: r["tokens_per_s"] for r in rows}
    for r in rows:
        if "sgd" in by:
            r["vs_sgd"] = round(r["tokens_per_s"] / by["sgd"], 3)
        if "torch-lomo" in by:
            r["vs_torch_lomo"] = round(r["tokens_per_s"] / by["torch-lomo"], 3)
    if a.json:
        print(json.dumps(rows))
        return
    print(
        f"{CONFIG.num_params / 1e6:.0f}M params, {a.dtype}, batch {a.batch_size} x {a.seq_len}, "
        f"{threads} threads"
    )
    for r in rows:
        print(
            f"{r['method']:24s} {r['tokens_per_s']:10.1f} tok/s  "
            f"x{r.get('vs_sgd', float('nan')):.2f} vs sgd  "
            f"x{r.get('vs_torch_lomo', float('nan')):.2f} vs torch-lomo"
        )


if __name__ == "__main__":
    main()
