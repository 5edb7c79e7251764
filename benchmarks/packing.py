"""Packing on chat data: padding and tokens/s of the fused AdaLomo step on rows holding one
conversation each, against rows packed best-fit decreasing (`--pack`); one process, same model,
the two timed in turns.

    python benchmarks/packing.py [--seq-len 1024] [--batch-size 4] [--steps 3] [--json]

Data: the Alpaca-derived conversations of ../shared/data/chat/alpaca_messages_1k.jsonl (--data),
rendered with examples/chat_template.jinja and tokenized with stories260K's 512-piece
SentencePiece vocabulary (tok512.model), exactly as `lomo-jax train --format chat` makes its rows.
Model: a random LLaMA (hidden 512, 8 layers, vocab 512, ~25M parameters), float32. Padding is
over the whole data; tokens/s over `--steps` batches drawn as training draws them (seed 0),
after an untimed first step: "positions" counts every row position, "tokens" only the
conversations' own tokens, which is what an epoch is made of.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import lomo_jax
from lomo_jax.config import LlamaConfig

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
CONFIG = LlamaConfig(
    vocab_size=512,
    hidden_size=512,
    intermediate_size=1376,
    num_hidden_layers=8,
    num_attention_heads=8,
    max_position_embeddings=4096,
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(DATA / "chat" / "alpaca_messages_1k.jsonl"))
    p.add_argument("--tokenizer", default=str(DATA / "llama2c" / "tok512.model"))
    p.add_argument("--chat-template", default=str(ROOT / "examples" / "chat_template.jinja"))
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    lomo_jax.configure()  # as the CLI, before JAX starts

    import jax
    import jax.numpy as jnp

    from lomo_jax.data import DataOptions, build_rows
    from lomo_jax.model import init_params
    from lomo_jax.tokenizer import load_tokenizer
    from lomo_jax.train import batch_indices
    from lomo_jax.train_step import StepOptions, make_train_step

    tok = load_tokenizer(a.tokenizer)
    options = DataOptions("left", chat_template=a.chat_template)
    rows = {
        "unpacked": build_rows("chat", a.data, tok, a.seq_len, options=options),
        "packed": build_rows(
            "chat", a.data, tok, a.seq_len, options=dataclasses.replace(options, pack=True)
        ),
    }
    init, step = make_train_step(StepOptions("adalomo"), CONFIG)
    params = init_params(CONFIG, jax.random.key(0), jnp.float32)
    states = {k: init(jax.tree.map(jnp.array, params)) for k in rows}
    batches = {
        k: [
            r.take(batch_indices(len(r), a.batch_size, s, True, 0)).batch()
            for s in range(a.steps + 1)
        ]
        for k, r in rows.items()
    }
    seconds = {k: 0.0 for k in rows}
    for s in range(a.steps + 1):  # step 0 compiles
        for k in rows:
            t0 = time.perf_counter()
            states[k], m = step(states[k], batches[k][s])
            jax.block_until_ready(m["loss"])
            seconds[k] += (time.perf_counter() - t0) if s else 0.0
    results = []
    for k, r in rows.items():
        timed = batches[k][1:]
        per_step = seconds[k] / a.steps
        results.append(
            {
                "rows": k,
                "n_rows": len(r),
                "padding": float((r.segment_ids == 0).mean()),
                "positions_per_s": a.steps * a.batch_size * a.seq_len / seconds[k],
                "tokens_per_s": sum(int((b.segment_ids != 0).sum()) for b in timed) / seconds[k],
                "epoch_s": len(r) / a.batch_size * per_step,
            }
        )
    if a.json:
        print(json.dumps(results))
        return
    print(f"seq-len {a.seq_len}, batch {a.batch_size}, {a.steps} timed steps each")
    print("| rows | rows per epoch | padding | positions/s | tokens/s | epoch (s) |")
    print("|------|---------------:|--------:|------------:|---------:|----------:|")
    for r in results:
        print(
            f"| {r['rows']} | {r['n_rows']} | {r['padding']:.1%} | {r['positions_per_s']:.0f} "
            f"| {r['tokens_per_s']:.0f} | {r['epoch_s']:.0f} |"
        )


if __name__ == "__main__":
    main()
