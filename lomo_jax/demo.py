"""`lomo-jax demo`: the whole product on an embedded default, with nothing downloaded.

It builds a small random LLaMA and a task it generates itself -- arithmetic progressions of
digits (start and stride drawn per row: "3 5 7 9 1 3 ..."), where every token after the second
is predictable -- fine-tunes the model with AdaLomo and with LOMO through `lomo-jax train`, reports
loss and next-token accuracy before and after, plans the fused step's memory next to AdamW's, and
writes both loss curves to one plot. A few minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from lomo_jax.atomic import OutputExistsError, check_free, discard
from lomo_jax.compiler import jit
from lomo_jax.config import LlamaConfig
from lomo_jax.lock import claim
from lomo_jax.presets import preset

log = logging.getLogger("lomo_jax")

DEMO_CONFIG = LlamaConfig(
    vocab_size=16,
    hidden_size=128,
    intermediate_size=352,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    bos_token_id=None,
    eos_token_id=None,
)
SEQ_LEN, STEPS, BATCH = 32, 150, 16
# What a demo writes in its --out: a directory holding anything else is not a demo's to replace.
OUTPUTS = ("hf-source", "base", "train.jsonl", "adalomo", "lomo", "loss.png")


def progressions(n: int, seed: int) -> np.ndarray:
    """Rows of digits d_t = (start + t * stride) mod 10."""
    rng = np.random.default_rng(seed)
    start = rng.integers(0, 10, (n, 1))
    stride = rng.integers(1, 10, (n, 1))
    return ((start + np.arange(SEQ_LEN)[None, :] * stride) % 10).astype(np.int32)


def next_token_accuracy(cfg: LlamaConfig, params, rows: np.ndarray) -> float:
    """How often the argmax predicts the next digit, from the third on (the first two are free)."""
    from lomo_jax.model import forward

    logits = np.asarray(jit(forward, static_argnums=0)(cfg, params, rows))
    return float((logits[:, 1:-1].argmax(-1) == rows[:, 2:]).mean())


def run_demo(out: str | Path) -> None:
    """The demo, written to `out` (claimed first; a previous demo's output there is replaced,
    anything else is refused)."""
    with claim(out, "demo") as path:
        _clear(path)
        _run(Path(out))


def _clear(out: Path) -> None:
    """Removes a previous demo's output from `out`; refuses a directory holding anything else."""
    if not out.exists():
        return
    names = {p.name for p in out.iterdir()} if out.is_dir() else {None}
    if not names <= set(OUTPUTS):
        raise OutputExistsError(
            f"{out}: already exists and is not a demo's output; give the demo another --out"
        )
    check_free(out, overwrite=True)
    discard(out)


def _run(out: Path) -> None:
    from convert import import_checkpoint
    from convert.export import write_hf
    from convert.synthetic import random_hf_tensors
    from lomo_jax.memory import analyze
    from lomo_jax.pretrained import from_pretrained
    from lomo_jax.progress import plot_losses
    from lomo_jax.train import TrainConfig, train

    cfg = DEMO_CONFIG
    write_hf(out / "hf-source", cfg, random_hf_tensors(cfg, seed=0))
    import_checkpoint(out / "hf-source", out / "base")
    with open(out / "train.jsonl", "w") as f:
        for row in progressions(2048, seed=1):
            f.write(json.dumps({"input_ids": row.tolist()}) + "\n")
    held_out = progressions(256, seed=2)
    base = from_pretrained(out / "base")
    acc0 = next_token_accuracy(cfg, base.params, held_out)
    print(f"random {cfg.num_params / 1e6:.2f}M-parameter LLaMA: next-digit accuracy {acc0:.1%}")

    results, histories = {}, {}
    for optimizer, lr in (("adalomo", 1e-2), ("lomo", 3e-2)):
        run = out / optimizer
        history = train(
            TrainConfig(
                model=str(out / "base"),
                data=str(out / "train.jsonl"),
                out=str(run),
                optimizer=optimizer,
                lr=lr,
                steps=STEPS,
                batch_size=BATCH,
                seq_len=SEQ_LEN,
                schedule="cosine",
                warmup_steps=10,
                clip_grad_norm=1.0,
                eval_fraction=0.1,
                eval_every=50,
            )
        )
        histories[optimizer] = history
        losses = [m["loss"] for m in history if "loss" in m]
        acc = next_token_accuracy(cfg, from_pretrained(run).params, held_out)
        results[optimizer] = (losses[0], losses[-1], acc)
    print(f"\n{'optimizer':10s} {'first loss':>10s} {'last loss':>10s} {'accuracy':>9s}")
    for name, (first, last, acc) in results.items():
        print(f"{name:10s} {first:10.3f} {last:10.3f} {acc:9.1%}")

    print("\nmemory of one training step (compile-time plan, float32):")
    for label, model_cfg, b, t in (
        ("demo model", cfg, BATCH, SEQ_LEN),
        ("LLaMA-7B", preset("llama-7b"), 1, 512),
    ):
        rows = [analyze(model_cfg, m, b, t) for m in ("fused-adalomo", "adamw")]
        text = "   ".join(
            f"{r['method']} {r['peak_bytes'] / 1e9:.2f} GB ({r['peak_over_params']:.2f} x params)"
            for r in rows
        )
        print(f"  {label:10s} batch {b} x {t}: {text}")
    plot_losses(
        out / "loss.png",
        histories,
        "lomo-jax demo: fine-tuning a small LLaMA on digit progressions",
    )
    print(f"\nloss curves: {out / 'loss.png'}; models: {out / 'adalomo'}, {out / 'lomo'}")
