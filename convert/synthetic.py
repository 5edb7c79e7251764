"""Random checkpoints in every source format, written tensor by tensor: the demo's embedded
default model, and the fixtures of tests and benchmarks (no download needed)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from convert.layout import hf_to_meta_rows, slots
from convert.sources import numpy_to_torch
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


def write_hf(
    out: Path,
    cfg: LlamaConfig,
    tensors: Iterator[tuple[str, np.ndarray]],
    max_shard_bytes: int | None = None,
    fmt: str = "safetensors",
) -> Path:
    """A Hugging Face directory; sharded with an index when `max_shard_bytes` is exceeded."""
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict] = [{}]
    size = 0
    for name, a in tensors:
        if max_shard_bytes and size + a.nbytes > max_shard_bytes and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][name] = numpy_to_torch(a)
        size += a.nbytes
    n = len(shards)
    stem, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    weight_map = {}
    for k, shard in enumerate(shards):
        fname = f"{stem}.{ext}" if n == 1 else f"{stem}-{k + 1:05d}-of-{n:05d}.{ext}"
        if fmt == "safetensors":
            save_file(shard, out / fname, metadata={"format": "pt"})
        else:
            torch.save(shard, out / fname)
        weight_map.update(dict.fromkeys(shard, fname))
    if n > 1:
        index = {"metadata": {}, "weight_map": weight_map}
        (out / f"{stem}.{ext}.index.json").write_text(json.dumps(index))
    dtype = next(iter(shards[0].values())).dtype
    hf_cfg = dict(cfg.to_hf_dict(), torch_dtype=str(dtype).removeprefix("torch."))
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    return out


_HF_TO_META = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
_SPLIT = {
    "wq": 0,
    "wk": 0,
    "wv": 0,
    "w1": 0,
    "w3": 0,
    "output": 0,
    "wo": 1,
    "w2": 1,
    "tok_embeddings": 1,
}


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
