"""The map between Hugging Face tensors and the lomo-jax parameter tree, read off
lomo_jax.parameters.TABLE.

Every format is read into Hugging Face names first (Meta and llama2.c readers rename and permute).
Per-tensor hooks are small and reversible: torch Linear weights [out, in] are transposed to Flax
kernels [in, out], and q/k rows of Meta-layout checkpoints are permuted from adjacent-pair RoPE to
the rotate-half RoPE the model uses.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator

import numpy as np

from convert.errors import ConversionError
from lomo_jax.config import LlamaConfig
from lomo_jax.parameters import Param, params_of

# Buffers some old checkpoints carry; they are recomputed from the config.
_IGNORED = re.compile(r"(model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq|.*\.masked_bias)$")


@dataclasses.dataclass(frozen=True)
class Slot:
    """One Hugging Face tensor: a parameter, or one layer of a stacked one."""

    hf_name: str
    param: Param
    layer: int | None  # index along the stacked layer axis
    hf_shape: tuple[int, ...]


def slots(cfg: LlamaConfig) -> list[Slot]:
    """Every tensor of a Hugging Face checkpoint in the table's order, the per-layer rows
    repeated layer after layer (so a sharded export splits between layers). LoRA factors are
    the adapter's (`convert.peft`), not the model's."""
    rows = [p for p in params_of(cfg) if p.adapts is None]
    layer_rows = [p for p in rows if p.per_layer]
    out = []
    for p in rows:
        if not p.per_layer:
            out.append(Slot(p.hf_name, p, None, p.hf_shape(cfg)))
        elif p is layer_rows[0]:
            out += [
                Slot(q.hf_name.format(i=i), q, i, q.hf_shape(cfg))
                for i in range(cfg.num_hidden_layers)
                for q in layer_rows
            ]
    return out


class TreeBuilder:
    """Fills a preallocated parameter tree one source tensor at a time (one copy of the model)."""

    def __init__(self, cfg: LlamaConfig, dtype):
        self.cfg, self.dtype = cfg, np.dtype(dtype)
        self.by_name = {s.hf_name: s for s in slots(cfg)}
        self.filled: set[str] = set()
        self.tree: dict = {}
        for p in params_of(cfg):
            node = self.tree
            for k in p.path[:-1]:
                node = node.setdefault(k, {})
            node[p.path[-1]] = np.empty(p.shape(cfg), self.dtype)

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
        value = array.T if slot.param.transposed else array
        dest = self._leaf(slot.param.path)
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


def slot_value(tree: dict, s: Slot) -> np.ndarray:
    """Slot `s`'s tensor in the lomo-jax tree (one layer's, for a stacked one), as a view."""
    node = tree
    for k in s.param.path:
        node = node[k]
    return np.asarray(node if s.layer is None else node[s.layer])


def hf_tensors(cfg: LlamaConfig, tree: dict) -> Iterator[tuple[str, np.ndarray]]:
    """The inverse map: (HF name, [out, in] view) for every tensor, without copying the tree."""
    for s in slots(cfg):
        value = slot_value(tree, s)
        yield s.hf_name, (value.T if s.param.transposed else value)


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
