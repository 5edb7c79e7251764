"""The declarative map between Hugging Face tensor names and the lomo-jax parameter tree.

Every format is read into Hugging Face names first (Meta and llama2.c readers rename and permute),
so this table is the only place that knows the tree. Per-tensor hooks are small and reversible:
torch Linear weights [out, in] are transposed to Flax kernels [in, out], and q/k rows of Meta-layout
checkpoints are permuted from adjacent-pair RoPE to the rotate-half RoPE the model uses.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator

import numpy as np

from convert.errors import ConversionError
from lomo_jax.config import LlamaConfig

_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
# Buffers some old checkpoints carry; they are recomputed from the config.
_IGNORED = re.compile(r"(model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq|.*\.masked_bias)$")


@dataclasses.dataclass(frozen=True)
class Slot:
    hf_name: str
    path: tuple[str, ...]  # into the lomo-jax tree
    layer: int | None  # index along the stacked layer axis
    hf_shape: tuple[int, ...]
    transpose: bool  # torch Linear [out, in] <-> kernel [in, out]


def _layer_tensors(cfg: LlamaConfig) -> Iterator[tuple[str, tuple[int, ...], bool]]:
    """(name inside a layer, HF shape, is a Linear weight)."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    for proj, out, inp in (
        ("q_proj", q, d),
        ("k_proj", kv, d),
        ("v_proj", kv, d),
        ("o_proj", d, q),
    ):
        yield f"self_attn.{proj}.weight", (out, inp), True
        if cfg.attention_bias:
            yield f"self_attn.{proj}.bias", (out,), False
    for proj, out, inp in (("gate_proj", f, d), ("up_proj", f, d), ("down_proj", d, f)):
        yield f"mlp.{proj}.weight", (out, inp), True
        if cfg.mlp_bias:
            yield f"mlp.{proj}.bias", (out,), False
    yield "input_layernorm.weight", (d,), False
    yield "post_attention_layernorm.weight", (d,), False


def _tree_path(name_in_layer: str) -> tuple[str, ...]:
    *modules, leaf = name_in_layer.split(".")
    if leaf == "weight" and not modules[-1].endswith("layernorm"):
        leaf = "kernel"
    return ("layers", *modules, leaf)


def slots(cfg: LlamaConfig) -> list[Slot]:
    d, v = cfg.hidden_size, cfg.vocab_size
    out = [Slot("model.embed_tokens.weight", ("embed", "embedding"), None, (v, d), False)]
    for i in range(cfg.num_hidden_layers):
        for name, shape, linear in _layer_tensors(cfg):
            out.append(Slot(f"model.layers.{i}.{name}", _tree_path(name), i, shape, linear))
    out.append(Slot("model.norm.weight", ("norm", "weight"), None, (d,), False))
    if not cfg.tie_word_embeddings:
        out.append(Slot("lm_head.weight", ("lm_head", "kernel"), None, (v, d), True))
    return out


def tree_shape(slot: Slot, cfg: LlamaConfig) -> tuple[int, ...]:
    shape = slot.hf_shape[::-1] if slot.transpose else slot.hf_shape
    return shape if slot.layer is None else (cfg.num_hidden_layers, *shape)


class TreeBuilder:
    """Fills a preallocated parameter tree one source tensor at a time (one copy of the model)."""

    def __init__(self, cfg: LlamaConfig, dtype):
        self.cfg, self.dtype = cfg, np.dtype(dtype)
        self.by_name = {s.hf_name: s for s in slots(cfg)}
        self.filled: set[str] = set()
        self.tree: dict = {}
        for s in self.by_name.values():
            node = self.tree
            for k in s.path[:-1]:
                node = node.setdefault(k, {})
            if s.path[-1] not in node:
                node[s.path[-1]] = np.empty(tree_shape(s, cfg), self.dtype)

    def _leaf(self, path: tuple[str, ...]) -> np.ndarray:
        node = self.tree
        for k in path:
            node = node[k]
        return node

    def put(self, file: str, name: str, array: np.ndarray) -> None:
        slot = self.by_name.get(name)
        if slot is None:
            if _IGNORED.match(name) or (name == "lm_head.weight" and self.cfg.tie_word_embeddings):
                return
            raise ConversionError(file, f"unknown tensor name {name!r}")
        if tuple(array.shape) != slot.hf_shape:
            raise ConversionError(
                file,
                f"tensor {name!r} has shape {tuple(array.shape)}, the config says {slot.hf_shape}",
            )
        if name in self.filled:
            raise ConversionError(file, f"tensor {name!r} appears twice")
        value = array.T if slot.transpose else array
        dest = self._leaf(slot.path)
        if slot.layer is None:
            dest[...] = value
        else:
            dest[slot.layer] = value
        self.filled.add(name)

    def finish(self, source: str) -> dict:
        missing = [n for n in self.by_name if n not in self.filled]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ConversionError(source, f"missing tensor {missing[0]!r}{more}")
        return self.tree


def hf_tensors(cfg: LlamaConfig, tree: dict) -> Iterator[tuple[str, np.ndarray]]:
    """The inverse map: (HF name, [out, in] view) for every tensor, without copying the tree."""
    for s in slots(cfg):
        node = tree
        for k in s.path:
            node = node[k]
        value = np.asarray(node if s.layer is None else node[s.layer])
        yield s.hf_name, (value.T if s.transpose else value)


def meta_to_hf_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Adjacent-pair RoPE rows (Meta, llama2.c) -> rotate-half rows (HF), per head.

    Row (h, i, j) of Meta, i < head_dim/2 the pair and j in {0, 1} its member, moves to row
    (h, j, i): first all pair members 0, then all members 1 -- exactly transformers'
    `permute` in convert_llama_weights_to_hf.py.
    """
    out, inp = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def hf_to_meta_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    out, inp = w.shape
    return w.reshape(n_heads, 2, out // n_heads // 2, inp).swapaxes(1, 2).reshape(out, inp)
