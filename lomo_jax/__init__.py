"""lomo-jax: full-parameter LLaMA fine-tuning in JAX with the fused LOMO and AdaLomo optimizers.

The names below are imported on first use, so `lomo-jax` catches Ctrl-C before JAX loads."""

import importlib
import os

# XLA:CPU's default scheduler favours concurrency over memory; the memory-aware one cuts the fused
# step's temporaries by about a fifth at 7B (benchmarks/memory.py). XLA reads it only from
# XLA_FLAGS, before the backend starts; other backends ignore it. Set it yourself to override.
_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}=false".strip()

_EXPORTS = {
    "PRESETS": "lomo_jax.config",
    "LlamaConfig": "lomo_jax.config",
    "preset": "lomo_jax.config",
    "decoder_layer": "lomo_jax.model",
    "embed": "lomo_jax.model",
    "forward": "lomo_jax.model",
    "head": "lomo_jax.model",
    "init_params": "lomo_jax.model",
    "param_shapes": "lomo_jax.model",
    "LlamaModel": "lomo_jax.pretrained",
    "from_pretrained": "lomo_jax.pretrained",
    "Tokenizer": "lomo_jax.tokenizer",
    "load_tokenizer": "lomo_jax.tokenizer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lomo_jax' has no attribute {name!r}")
    importlib.import_module("lomo_jax.cuda_plugin").import_jax()
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
