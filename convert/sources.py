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

from convert import safetensors_file, torch_pickles
from convert.errors import ConversionError
from convert.layout import meta_to_hf_rows
from lomo_jax.config import LlamaConfig
from lomo_jax.inputs import SMALL_FILE, number_problem, read_text
from lomo_jax.tokenizer import tokenizer_files


@dataclasses.dataclass
class Source:
    path: Path
    config: LlamaConfig
    tensors: Callable[[], Iterator[tuple[str, str, np.ndarray]]]  # (file, HF name, array)
    tokenizer_files: list[Path]
    dtype: np.dtype
    weight_files: list[Path]  # what holds the tensors

    def check_size(self) -> None:
        """The config describes no more parameters than the weight files can hold (a byte each
        at least): an edited config.json is refused before its tree is allocated."""
        held = sum(f.stat().st_size for f in self.weight_files if f.is_file())
        if self.config.num_params > held:
            raise ConversionError(
                self.path,
                f"its config describes {self.config.num_params:,} parameters, more than its "
                f"weight files hold ({held:,} bytes)",
            )


def _read_json(path: Path) -> dict:
    if not path.exists():
        raise ConversionError(path, "file not found")
    text = read_text(path, SMALL_FILE)  # a regular file, UTF-8, of a config's size
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConversionError(path, f"invalid JSON: {e}") from None
    except RecursionError:
        raise ConversionError(
            path, "invalid JSON: nested deeper than a JSON reader follows"
        ) from None
    except ValueError as e:
        raise ConversionError(path, f"invalid JSON: {number_problem(e)}") from None


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


def read_hf_config(path: Path) -> LlamaConfig:
    """A Hugging Face config.json (no weights needed); a bad one is an error naming it."""
    raw = _read_json(path)
    return _config(path, lambda: LlamaConfig.from_hf_dict(raw))


def read_hf(d: Path) -> Source:
    cfg_path = d / "config.json"
    raw = _read_json(cfg_path)
    cfg = read_hf_config(cfg_path)
    files = _hf_weight_files(d)

    def tensors():
        for f in files:
            if f.suffix == ".safetensors":
                for name, a in safetensors_file.read(f):
                    yield str(f), name, a
            else:
                for name, t in torch_pickles.load(f).items():
                    yield str(f), name, torch_pickles.to_numpy(t)

    dtype = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16}.get(
        raw.get("torch_dtype") or raw.get("dtype"), np.float32
    )
    return Source(d, cfg, tensors, tokenizer_files(d), np.dtype(dtype), files)


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
META_BUFFERS = {"rope.freqs"}  # Llama 1/2's RoPE table: recomputed from the config
LLAMA3_VOCAB = 128000  # Llama 3's tiktoken vocabulary; Llama 1/2 have 32000
# The context and end-of-sequence ids transformers' convert_llama_weights_to_hf.py writes for each
# release (--llama_version); Llama 3 stops at <|end_of_text|>, <|eom_id|> and <|eot_id|>.
META_CONTEXT = {"1": 2048, "2": 4096, "3": 8192, "3.1": 131072, "3.2": 131072}
LLAMA3_EOS = [128001, 128008, 128009]


def meta_release(p: dict, vocab: int, tied: bool) -> str:
    """The Llama release a params.json comes from (it does not say): 3.1 and later mark their
    scaled RoPE, of those only 3.2 (1B, 3B) ties the output to the embedding, Llama 3 has a 128k
    vocabulary, and Llama 2 normalizes with eps 1e-5 where LLaMA-1 used 1e-6."""
    if p.get("use_scaled_rope"):
        return "3.2" if tied else "3.1"
    if vocab >= LLAMA3_VOCAB:
        return "3"
    return "1" if p.get("norm_eps", 1e-5) < 1e-5 else "2"


def _meta_tied(first: dict) -> bool:
    """A tied model's state dict holds `output.weight` equal to (saved as) the embedding."""
    import torch

    out, emb = first.get("output.weight"), first["tok_embeddings.weight"]
    return out is not None and torch.equal(out[:1], emb[:1]) and torch.equal(out, emb)


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
    first = torch_pickles.load(shards[0])
    if "tok_embeddings.weight" not in first:
        raise ConversionError(shards[0], "missing tensor 'tok_embeddings.weight'")
    vocab = p.get("vocab_size", -1)
    if vocab is None or vocab <= 0:  # old params.json leave it to the tokenizer
        vocab = first["tok_embeddings.weight"].shape[0]
    n_heads = p.get("n_heads")
    tied = _meta_tied(first)

    def make():
        release = meta_release(p, vocab, tied)
        llama3 = release.startswith("3")
        theta = p.get("rope_theta", 10000.0)
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
            rope_theta=theta,
            rope_scaling=(
                {
                    "rope_type": "llama3",
                    "factor": 32.0 if release == "3.2" else 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192,
                }
                if release in ("3.1", "3.2")
                else None
            ),
            # Code Llama (Llama 2 with a larger rope_theta) reads 16k tokens.
            max_position_embeddings=16384
            if theta > 10000 and not llama3
            else META_CONTEXT[release],
            tie_word_embeddings=tied,
            bos_token_id=128000 if llama3 else 1,
            eos_token_id=LLAMA3_EOS if llama3 else 2,
        )

    cfg = _config(params_path, make)
    split = dict(META_SPLIT_AXIS, tok_embeddings=0 if vocab >= LLAMA3_VOCAB else 1)

    def tensors():
        parts = [first] + [torch_pickles.load(s) for s in shards[1:]]
        for name in parts[0]:
            if name in META_BUFFERS:
                continue
            pieces = []
            for shard, part in zip(shards, parts):
                if name not in part:
                    raise ConversionError(
                        shard, f"missing tensor {name!r} (present in {shards[0].name})"
                    )
                pieces.append(torch_pickles.to_numpy(part[name]))
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
    dtype = torch_pickles.to_numpy(first["tok_embeddings.weight"].flatten()[:1]).dtype
    return Source(d, cfg, tensors, [tok] if tok.exists() else [], dtype, shards)


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


# ---- llama2.c (.bin: the legacy format, or export.py --version 1 / 2) -------------------------
_L2C_PARAMS = struct.Struct("<7i")  # dim, hidden, layers, heads, kv heads, vocab, max seq len
_L2C_MAGIC = 0x616B3432  # "ak42", then the version: the 256-byte header of versions 1 and 2
_L2C_HEADER_BYTES = 256
_L2C_NAMES = {
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


@dataclasses.dataclass(frozen=True)
class _L2CHeader:
    version: int  # 0: legacy
    params: tuple[int, ...]  # _L2C_PARAMS, vocab positive
    shared: bool  # the classifier is the embedding
    group_size: int  # of version 2's Q8_0 quantization
    nbytes: int

    @property
    def name(self) -> str:
        return f"version {self.version}" if self.version else "legacy"


def _llama2c_header(f: Path) -> _L2CHeader:
    with open(f, "rb") as fh:
        head = fh.read(_L2C_HEADER_BYTES)
    if len(head) >= 8 and struct.unpack_from("<I", head)[0] == _L2C_MAGIC:
        version = struct.unpack_from("<i", head, 4)[0]
        if version not in (1, 2):
            raise ConversionError(
                f,
                f"llama2.c export version {version} is not supported "
                "(the legacy format and versions 1 and 2 are)",
            )
        if len(head) < _L2C_HEADER_BYTES:
            raise ConversionError(f, f"file too short for a llama2.c version {version} header")
        group = struct.unpack_from("<i", head, 37)[0] if version == 2 else 0
        params = _L2C_PARAMS.unpack_from(head, 8)
        return _L2CHeader(version, params, head[36] != 0, group, _L2C_HEADER_BYTES)
    if len(head) < _L2C_PARAMS.size:
        raise ConversionError(f, "file too short for a llama2.c header")
    *params, vocab, seq_len = _L2C_PARAMS.unpack_from(head)
    # The legacy header's sign of vocab_size says whether the classifier is shared.
    return _L2CHeader(0, (*params, abs(vocab), seq_len), vocab > 0, 0, _L2C_PARAMS.size)


def _llama2c_layout(h: _L2CHeader) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, stored as: f32 / q8 / skip) of each array, in file order."""
    dim, hidden, L, n_heads, n_kv, vocab, seq_len = h.params
    head_dim = dim // n_heads
    kv = n_kv * head_dim
    shapes = {
        "embed": (vocab, dim),
        "rms_att": (L, dim),
        "wq": (L, dim, dim),
        "wk": (L, kv, dim),
        "wv": (L, kv, dim),
        "wo": (L, dim, dim),
        "rms_ffn": (L, dim),
        "w1": (L, hidden, dim),
        "w2": (L, dim, hidden),
        "w3": (L, hidden, dim),
        "rms_final": (dim,),
        "rope": (2, seq_len, head_dim // 2),  # the legacy cos / sin tables, recomputed
        "wcls": (vocab, dim),
    }
    cls = [] if h.shared else ["wcls"]
    if h.version == 0:
        order = ["embed", "rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3"]
        order += ["rms_final", "rope", *cls]
        return [(k, shapes[k], "skip" if k == "rope" else "f32") for k in order]
    matrices = "f32" if h.version == 1 else "q8"
    return [(k, shapes[k], "f32") for k in ("rms_att", "rms_ffn", "rms_final")] + [
        (k, shapes[k], matrices) for k in ("embed", "wq", "wk", "wv", "wo", "w1", "w2", "w3", *cls)
    ]


def _stored_bytes(shape: tuple[int, ...], kind: str, group_size: int) -> int:
    n = int(np.prod(shape))
    # Q8_0: an int8 per value and a float32 scale per group.
    return n + 4 * (n // group_size) if kind == "q8" else 4 * n


def _dequantize_q80(buf, offset: int, shape: tuple[int, ...], group_size: int) -> np.ndarray:
    """Version 2 matrices: per layer, int8 values then float32 group scales (runq.c's layout)."""
    layers = shape[0] if len(shape) == 3 else 1
    n = int(np.prod(shape)) // layers
    out = np.empty((layers, n // group_size, group_size), np.float32)
    for i in range(layers):
        q = np.frombuffer(buf, np.int8, n, offset).reshape(-1, group_size)
        scale = np.frombuffer(buf, "<f4", n // group_size, offset + n)
        np.multiply(q, scale[:, None], out=out[i])
        offset += n + 4 * (n // group_size)
    return out.reshape(shape)


def read_llama2c(f: Path, tokenizer: Path | None) -> Source:
    if not f.is_file():
        raise ConversionError(f, "file not found")
    h = _llama2c_header(f)
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = h.params
    if min(h.params) <= 0:
        raise ConversionError(
            f, f"not a llama2.c checkpoint (header {dim, hidden, n_layers, n_heads})"
        )
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
            tie_word_embeddings=h.shared,
        ),
    )
    layout = _llama2c_layout(h)
    if h.version == 2:
        per_matrix = [int(np.prod(s[-2:])) for _, s, kind in layout if kind == "q8"]
        if h.group_size <= 0 or any(n % h.group_size for n in per_matrix):
            raise ConversionError(f, f"invalid llama2.c version 2 group size {h.group_size}")
    expected = h.nbytes + sum(_stored_bytes(s, kind, h.group_size) for _, s, kind in layout)
    size = f.stat().st_size
    if size != expected:
        raise ConversionError(
            f,
            f"file is {size} bytes, its llama2.c {h.name} header implies {expected} "
            f"({'truncated' if size < expected else 'trailing data'})",
        )

    def tensors():
        data = np.memmap(f, dtype=np.uint8, mode="r")
        offset = h.nbytes
        for key, shape, kind in layout:
            if kind == "f32":
                a = np.frombuffer(data, "<f4", int(np.prod(shape)), offset).reshape(shape)
            elif kind == "q8":
                a = _dequantize_q80(data, offset, shape, h.group_size)
            offset += _stored_bytes(shape, kind, h.group_size)
            if kind == "skip":
                continue
            if key == "embed":
                yield str(f), "model.embed_tokens.weight", a
            elif key == "rms_final":
                yield str(f), "model.norm.weight", a
            elif key == "wcls":
                yield str(f), "lm_head.weight", a
            else:
                for i in range(n_layers):
                    w = a[i]
                    if key == "wq":
                        w = meta_to_hf_rows(w, n_heads)
                    elif key == "wk":
                        w = meta_to_hf_rows(w, n_kv)
                    yield str(f), f"model.layers.{i}.{_L2C_NAMES[key]}.weight", w

    toks = [tokenizer] if tokenizer else []
    return Source(f, cfg, tensors, toks, np.dtype(np.float32), [f])


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
        files = tokenizer_files(tok)
        if not {"tokenizer.json", "tokenizer.model"} & {f.name for f in files}:
            raise ConversionError(tok, "no tokenizer.json or tokenizer.model in this directory")
        return files
    return [tok]
