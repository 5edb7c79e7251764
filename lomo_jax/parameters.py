"""The parameter tree as one table: where each tensor sits in the lomo-jax tree, its Hugging Face
name, its logical axes, whether it is stacked per layer, which stage of the decoder layer reads
it, and when a model has it.

The converters (`convert.layout`, `convert.peft`), the sharding rules (`sharding.param_axes`), the
optimizer's per-layer state (`optim`) and the fused engine's per-stage weights (`engine`) all read
this table;
tests/test_families.py checks it against the tree the Flax model creates for every family, so
the two cannot drift. A new tensor is one row here plus the module that creates it.

A logical axis has one size per config (`axis_sizes`), so the axes give the shape too; the
sharding rules map the same axes to mesh axes (`sharding.RULES`).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lomo_jax.config import LlamaConfig

LAYERS = "layers"  # the subtree whose leaves are stacked over layers: [L, ...]


@dataclasses.dataclass(frozen=True)
class Param:
    name: str  # dotted path in the lomo-jax tree; per-layer tensors sit under `layers`
    hf_name: str  # the Hugging Face name; {i} is the layer index
    axes: tuple[str, ...]  # logical axes (without the layer axis of a stacked tensor)
    stage: str | None = None  # the stage of model.LAYER_BLOCKS that reads it (per-layer only)
    when: str | None = None  # a config attribute that must hold ("not x": must not); None: always
    adapts: str | None = None  # a LoRA factor: the name of the weight it adapts (lomo_jax.lora)

    @property
    def path(self) -> tuple[str, ...]:
        return tuple(self.name.split("."))

    @property
    def per_layer(self) -> bool:
        return self.path[0] == LAYERS

    @property
    def transposed(self) -> bool:
        """A Flax kernel [in, out] is the transpose of the torch Linear weight [out, in]; so are
        the LoRA factors A [in, r] and B [r, out] of peft's lora_A [r, in] and lora_B [out, r]."""
        return self.path[-1] in ("kernel", "lora_a", "lora_b")

    def exists(self, cfg: LlamaConfig) -> bool:
        if self.adapts is not None:  # a factor of a projection the config's LoRA targets
            return cfg.lora is not None and self.path[-2] in cfg.lora.targets
        if self.when is None:
            return True
        negate = self.when.startswith("not ")
        return bool(getattr(cfg, self.when.removeprefix("not "))) != negate

    def shape(self, cfg: LlamaConfig) -> tuple[int, ...]:
        """In the lomo-jax tree (with the layer axis when stacked)."""
        sizes = axis_sizes(cfg)
        shape = tuple(sizes[a] for a in self.axes)
        return (cfg.num_hidden_layers, *shape) if self.per_layer else shape

    def hf_shape(self, cfg: LlamaConfig) -> tuple[int, ...]:
        """Of one Hugging Face tensor (one layer's, for a stacked one)."""
        shape = self.shape(cfg)[1:] if self.per_layer else self.shape(cfg)
        return shape[::-1] if self.transposed else shape


def axis_sizes(cfg: LlamaConfig) -> dict[str, int]:
    return {
        "vocab": cfg.vocab_size,
        "embed": cfg.hidden_size,
        "norm": cfg.hidden_size,  # a hidden-size vector (norm scales, output biases): kept whole
        "heads": cfg.num_attention_heads * cfg.head_dim,
        "kv_heads": cfg.num_key_value_heads * cfg.head_dim,
        "head_dim": cfg.head_dim,
        "mlp": cfg.intermediate_size,
        "lora_rank": cfg.lora.rank if cfg.lora is not None else 0,
    }


_L = "model.layers.{i}."
# One row per line (the file is exempt from the line length): path, Hugging Face name, logical
# axes, the layer stage that reads it, the config attribute it exists under.
# fmt: off
_MODEL: tuple[Param, ...] = (
    Param("embed.embedding", "model.embed_tokens.weight", ("vocab", "embed")),
    # decoder layer i, in the order its stages read them
    Param("layers.input_layernorm.weight", _L + "input_layernorm.weight", ("norm",), "attention_norm"),
    Param("layers.self_attn.q_proj.kernel", _L + "self_attn.q_proj.weight", ("embed", "heads"), "attention_in"),
    Param("layers.self_attn.q_proj.bias", _L + "self_attn.q_proj.bias", ("heads",), "attention_in", "qkv_bias"),
    Param("layers.self_attn.k_proj.kernel", _L + "self_attn.k_proj.weight", ("embed", "kv_heads"), "attention_in"),
    Param("layers.self_attn.k_proj.bias", _L + "self_attn.k_proj.bias", ("kv_heads",), "attention_in", "qkv_bias"),
    Param("layers.self_attn.v_proj.kernel", _L + "self_attn.v_proj.weight", ("embed", "kv_heads"), "attention_in"),
    Param("layers.self_attn.v_proj.bias", _L + "self_attn.v_proj.bias", ("kv_heads",), "attention_in", "qkv_bias"),
    Param("layers.self_attn.q_norm.weight", _L + "self_attn.q_norm.weight", ("head_dim",), "attention_in", "qk_norm"),
    Param("layers.self_attn.k_norm.weight", _L + "self_attn.k_norm.weight", ("head_dim",), "attention_in", "qk_norm"),
    Param("layers.self_attn.o_proj.kernel", _L + "self_attn.o_proj.weight", ("heads", "embed"), "attention_out"),
    Param("layers.self_attn.o_proj.bias", _L + "self_attn.o_proj.bias", ("norm",), "attention_out", "attention_bias"),
    Param("layers.post_attention_layernorm.weight", _L + "post_attention_layernorm.weight", ("norm",), "mlp_norm"),
    Param("layers.mlp.gate_proj.kernel", _L + "mlp.gate_proj.weight", ("embed", "mlp"), "mlp_in"),
    Param("layers.mlp.gate_proj.bias", _L + "mlp.gate_proj.bias", ("mlp",), "mlp_in", "mlp_bias"),
    Param("layers.mlp.up_proj.kernel", _L + "mlp.up_proj.weight", ("embed", "mlp"), "mlp_in"),
    Param("layers.mlp.up_proj.bias", _L + "mlp.up_proj.bias", ("mlp",), "mlp_in", "mlp_bias"),
    Param("layers.mlp.down_proj.kernel", _L + "mlp.down_proj.weight", ("mlp", "embed"), "mlp_out"),
    Param("layers.mlp.down_proj.bias", _L + "mlp.down_proj.bias", ("norm",), "mlp_out", "mlp_bias"),
    # after the layers
    Param("norm.weight", "model.norm.weight", ("norm",)),
    Param("lm_head.kernel", "lm_head.weight", ("embed", "vocab"), when="not tie_word_embeddings"),
)
# fmt: on

PEFT_PREFIX = "base_model.model."  # peft's names: the wrapped model's, under this prefix


def _lora_rows(w: Param) -> tuple[Param, Param]:
    """The LoRA factors of stacked matrix `w` [in, out]: A [in, r] and B [r, out] (peft's
    `lora_A` / `lora_B` of the module), read by w's stage. Each keeps w's axis on its side, so it
    is sharded as w is there; the rank axis stays whole."""
    module = w.name.removesuffix(".kernel")
    stem = PEFT_PREFIX + w.hf_name.removesuffix(".weight")
    a_in, out = w.axes
    return (
        Param(
            f"{module}.lora_a", f"{stem}.lora_A.weight", (a_in, "lora_rank"), w.stage, adapts=w.name
        ),
        Param(
            f"{module}.lora_b", f"{stem}.lora_B.weight", ("lora_rank", out), w.stage, adapts=w.name
        ),
    )


TABLE: tuple[Param, ...] = _MODEL + tuple(
    row for w in _MODEL if w.per_layer and w.path[-1] == "kernel" for row in _lora_rows(w)
)
BY_NAME: dict[str, Param] = {p.name: p for p in TABLE}


def params_of(cfg: LlamaConfig) -> list[Param]:
    """The rows a model with config `cfg` has."""
    return [p for p in TABLE if p.exists(cfg)]


def stage_weights(stage: str) -> tuple[tuple[str, ...], ...]:
    """Paths inside one layer (no `layers` prefix) of the weights that `stage` reads."""
    return tuple(p.path[1:] for p in TABLE if p.stage == stage)


def leaf_name(path) -> str:
    """The dotted name of a pytree leaf from its key path (e.g. layers.mlp.up_proj.kernel): the
    names the table, checkpoints and sharding rules index by. A key that is itself a path (of a
    `flatten_dict` tree) gives its parts."""
    parts = []
    for k in path:
        k = getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))
        parts.extend(k if isinstance(k, tuple) else (k,))
    return ".".join(str(p) for p in parts)
