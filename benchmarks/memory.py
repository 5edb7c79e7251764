"""Compile-time memory of one training step per method (nothing is allocated).

    python benchmarks/memory.py --model llama-7b --batch-size 8 --seq-len 512 --dtype float32 --json
    python benchmarks/memory.py --model llama-65b --devices 8 --batch-size 1 --seq-len 1024 --json
    python benchmarks/memory.py --target h100 --model llama-7b --batch-size 1 --seq-len 8192 \
        --dtype bfloat16 --methods fused-adalomo,fused-lomo
    python benchmarks/memory.py --dtype bfloat16 --methods fused-adalomo --rounding nearest
    python benchmarks/memory.py --target h100 --dtype bfloat16 --lora-rank 8 \
        --methods fused-lomo,fused-adalomo,lora

prints a JSON list of rows {method, param_bytes, peak_bytes, peak_over_params, ...} for
inference (forward + loss), fused-lomo, fused-adalomo, sgd and adamw (jax.grad + optax with the
same layer-boundary checkpointing). peak = arguments + outputs + temporaries - aliased.
With --lora-rank R (on --lora-targets, default q_proj,v_proj) the fused methods are LoRA + LOMO /
AdaLomo (the LOMO paper's hybrid) and `lora` is plain LoRA (the base frozen).
With --devices N the step is sharded over N devices (mesh fsdp=N unless --mesh says otherwise)
and every figure is per device: param_bytes is one device's share. --target h100 / h200 / rtx4090
compiles for that GPU without one (lomo_jax.memory: needs JAX's CUDA plugin); the default is
this machine's CPU (several devices: host-platform CPU devices). --offload-activations: the
fused steps keep their saved layer inputs in host memory (host GB: what they keep there).
"""

from __future__ import annotations

import argparse
import json

import lomo_jax
from lomo_jax import cuda_plugin


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-7b")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument(
        "--rounding",
        default="stochastic",
        choices=["stochastic", "nearest"],
        help="of 16-bit weights in the fused steps",
    )
    p.add_argument("--target", default="cpu", help="cpu, h100, h200 or rtx4090")
    p.add_argument("--devices", type=int, default=1, help="plan the step sharded over N devices")
    p.add_argument("--mesh", help="with --devices: e.g. data=2,fsdp=4 (default fsdp=N)")
    p.add_argument("--attention", default="auto", help="auto, dense, blockwise or cudnn")
    p.add_argument("--methods", help="comma-separated (default: every method that applies)")
    p.add_argument(
        "--offload-activations",
        action="store_true",
        help="the fused steps keep their saved layer inputs in host memory",
    )
    p.add_argument("--lora-rank", type=int, default=0, help="LoRA factors of this rank")
    p.add_argument("--lora-targets", default="q_proj,v_proj")
    p.add_argument("--json", action="store_true", help="one JSON list on stdout")
    a = p.parse_args()
    lomo_jax.configure()  # as the CLI: XLA:CPU's memory-aware scheduler, before JAX starts
    cuda_plugin.import_jax()  # a CUDA plugin without a GPU: registered for compiling, quietly
    import jax
    import jax.numpy as jnp

    if a.target == "cpu" and a.devices > 1:  # JAX reads the device count once, when it starts
        jax.config.update("jax_num_cpu_devices", a.devices)

    from lomo_jax.memory import (
        FUSED_METHODS,
        METHODS,
        SHARDED_METHODS,
        TARGETS,
        analyze,
        target_layout,
    )
    from lomo_jax.presets import PRESETS, preset

    if a.model not in PRESETS:
        p.error(f"--model: choose from {sorted(PRESETS)}")
    if a.target not in TARGETS:
        p.error(f"--target: choose from {TARGETS}")
    from lomo_jax.lora import LoraConfig

    cfg = preset(a.model).replace(attention=a.attention)
    if a.lora_rank:
        cfg = cfg.replace(lora=LoraConfig(a.lora_rank, targets=tuple(a.lora_targets.split(","))))
    layout = target_layout(a.target, a.devices, a.mesh)
    sharded = a.devices > 1
    methods = a.methods.split(",") if a.methods else (SHARDED_METHODS if sharded else METHODS)
    if not a.methods:  # the methods that apply to the model, with or without LoRA
        drop = ("sgd", "adamw") if cfg.lora else ("lora",)
        methods = [m for m in methods if m not in drop]
    on = a.batch_size, a.seq_len, jnp.dtype(a.dtype), layout, a.rounding
    rows = [analyze(cfg, m, *on, a.offload_activations and m in FUSED_METHODS) for m in methods]
    if a.json:
        print(json.dumps(rows))
        return
    where = f", {a.devices} devices {dict(layout.mesh.shape)}, per device" if sharded else ""
    rounded = f" ({a.rounding} rounding)" if a.dtype != "float32" else ""
    rounded += f", LoRA rank {a.lora_rank} on {a.lora_targets}" if cfg.lora else ""
    print(f"{a.model}, batch {a.batch_size} x {a.seq_len}, {a.dtype}{rounded}, {a.target}{where}")
    print(f"{'method':15s} {'params GB':>10s} {'peak GB':>9s} {'peak/params':>12s} {'host GB':>8s}")
    for r in rows:
        print(
            f"{r['method']:15s} {r['param_bytes'] / 1e9:10.2f} {r['peak_bytes'] / 1e9:9.2f} "
            f"{r['peak_over_params']:12.3f} {r['host_bytes'] / 1e9:8.2f}"
        )


if __name__ == "__main__":
    main()
