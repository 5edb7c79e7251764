"""Validation loss of LoRA, LOMO, LoRA + LOMO, AdaLomo, AdaLomo + LoRA and AdamW, in the manner of
the LOMO paper's Figure 3: each at its best learning rate of a small sweep, LoRA at ranks 1, 2, 4
and 8 (on q_proj and v_proj), with the step's compile-time peak memory beside it.

    python benchmarks/lora_quality.py [--steps 60] [--ranks 1,2,4,8] [--json]

The real stories260K model (llama2.c, imported) on Alpaca (alpaca_data_1k.json, 10% held out),
float32, batch 8 x 256, constant learning rates, seed 0; every run sees the same batches. The
hybrids sweep the base's learning rate over the two best of the base's sweep (a run takes
about 50 s on 2 cores), the factors at the best plain-LoRA rate of their rank. Peak memory:
XLA:CPU's plan of the same step (`lomo_jax.memory.analyze`, float32), not a measured process
peak (the runs share one process). Reads ../shared/data beside the repository.
"""

from __future__ import annotations

import argparse
import json
import math

from bf16_quality import run, start, stories_model

import lomo_jax

SWEEP = {
    "lora": (1e-3, 5e-3, 2e-2, 5e-2),  # the factors' AdamW rate; the base frozen
    "lomo": (3e-2, 1e-1, 3e-1),
    "adalomo": (2e-3, 1e-2, 5e-2),
    "adamw": (1e-3, 3e-3, 1e-2),
}
BATCH, SEQ = 8, 256  # bf16_quality.run's


def peak(cfg, method: str) -> int:
    from lomo_jax.memory import analyze

    return analyze(cfg, method, BATCH, SEQ)["peak_bytes"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", default="1,2,4,8", help="LoRA ranks (on q_proj, v_proj)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    start()
    from lomo_jax.lora import LoraConfig
    from lomo_jax.state import NonFiniteError

    rows = []
    with stories_model() as (tmp, model):
        cfg = lomo_jax.from_pretrained(model).config
        n = 0
        bases = {}  # optimizer: the full-parameter run's {lr: loss}

        def best(label, optimizer, method, mcfg, rank=0, lora_lr=None):
            """The run of the sweep's best rate (the factors' for plain LoRA)."""
            nonlocal n
            losses = {}
            rates = SWEEP["lora" if optimizer == "none" else optimizer]
            if lora_lr:
                rates = sorted(sorted(bases[optimizer], key=bases[optimizer].get)[:2])
            for lr in rates:
                n += 1
                kw = {"lora_rank": rank} if rank else {}
                if optimizer == "none":
                    kw["lora_lr"], lr_base = lr, 0.0
                else:
                    lr_base = lr
                    kw.update({"lora_lr": lora_lr} if lora_lr else {})
                try:
                    losses[lr] = run(
                        model,
                        tmp / f"run{n}",
                        optimizer,
                        "float32",
                        "nearest",
                        a.steps,
                        lr=lr_base,
                        **kw,
                    )
                except NonFiniteError:  # a rate above the sweep's best may diverge
                    losses[lr] = math.inf
            lr = min(losses, key=losses.get)
            if not rank:
                bases[optimizer] = losses
            rows.append(
                {
                    "method": label,
                    "rank": rank,
                    "lr": lr,
                    "lora_lr": lr if optimizer == "none" else lora_lr,
                    "eval_loss": round(losses[lr], 4),
                    "sweep": {str(k): round(v, 4) for k, v in losses.items()},
                    "peak_bytes": peak(mcfg, method),
                }
            )
            return lr

        for label, optimizer in (("LOMO", "lomo"), ("AdaLomo", "adalomo"), ("AdamW", "adamw")):
            best(label, optimizer, optimizer if optimizer == "adamw" else f"fused-{optimizer}", cfg)
        for rank in map(int, a.ranks.split(",")):
            lcfg = cfg.replace(lora=LoraConfig(rank))
            lora_lr = best("LoRA", "none", "lora", lcfg, rank)
            best("LoRA + LOMO", "lomo", "fused-lomo", lcfg, rank, lora_lr)
            best("AdaLomo + LoRA", "adalomo", "fused-adalomo", lcfg, rank, lora_lr)
    if a.json:
        print(json.dumps(rows))
        return
    print(f"stories260K, Alpaca, {a.steps} steps, batch {BATCH} x {SEQ}, float32")
    head = ("method", "rank", "lr", "LoRA lr", "val loss", "peak MB")
    print("{:16s} {:>4s} {:>8s} {:>8s} {:>9s} {:>8s}".format(*head))
    for r in rows:
        lr = "" if r["method"] == "LoRA" else f"{r['lr']:g}"
        lora_lr = f"{r['lora_lr']:g}" if r["lora_lr"] else ""
        print(
            f"{r['method']:16s} {r['rank'] or '':>4} {lr:>8s} {lora_lr:>8s} "
            f"{r['eval_loss']:9.4f} {r['peak_bytes'] / 1e6:8.1f}"
        )


if __name__ == "__main__":
    main()
