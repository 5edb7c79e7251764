"""`lomo-jax demo`: the whole loop on a model the command builds itself, no download needed."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from lomo_jax.config import LlamaConfig

log = logging.getLogger("lomo_jax")

DEMO_CONFIG = LlamaConfig(
    vocab_size=256,
    hidden_size=128,
    intermediate_size=352,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)


def run_demo(out: str | Path) -> None:
    import torch
    import transformers

    from convert import export_hf, import_checkpoint
    from convert.synthetic import random_hf_tensors, write_hf
    from lomo_jax.pretrained import from_pretrained

    out = Path(out)
    cfg = DEMO_CONFIG
    hf_src = write_hf(out / "hf-source", cfg, random_hf_tensors(cfg, seed=0))
    log.info("built a random %.1fM-parameter LLaMA in %s", cfg.num_params / 1e6, hf_src)
    import_checkpoint(hf_src, out / "lomo-jax", overwrite=True)
    export_hf(out / "lomo-jax", out / "hf-export", overwrite=True)
    log.info("imported to %s and exported back to %s", out / "lomo-jax", out / "hf-export")

    prompt = [[cfg.bos_token_id, 17, 42, 99]]
    ours = from_pretrained(out / "lomo-jax").generate(prompt, 16)[0]
    hf = transformers.LlamaForCausalLM.from_pretrained(out / "hf-export", dtype=torch.float32)
    with torch.no_grad():
        theirs = hf.generate(torch.tensor(prompt), max_new_tokens=16, do_sample=False)[0, 4:]
    print(f"lomo-jax greedy tokens:     {ours}")
    print(f"transformers greedy tokens: {theirs.tolist()}")
    print("identical" if list(np.asarray(ours)) == theirs.tolist() else "DIFFERENT")
