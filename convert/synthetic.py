"""Random checkpoints in every source format, written tensor by tensor: the demo's embedded
default model, and the fixtures of tests and benchmarks (no download needed)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from convert.layout import hf_to_meta_rows, slots
from convert.sources import META_SPLIT_AXIS, META_TO_HF, numpy_to_torch
from lomo_jax.config import LlamaConfig


def random_hf_tensors(
    cfg: LlamaConfig, seed: int = 0, dtype=np.float32, std: float = 0.02
) -> Iterator[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    for s in slots(cfg):
        if s.hf_name.endswith("norm.weight"):
            a = 1.0 + 0.1 * rng.standard_normal(s.hf_shape, np.float32)
        else:
            a = std * rng.standard_normal(s.hf_shape, np.float32)
        yield s.hf_name, a.astype(dtype)


# Meta names and model-parallel split axes, inverted from the reader's tables (Llama 1/2 layout).
_HF_TO_META = {hf: meta for meta, hf in META_TO_HF.items()}
_SPLIT = dict(META_SPLIT_AXIS, tok_embeddings=1)


def write_meta(
    out: Path,
    cfg: LlamaConfig,
    tensors: Iterator[tuple[str, np.ndarray]],
    n_shards: int = 1,
    multiple_of: int = 256,
    ffn_dim_multiplier: float | None = None,
) -> Path:
    """Meta's original layout, split over `n_shards` model-parallel files like Llama 1/2."""
    import torch

    out.mkdir(parents=True, exist_ok=True)
    parts: list[dict] = [{} for _ in range(n_shards)]
    for name, a in tensors:
        if name == "model.embed_tokens.weight":
            meta = "tok_embeddings.weight"
        elif name == "model.norm.weight":
            meta = "norm.weight"
        elif name == "lm_head.weight":
            meta = "output.weight"
        else:
            _, _, i, *rest = name.split(".")
            module = ".".join(rest[:-1])
            meta = f"layers.{i}.{_HF_TO_META[module]}.weight"
            if module == "self_attn.q_proj":
                a = hf_to_meta_rows(a, cfg.num_attention_heads)
            elif module == "self_attn.k_proj":
                a = hf_to_meta_rows(a, cfg.num_key_value_heads)
        axis = _SPLIT.get(meta.split(".")[-2])
        pieces = np.split(a, n_shards, axis=axis) if axis is not None else [a] * n_shards
        for part, piece in zip(parts, pieces):
            part[meta] = numpy_to_torch(np.ascontiguousarray(piece)).clone()
    for k, part in enumerate(parts):
        torch.save(part, out / f"consolidated.{k:02d}.pth")
    params = {
        "dim": cfg.hidden_size,
        "n_layers": cfg.num_hidden_layers,
        "n_heads": cfg.num_attention_heads,
        "n_kv_heads": cfg.num_key_value_heads,
        "multiple_of": multiple_of,
        "ffn_dim_multiplier": ffn_dim_multiplier,
        "norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "vocab_size": cfg.vocab_size,
    }
    (out / "params.json").write_text(json.dumps(params))
    return out
