"""LLaMA hyper-parameters: one dataclass, read from and written to Hugging Face `config.json`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
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
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None

    def __post_init__(self):
        # Fill the derived defaults the way transformers does, so equality is by value.
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("default", "linear", "llama3"):
                raise ValueError(
                    f"unsupported rope_scaling type {kind!r} (supported: linear, llama3)"
                )

    def __hash__(self) -> int:
        # rope_scaling is a dict; hash by value so a config can be a static jit argument.
        return hash(json.dumps(dataclasses.asdict(self), sort_keys=True))

    @property
    def num_params(self) -> int:
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        per_layer = d * q + 2 * d * kv + q * d + 3 * d * f + 2 * d
        if self.attention_bias:
            per_layer += q + 2 * kv + d
        if self.mlp_bias:
            per_layer += 2 * f + d
        head = 0 if self.tie_word_embeddings else d * v
        return v * d + self.num_hidden_layers * per_layer + d + head

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
        model_type = d.get("model_type", "llama")
        if model_type != "llama":
            raise ValueError(f"model_type is {model_type!r}, not 'llama'")
        act = d.get("hidden_act", "silu")
        if act not in ("silu", "swish"):  # transformers' names of the one activation we compute
            raise ValueError(f"hidden_act {act!r} is not supported (the model computes silu)")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in fields}
        scaling = kwargs.get("rope_scaling")
        # transformers 5 moves rope_theta into `rope_parameters`.
        params = d.get("rope_parameters")
        if params:
            kwargs.setdefault("rope_theta", params.get("rope_theta", 10000.0))
            if scaling is None and params.get("rope_type", "default") != "default":
                kwargs["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
        if scaling is not None and scaling.get("rope_type", scaling.get("type")) == "default":
            kwargs["rope_scaling"] = None
        return cls(**kwargs)

    @classmethod
    def from_json_file(cls, path: str | Path) -> LlamaConfig:
        return cls.from_hf_dict(json.loads(Path(path).read_text()))

    def to_hf_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu")
        return d

    def replace(self, **changes: Any) -> LlamaConfig:
        return dataclasses.replace(self, **changes)


_LLAMA1 = dict(vocab_size=32000, rms_norm_eps=1e-6, max_position_embeddings=2048)

# The paper's sizes (LLaMA 1) plus Llama-3-8B; shapes only, for planning memory without weights.
PRESETS: dict[str, LlamaConfig] = {
    "llama-7b": LlamaConfig(
        **_LLAMA1,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
    ),
    "llama-13b": LlamaConfig(
        **_LLAMA1,
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
    ),
    "llama-30b": LlamaConfig(
        **_LLAMA1,
        hidden_size=6656,
        intermediate_size=17920,
        num_hidden_layers=60,
        num_attention_heads=52,
    ),
    "llama-65b": LlamaConfig(
        **_LLAMA1,
        hidden_size=8192,
        intermediate_size=22016,
        num_hidden_layers=80,
        num_attention_heads=64,
    ),
    "llama3-8b": LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        max_position_embeddings=8192,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
}


def preset(name: str) -> LlamaConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None
