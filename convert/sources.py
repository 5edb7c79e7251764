"""Readers for the three checkpoint formats. Each yields tensors under Hugging Face names, one at a
time, so an import never holds more than the destination tree and the tensor in flight."""

from __future__ import annotations

import dataclasses
import json
import re
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

from convert.errors import ConversionError
from convert.layout import meta_to_hf_rows
from lomo_jax.config import LlamaConfig

HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
)


@dataclasses.dataclass
class Source:
    path: Path
    config: LlamaConfig
    tensors: Callable[[], Iterator[tuple[str, str, np.ndarray]]]  # (file, HF name, array)
    tokenizer_files: list[Path]
    dtype: np.dtype


def torch_to_numpy(t) -> np.ndarray:
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def numpy_to_torch(a: np.ndarray):
    import torch

    # torch wants writable memory; copy only what is read-only (mmaps, jax buffers) or strided.
    a = np.ascontiguousarray(a) if a.flags.writeable else np.array(a, order="C")
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _torch_load(path: Path) -> dict:
    import torch

    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except FileNotFoundError:
        raise ConversionError(path, "file not found") from None
    except Exception as e:  # torch raises many types for corrupt or truncated pickles
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConversionError(
            path, f"cannot read PyTorch checkpoint (truncated or corrupt?): {reason}"
        ) from None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ConversionError(path, "file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(path, f"invalid JSON: {e}") from None


def _config(path: Path, make: Callable[[], LlamaConfig]) -> LlamaConfig:
    try:
        return make()
    except (TypeError, ValueError, KeyError) as e:
        raise ConversionError(path, f"invalid config: {e}") from None


# ---- Hugging Face ---------------------------------------------------------------------------
def _hf_weight_files(d: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = d / index_name
        if index.exists():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ConversionError(index, "no 'weight_map' in the index")
            return [d / f for f in sorted(set(weight_map.values()))]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (d / single).exists():
            return [d / single]
    raise ConversionError(d, "no model.safetensors, pytorch_model.bin or index file")


def _safetensors_tensors(f: Path) -> Iterator[tuple[str, np.ndarray]]:
    from safetensors import SafetensorError, safe_open

    if not f.is_file():
        raise ConversionError(f, "file not found")
    try:
        with safe_open(f, framework="pt") as st:
            for name in st.keys():
                yield name, torch_to_numpy(st.get_tensor(name))
    except SafetensorError as e:
        raise ConversionError(
            f, f"cannot read safetensors file (truncated or corrupt?): {e}"
        ) from None


def read_hf(d: Path) -> Source:
    cfg_path = d / "config.json"
    raw = _read_json(cfg_path)
    cfg = _config(cfg_path, lambda: LlamaConfig.from_hf_dict(raw))
    files = _hf_weight_files(d)

    def tensors():
        for f in files:
            if f.suffix == ".safetensors":
                for name, a in _safetensors_tensors(f):
                    yield str(f), name, a
            else:
                for name, t in _torch_load(f).items():
                    yield str(f), name, torch_to_numpy(t)

    dtype = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16}.get(
        raw.get("torch_dtype") or raw.get("dtype"), np.float32
    )
    toks = [d / n for n in HF_TOKENIZER_FILES if (d / n).exists()]
    return Source(d, cfg, tensors, toks, np.dtype(dtype))


# ---- Meta original (params.json + consolidated.NN.pth) --------------------------------------
# Model-parallel split axis of each weight, in torch [out, in] layout; norms are replicated.
META_SPLIT_AXIS = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1}
META_TO_HF = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_META_LAYER = re.compile(r"layers\.(\d+)\.(.+)\.weight")


def _meta_ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def read_meta(d: Path) -> Source:
    params_path = d / "params.json"
    p = _read_json(params_path)
    shards = sorted(d.glob("consolidated.*.pth"))
    if not shards:
        raise ConversionError(d, "no consolidated.*.pth files next to params.json")
    first = _torch_load(shards[0])
    if "tok_embeddings.weight" not in first:
        raise ConversionError(shards[0], "missing tensor 'tok_embeddings.weight'")
    vocab = p.get("vocab_size", -1)
    if vocab is None or vocab <= 0:  # old params.json leave it to the tokenizer
        vocab = first["tok_embeddings.weight"].shape[0]
    n_heads = p.get("n_heads")
    llama3 = vocab >= 128000

    def make():
        return LlamaConfig(
            vocab_size=vocab,
            hidden_size=p["dim"],
            num_hidden_layers=p["n_layers"],
            num_attention_heads=n_heads,
            num_key_value_heads=p.get("n_kv_heads") or n_heads,
            intermediate_size=_meta_ffn_dim(
                p["dim"], p.get("multiple_of", 256), p.get("ffn_dim_multiplier")
            ),
            rms_norm_eps=p.get("norm_eps", 1e-5),
            rope_theta=p.get("rope_theta", 10000.0),
            rope_scaling=(
                {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192,
                }
                if p.get("use_scaled_rope")
                else None
            ),
            bos_token_id=128000 if llama3 else 1,
            eos_token_id=128001 if llama3 else 2,
        )

    cfg = _config(params_path, make)
    split = dict(META_SPLIT_AXIS, tok_embeddings=0 if llama3 else 1)

    def tensors():
        parts = [first] + [_torch_load(s) for s in shards[1:]]
        for name in parts[0]:
            pieces = []
            for shard, part in zip(shards, parts):
                if name not in part:
                    raise ConversionError(
                        shard, f"missing tensor {name!r} (present in {shards[0].name})"
                    )
                pieces.append(torch_to_numpy(part[name]))
            kind = name.split(".")[-2]
            a = (
                pieces[0]
                if len(pieces) == 1 or kind not in split
                else np.concatenate(pieces, axis=split[kind])
            )
            yield str(shards[0]), *_meta_to_hf(name, a, cfg)

    tok = d / "tokenizer.model"
    if not tok.exists():
        tok = d.parent / "tokenizer.model"
    dtype = torch_to_numpy(first["tok_embeddings.weight"].flatten()[:1]).dtype
    return Source(d, cfg, tensors, [tok] if tok.exists() else [], dtype)


def _meta_to_hf(name: str, a: np.ndarray, cfg: LlamaConfig) -> tuple[str, np.ndarray]:
    if name == "tok_embeddings.weight":
        return "model.embed_tokens.weight", a
    if name == "norm.weight":
        return "model.norm.weight", a
    if name == "output.weight":
        return "lm_head.weight", a
    m = _META_LAYER.fullmatch(name)
    if m is None or m.group(2) not in META_TO_HF:
        return name, a  # unknown: TreeBuilder reports it by name
    i, kind = m.groups()
    if kind == "attention.wq":
        a = meta_to_hf_rows(a, cfg.num_attention_heads)
    elif kind == "attention.wk":
        a = meta_to_hf_rows(a, cfg.num_key_value_heads)
    return f"model.layers.{i}.{META_TO_HF[kind]}.weight", a


# ---- llama2.c (.bin, legacy header) ---------------------------------------------------------
_L2C_HEADER = struct.Struct("<7i")


def read_llama2c(f: Path, tokenizer: Path | None) -> Source:
    if not f.is_file():
        raise ConversionError(f, "file not found")
    with open(f, "rb") as fh:
        header = fh.read(_L2C_HEADER.size)
    if len(header) < _L2C_HEADER.size:
        raise ConversionError(f, "file too short for a llama2.c header")
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = _L2C_HEADER.unpack(header)
    if min(dim, hidden, n_layers, n_heads, n_kv, seq_len) <= 0 or vocab == 0:
        raise ConversionError(
            f, f"not a llama2.c checkpoint (header {dim, hidden, n_layers, n_heads})"
        )
    shared = vocab > 0
    vocab = abs(vocab)
    cfg = _config(
        f,
        lambda: LlamaConfig(
            vocab_size=vocab,
            hidden_size=dim,
            intermediate_size=hidden,
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=n_kv,
            rms_norm_eps=1e-5,
            max_position_embeddings=seq_len,
            tie_word_embeddings=shared,
        ),
    )
    kv = n_kv * (dim // n_heads)
    L = n_layers
    # (name, shape); HF names are attached after slicing per layer.
    layout = [
        ("embed", (vocab, dim)),
        ("rms_att", (L, dim)),
        ("wq", (L, dim, dim)),
        ("wk", (L, kv, dim)),
        ("wv", (L, kv, dim)),
        ("wo", (L, dim, dim)),
        ("rms_ffn", (L, dim)),
        ("w1", (L, hidden, dim)),
        ("w2", (L, dim, hidden)),
        ("w3", (L, hidden, dim)),
        ("rms_final", (dim,)),
    ]
    head_dim = dim // n_heads
    rope_tables = 2 * seq_len * (head_dim // 2)
    n_floats = sum(int(np.prod(s)) for _, s in layout) + rope_tables
    if not shared:
        layout.append(("wcls", (vocab, dim)))
        n_floats += vocab * dim
    expected = _L2C_HEADER.size + 4 * n_floats
    size = f.stat().st_size
    if size != expected:
        raise ConversionError(
            f,
            f"file is {size} bytes, the header implies {expected} "
            f"({'truncated' if size < expected else 'trailing data'})",
        )
    names = {
        "rms_att": "input_layernorm",
        "wq": "self_attn.q_proj",
        "wk": "self_attn.k_proj",
        "wv": "self_attn.v_proj",
        "wo": "self_attn.o_proj",
        "rms_ffn": "post_attention_layernorm",
        "w1": "mlp.gate_proj",
        "w2": "mlp.down_proj",
        "w3": "mlp.up_proj",
    }

    def tensors():
        data = np.memmap(f, dtype="<f4", mode="r", offset=_L2C_HEADER.size)
        offset = 0
        for key, shape in layout:
            n = int(np.prod(shape))
            a = np.asarray(data[offset : offset + n]).reshape(shape)
            offset += n
            if key == "rms_final":
                offset += rope_tables  # the legacy freq_cis tables sit between rms_final and wcls
            if key == "embed":
                yield str(f), "model.embed_tokens.weight", a
            elif key == "rms_final":
                yield str(f), "model.norm.weight", a
            elif key == "wcls":
                yield str(f), "lm_head.weight", a
            else:
                for i in range(L):
                    w = a[i]
                    if key == "wq":
                        w = meta_to_hf_rows(w, n_heads)
                    elif key == "wk":
                        w = meta_to_hf_rows(w, n_kv)
                    yield str(f), f"model.layers.{i}.{names[key]}.weight", w

    toks = [tokenizer] if tokenizer else []
    return Source(f, cfg, tensors, toks, np.dtype(np.float32))


def detect(path: str | Path, tokenizer: str | Path | None = None) -> Source:
    """Reads the config of whatever checkpoint `path` is; tensors are read lazily."""
    p = Path(path)
    if not p.exists():
        raise ConversionError(p, "no such file or directory")
    tok = Path(tokenizer) if tokenizer else None
    if tok is not None and not tok.exists():
        raise ConversionError(tok, "tokenizer not found")
    if p.is_file():
        src = read_llama2c(p, tok)
    elif (p / "params.json").exists():
        src = read_meta(p)
    elif (p / "config.json").exists():
        src = read_hf(p)
    else:
        raise ConversionError(
            p,
            "not a checkpoint: expected config.json (Hugging Face), "
            "params.json (Meta) or a llama2.c .bin file",
        )
    if tok is not None:
        src.tokenizer_files = _tokenizer_files(tok)
    return src


def _tokenizer_files(tok: Path) -> list[Path]:
    if tok.is_dir():
        files = [tok / n for n in HF_TOKENIZER_FILES if (tok / n).exists()]
        if not files:
            raise ConversionError(tok, "no tokenizer.json or tokenizer.model in this directory")
        return files
    return [tok]
