"""Random checkpoints in every source format, written tensor by tensor: the demo's embedded
default model, and the fixtures of tests and benchmarks (no download needed)."""

from __future__ import annotations

import base64
import itertools
import json
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from convert import torch_pickles
from convert.layout import hf_to_meta_rows, slots
from convert.sources import LLAMA3_VOCAB, META_SPLIT_AXIS, META_TO_HF
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


# Meta names, inverted from the reader's table.
_HF_TO_META = {hf: meta for meta, hf in META_TO_HF.items()}


def _meta_name(name: str) -> str:
    if name == "model.embed_tokens.weight":
        return "tok_embeddings.weight"
    if name == "model.norm.weight":
        return "norm.weight"
    if name == "lm_head.weight":
        return "output.weight"
    _, _, i, *rest = name.split(".")
    return f"layers.{i}.{_HF_TO_META['.'.join(rest[:-1])]}.weight"


def _meta_rows(name: str, a: np.ndarray, cfg: LlamaConfig) -> np.ndarray:
    """HF q/k rows back to Meta's adjacent-pair RoPE order; other tensors as they are."""
    if name.endswith("self_attn.q_proj.weight"):
        return hf_to_meta_rows(a, cfg.num_attention_heads)
    if name.endswith("self_attn.k_proj.weight"):
        return hf_to_meta_rows(a, cfg.num_key_value_heads)
    return a


def write_meta(
    out: Path,
    cfg: LlamaConfig,
    tensors: Iterator[tuple[str, np.ndarray]],
    n_shards: int = 1,
    multiple_of: int = 256,
    ffn_dim_multiplier: float | None = None,
) -> Path:
    """Meta's original layout as each release wrote it, split over `n_shards` model-parallel files.

    Llama 1/2 (vocab below 128000) split the embedding on dim 1 and carry the `rope.freqs`
    buffer; Llama 3 splits it on dim 0 and marks 3.1+ RoPE scaling with `use_scaled_rope`; a tied
    model (Llama 3.2) stores `output.weight` as the embedding's own storage."""
    import torch

    llama3 = cfg.vocab_size >= LLAMA3_VOCAB
    if cfg.tie_word_embeddings and n_shards > 1 and not llama3:
        raise ValueError("a tied Llama 1/2 embedding and output split on different axes")
    split = dict(META_SPLIT_AXIS, tok_embeddings=0 if llama3 else 1)
    out.mkdir(parents=True, exist_ok=True)
    parts: list[dict] = [{} for _ in range(n_shards)]
    for name, a in tensors:
        meta = _meta_name(name)
        a = _meta_rows(name, a, cfg)
        axis = split.get(meta.split(".")[-2])
        pieces = np.split(a, n_shards, axis=axis) if axis is not None else [a] * n_shards
        for part, piece in zip(parts, pieces):
            part[meta] = torch_pickles.from_numpy(np.ascontiguousarray(piece)).clone()
    for part in parts:
        if cfg.tie_word_embeddings:
            part["output.weight"] = part["tok_embeddings.weight"]
        if not llama3:
            k = cfg.head_dim
            part["rope.freqs"] = torch.from_numpy(
                1.0 / cfg.rope_theta ** (np.arange(0, k, 2, dtype=np.float32) / k)
            )
    for k, part in enumerate(parts):
        torch.save(part, out / f"consolidated.{k:02d}.pth")
    # Only the keys each release wrote: Llama 1/2 leave the vocabulary to the tokenizer (-1).
    params = {
        "dim": cfg.hidden_size,
        "n_layers": cfg.num_hidden_layers,
        "n_heads": cfg.num_attention_heads,
        "multiple_of": multiple_of,
        "norm_eps": cfg.rms_norm_eps,
        "vocab_size": cfg.vocab_size if llama3 else -1,
    }
    if cfg.num_key_value_heads != cfg.num_attention_heads:
        params["n_kv_heads"] = cfg.num_key_value_heads
    if ffn_dim_multiplier is not None:
        params["ffn_dim_multiplier"] = ffn_dim_multiplier
    if llama3 or cfg.rope_theta != 10000.0:
        params["rope_theta"] = cfg.rope_theta
    if (cfg.rope_scaling or {}).get("rope_type") == "llama3":
        params["use_scaled_rope"] = True
    (out / "params.json").write_text(json.dumps(params))
    return out


def write_tiktoken_bpe(path: Path, n_tokens: int = 128000, seed: int = 0) -> Path:
    """A byte-level BPE in tiktoken's format (Llama 3's `tokenizer.model`: `base64(token) rank`
    lines): the 256 bytes, every lowercase word of 1-3 letters with and without a leading space,
    then random 4-letter ones; each token is an earlier token plus one letter, so BPE reaches it."""
    rng = np.random.default_rng(seed)
    letters = [bytes([c]) for c in range(ord("a"), ord("z") + 1)]

    def words(k: int) -> list[bytes]:
        return [b"".join(t) for t in itertools.product(letters, repeat=k)]

    tokens = [bytes([b]) for b in range(256)]
    for k in (1, 2, 3):
        tokens += (words(k) if k > 1 else []) + [b" " + w for w in words(k)]
    four = words(4)
    chosen = rng.choice(2 * len(four), n_tokens - len(tokens), replace=False)
    tokens += [(b" " if i >= len(four) else b"") + four[i % len(four)] for i in sorted(chosen)]
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r for r, t in enumerate(tokens)))
    return path


def _q80(w: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """llama2.c's Q8_0: symmetric int8 per group of `group_size`, scale = max |w| / 127."""
    groups = w.astype(np.float32).reshape(-1, group_size)
    scale = np.abs(groups).max(axis=1) / np.float32(127.0)
    return np.round(groups / scale[:, None]).astype(np.int8), scale


def write_llama2c(
    path: Path,
    cfg: LlamaConfig,
    tensors: Iterator[tuple[str, np.ndarray]],
    version: int = 1,
    group_size: int = 64,
) -> Path:
    """llama2.c's `export.py --version 1` (float32) or `--version 2` (Q8_0) file: a 256-byte
    header (magic "ak42", version, 7 ints, shared-classifier byte, v2: group size), the norms in
    float32, then the matrices layer by layer in Meta's row order (v2: each one's int8 values
    followed by its float32 group scales)."""
    w = {_meta_name(n): _meta_rows(n, a, cfg) for n, a in tensors}
    L = range(cfg.num_hidden_layers)

    def stack(kind: str) -> np.ndarray:
        return np.stack([w[f"layers.{i}.{kind}.weight"] for i in L])

    norms = [stack("attention_norm"), stack("ffn_norm"), w["norm.weight"]]
    matrices = [w["tok_embeddings.weight"]] + [
        stack(k)
        for k in ("attention.wq", "attention.wk", "attention.wv", "attention.wo")
        + ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
    ]
    shared = cfg.tie_word_embeddings
    if not shared:
        matrices.append(w["output.weight"])
    header = struct.pack("<Ii", 0x616B3432, version) + struct.pack(
        "<7i",
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_hidden_layers,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.vocab_size,
        cfg.max_position_embeddings,
    )
    header += struct.pack("<B", int(shared)) + (
        struct.pack("<i", group_size) if version == 2 else b""
    )
    body = [a.astype("<f4").tobytes() for a in norms]
    for a in matrices:
        if version == 1:
            body.append(a.astype("<f4").tobytes())
            continue
        for m in a if a.ndim == 3 else [a]:  # each layer's int8 values, then its scales
            q, scale = _q80(m, group_size)
            body += [q.tobytes(), scale.astype("<f4").tobytes()]
    path.write_bytes(header.ljust(256, b"\0") + b"".join(body))
    return path
