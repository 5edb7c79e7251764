"""Hyper-parameters of the LLaMA family (Llama, Mistral, Qwen2, Qwen3): one dataclass, read from
and written to Hugging Face `config.json` the way each family's transformers class does."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from lomo_jax.attention import BLOCK, IMPLEMENTATIONS
from lomo_jax.blocks import BLOCK_BYTES
from lomo_jax.lora import LoraConfig
from lomo_jax.parameters import params_of
from lomo_jax.token_blocks import TOKEN_BLOCK_BYTES


@dataclasses.dataclass(frozen=True)
class Family:
    """What one transformers `model_type` is on top of LLaMA."""

    architecture: str  # the transformers class an export names
    keys: tuple[str, ...] = ()  # config.json keys of its own that LlamaConfig has
    defaults: dict[str, Any] = dataclasses.field(default_factory=dict)  # its class defaults
    fixed: dict[str, Any] = dataclasses.field(default_factory=dict)  # values we support only
    qkv_bias: bool = False  # q, k and v projections always have biases
    qk_norm: bool = False  # an RMSNorm over each head of q and of k, before RoPE


_NO_SLIDING = {"use_sliding_window": False}  # Qwen: sliding attention in the upper layers
FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaForCausalLM", ("head_dim", "attention_bias", "mlp_bias")),
    "mistral": Family(
        "MistralForCausalLM", ("head_dim", "sliding_window"), {"sliding_window": 4096}
    ),
    "qwen2": Family(
        "Qwen2ForCausalLM",
        defaults={"bos_token_id": None, "eos_token_id": None},
        fixed=_NO_SLIDING,
        qkv_bias=True,
    ),
    "qwen3": Family(
        "Qwen3ForCausalLM",
        ("head_dim", "attention_bias"),
        {"bos_token_id": None, "eos_token_id": None, "head_dim": 128},
        fixed=_NO_SLIDING,
        qk_norm=True,
    ),
}


def family_of(model_type: str) -> Family:
    try:
        return FAMILIES[model_type]
    except KeyError:
        known = ", ".join(FAMILIES)
        raise ValueError(f"model_type {model_type!r} is not supported (known: {known})") from None


# The model's dimensions: keys of every family, positive integers.
_DIMENSIONS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
)
# Keys every family reads and writes.
COMMON_KEYS = (
    *_DIMENSIONS,
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "max_position_embeddings",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)
# Fields only some families have; elsewhere they keep these values (and head_dim its default).
_FAMILY_FIELDS = {"attention_bias": False, "mlp_bias": False, "sliding_window": None}
# Sizes: positive integers (None where derived or absent).
_SIZES = (*_DIMENSIONS, "head_dim", "max_position_embeddings", "sliding_window")
# This library's own settings: positive integers.
_TUNING = ("attention_block", "block_bytes", "token_block_bytes")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_types(c: LlamaConfig) -> None:
    """Types and ranges of the values a config.json can carry (None: derived or absent)."""
    for name in (*_SIZES, *_TUNING):
        v = getattr(c, name)
        if v is not None and not (_is_int(v) and v > 0):
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    for name in ("rms_norm_eps", "rope_theta"):
        v = getattr(c, name)
        if not (isinstance(v, int | float) and not isinstance(v, bool) and 0 < v < math.inf):
            raise ValueError(f"{name} must be a positive number, got {v!r}")
    for name in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
        if not isinstance(getattr(c, name), bool):
            raise ValueError(f"{name} must be true or false, got {getattr(c, name)!r}")
    for name in ("bos_token_id", "pad_token_id", "eos_token_id"):
        v = getattr(c, name)
        ids = v if name == "eos_token_id" and isinstance(v, list | tuple) else [v]
        if not all(i is None or (_is_int(i) and i >= 0) for i in ids):
            raise ValueError(f"{name} must be a token id (an integer >= 0), got {v!r}")
    if c.rope_scaling is not None and not isinstance(c.rope_scaling, dict):
        raise ValueError(f"rope_scaling must be an object, got {c.rope_scaling!r}")


# The numbers each rope_scaling type reads (all positive; llama3's high factor above its low).
_ROPE_KEYS = {
    "linear": ("factor",),
    "llama3": (
        "factor",
        "low_freq_factor",
        "high_freq_factor",
        "original_max_position_embeddings",
    ),
}


def _check_rope_scaling(scaling: dict[str, Any], kind: str) -> None:
    for key in _ROPE_KEYS.get(kind, ()):
        v = scaling.get(key)
        if not (isinstance(v, int | float) and not isinstance(v, bool) and 0 < v < math.inf):
            raise ValueError(f"rope_scaling {key} must be a positive number, got {v!r}")
    if kind == "llama3" and not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
        raise ValueError("rope_scaling high_freq_factor must be above low_freq_factor")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    model_type: str = "llama"  # the family: a key of FAMILIES
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # biases on q, k, v and o (Llama, Qwen3)
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral: each position sees itself and N - 1 before
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    # How to compute, not what: choices of this library, not properties of the model, so they
    # stay out of the exported config.json (transformers has its own).
    attention: str = "auto"  # lomo_jax.attention's implementation
    attention_block: int = BLOCK  # queries and keys per block of blockwise attention
    # Bytes of float32 intermediates one block may hold where a loop walks an axis in blocks
    # (lomo_jax.blocks): the head's vocabulary pieces, the embedding gradient's columns.
    block_bytes: int = BLOCK_BYTES
    # Bytes of one block of tokens' float32 MLP intermediates (model.mlp_tokens): long sequences
    # run their MLP block a block of tokens at a time.
    token_block_bytes: int = TOKEN_BLOCK_BYTES
    # LoRA factors beside the projections (lomo_jax.lora): an adapter on the model, not part of
    # it, so it travels as peft's adapter_config.json, never in config.json.
    lora: LoraConfig | None = None

    def __post_init__(self):
        _check_types(self)
        # Fill the derived defaults the way transformers does, so equality is by value.
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size={self.hidden_size} is not a multiple of "
                    f"num_attention_heads={self.num_attention_heads} (and no head_dim is given)"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        family = family_of(self.model_type)
        default_head_dim = self.hidden_size // self.num_attention_heads
        for name, default in dict(_FAMILY_FIELDS, head_dim=default_head_dim).items():
            if name not in family.keys and getattr(self, name) != default:
                raise ValueError(
                    f"{self.model_type} models cannot have {name}={getattr(self, name)!r}"
                )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.attention not in IMPLEMENTATIONS:
            raise ValueError(
                f"unknown attention {self.attention!r}; choose from {', '.join(IMPLEMENTATIONS)}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even (RoPE turns pairs), got {self.head_dim}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("default", "linear", "llama3"):
                raise ValueError(
                    f"unsupported rope_scaling type {kind!r} (supported: linear, llama3)"
                )
            _check_rope_scaling(self.rope_scaling, kind)

    def __hash__(self) -> int:
        # rope_scaling is a dict; hash by value so a config can be a static jit argument.
        return hash(json.dumps(dataclasses.asdict(self), sort_keys=True))

    @property
    def family(self) -> Family:
        return FAMILIES[self.model_type]

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias or self.family.qkv_bias

    @property
    def qk_norm(self) -> bool:
        return self.family.qk_norm

    @property
    def num_params(self) -> int:
        return sum(math.prod(p.shape(self)) for p in params_of(self))

    @property
    def eos_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    # ---- Hugging Face config.json ------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> LlamaConfig:
        """Reads the keys the family's transformers class reads, with its defaults; refuses
        what the model does not implement."""
        if not isinstance(d, dict):
            raise ValueError(f"expected a JSON object of settings, got {type(d).__name__}")
        model_type = d.get("model_type", "llama")
        family = family_of(model_type)
        act = d.get("hidden_act", "silu")
        if act not in ("silu", "swish"):  # transformers' names of the one activation we compute
            raise ValueError(f"hidden_act {act!r} is not supported (the model computes silu)")
        for key, value in family.fixed.items():
            if d.get(key, value) != value:
                raise ValueError(f"{key}={d[key]!r} is not supported (only {value!r})")
        kwargs = dict(family.defaults, model_type=model_type)
        kwargs.update({k: d[k] for k in (*COMMON_KEYS, *family.keys) if k in d})
        scaling = kwargs.get("rope_scaling")
        # transformers 5 moves rope_theta into `rope_parameters`.
        params = d.get("rope_parameters")
        if params is not None and not isinstance(params, dict):
            raise ValueError(f"rope_parameters must be an object, got {params!r}")
        if params:
            kwargs.setdefault("rope_theta", params.get("rope_theta", 10000.0))
            if scaling is None and params.get("rope_type", "default") != "default":
                kwargs["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
        if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type")) == "default":
            kwargs["rope_scaling"] = None
        return cls(**kwargs)

    @classmethod
    def from_json_file(cls, path: str | Path) -> LlamaConfig:
        return cls.from_hf_dict(json.loads(Path(path).read_text()))

    def to_hf_dict(self) -> dict[str, Any]:
        """The keys of the family's transformers config class."""
        family = self.family
        d = {k: getattr(self, k) for k in (*COMMON_KEYS, *family.keys)}
        d.update(family.fixed, hidden_act="silu")
        d.update(model_type=self.model_type, architectures=[family.architecture])
        return d

    def replace(self, **changes: Any) -> LlamaConfig:
        return dataclasses.replace(self, **changes)
