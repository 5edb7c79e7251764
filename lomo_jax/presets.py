"""Models by name, without their weights: the presets (common sizes of each family, as their
Hugging Face repositories' config.json has them) and `find_config`, which reads the config of any
reference to a model -- a preset, a Hub id, a directory holding only config.json -- so a memory
plan can be made before 140 GB are downloaded."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lomo_jax import hub
from lomo_jax.config import LlamaConfig

log = logging.getLogger("lomo_jax")

_LLAMA1 = dict(vocab_size=32000, rms_norm_eps=1e-6, max_position_embeddings=2048)
_LLAMA3 = dict(
    vocab_size=128256,
    num_key_value_heads=8,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    bos_token_id=128000,
    eos_token_id=128001,
)
_LLAMA31 = dict(
    _LLAMA3,
    max_position_embeddings=131072,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
)
_QWEN = dict(
    rope_theta=1000000.0, tie_word_embeddings=False, use_sliding_window=False, bos_token_id=151643
)
_QWEN25 = dict(_QWEN, model_type="qwen2", vocab_size=152064, max_position_embeddings=131072)
_QWEN3 = dict(
    _QWEN,
    model_type="qwen3",
    vocab_size=151936,
    head_dim=128,
    num_key_value_heads=8,
    rms_norm_eps=1e-6,
    max_position_embeddings=40960,
    eos_token_id=151645,
)

# name: (Hub id, the config.json keys that LlamaConfig reads, as the repository has them).
_TABLE: dict[str, tuple[str, dict[str, Any]]] = {
    # LLaMA-1, the papers' sizes
    "llama-7b": ("huggyllama/llama-7b", dict(_LLAMA1, hidden_size=4096, intermediate_size=11008,
                 num_hidden_layers=32, num_attention_heads=32)),
    "llama-13b": ("huggyllama/llama-13b", dict(_LLAMA1, hidden_size=5120, intermediate_size=13824,
                  num_hidden_layers=40, num_attention_heads=40)),
    "llama-30b": ("huggyllama/llama-30b", dict(_LLAMA1, hidden_size=6656, intermediate_size=17920,
                  num_hidden_layers=60, num_attention_heads=52)),
    "llama-65b": ("huggyllama/llama-65b", dict(_LLAMA1, hidden_size=8192, intermediate_size=22016,
                  num_hidden_layers=80, num_attention_heads=64)),
    "llama3-8b": ("meta-llama/Meta-Llama-3-8B", dict(_LLAMA3, hidden_size=4096,
                  intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  max_position_embeddings=8192)),
    "llama3-70b": ("meta-llama/Meta-Llama-3-70B", dict(_LLAMA3, hidden_size=8192,
                   intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                   max_position_embeddings=8192)),
    "llama3.1-8b": ("meta-llama/Llama-3.1-8B", dict(_LLAMA31, hidden_size=4096,
                    intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32)),
    "llama3.1-70b": ("meta-llama/Llama-3.1-70B", dict(_LLAMA31, hidden_size=8192,
                     intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64)),
    "qwen2.5-7b": ("Qwen/Qwen2.5-7B", dict(_QWEN25, hidden_size=3584, intermediate_size=18944,
                   num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                   rms_norm_eps=1e-6, eos_token_id=151643)),
    "qwen2.5-72b": ("Qwen/Qwen2.5-72B", dict(_QWEN25, hidden_size=8192, intermediate_size=29568,
                    num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                    rms_norm_eps=1e-5, eos_token_id=151643)),
    "qwen3-8b": ("Qwen/Qwen3-8B", dict(_QWEN3, hidden_size=4096, intermediate_size=12288,
                 num_hidden_layers=36, num_attention_heads=32)),
    "qwen3-32b": ("Qwen/Qwen3-32B", dict(_QWEN3, hidden_size=5120, intermediate_size=25600,
                  num_hidden_layers=64, num_attention_heads=64)),
    "mistral-7b": ("mistralai/Mistral-7B-v0.3", dict(model_type="mistral", vocab_size=32768,
                   hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
                   rope_theta=1000000.0, max_position_embeddings=32768, sliding_window=None,
                   bos_token_id=1, eos_token_id=2)),
}  # fmt: skip

PRESETS: dict[str, LlamaConfig] = {
    name: LlamaConfig.from_hf_dict(keys) for name, (_, keys) in _TABLE.items()
}
HUB_IDS: dict[str, str] = {name: hub_id for name, (hub_id, _) in _TABLE.items()}


def preset(name: str) -> LlamaConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None


def find_config(ref: str | Path) -> LlamaConfig:
    """The config of the model `ref` names, read without its weights:

    - a preset (PRESETS);
    - a lomo-jax checkpoint (its config.json checked against its weights' shapes);
    - a directory with a config.json (a Hugging Face model, with or without its weights), a
      Meta directory or a llama2.c file (what `lomo-jax import` reads);
    - a Hub id (`org/name`): its config.json from the Hugging Face cache (fetched alone when
      HF_HUB_OFFLINE allows), else the preset of that repository."""
    from convert.sources import detect, read_hf_config
    from lomo_jax import checkpoint

    name = str(ref)
    if name in PRESETS:
        return PRESETS[name]
    path = Path(ref)
    if checkpoint.is_checkpoint(path):  # its config checked against its saved weights' shapes
        return checkpoint.read_model_info(path)[0]
    if path.is_dir() and (path / "config.json").is_file():
        return read_hf_config(path / "config.json")
    if path.exists():
        return detect(path).config
    if hub.is_repo_id(name):
        try:
            return read_hf_config(hub.file(name, "config.json"))
        except FileNotFoundError as e:
            known = {hub_id.lower(): p for p, hub_id in HUB_IDS.items()}.get(name.lower())
            if known is None:
                raise
            log.info("%s; planning with the preset %s", e, known)
            return PRESETS[known]
    raise FileNotFoundError(
        f"{name}: neither a preset ({', '.join(PRESETS)}), a model directory nor a Hub id"
    )
