"""lomo-jax: full-parameter LLaMA fine-tuning in JAX with the fused LOMO and AdaLomo optimizers."""

import os

# XLA:CPU's default scheduler favours concurrency over memory; the memory-aware one cuts the fused
# step's temporaries by about a fifth at 7B (benchmarks/memory.py). XLA reads it only from
# XLA_FLAGS, before the backend starts; other backends ignore it. Set it yourself to override.
_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}=false".strip()

from lomo_jax.config import PRESETS, LlamaConfig, preset
from lomo_jax.model import decoder_layer, embed, forward, head, init_params, param_shapes
from lomo_jax.pretrained import LlamaModel, from_pretrained
from lomo_jax.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "PRESETS",
    "LlamaConfig",
    "LlamaModel",
    "Tokenizer",
    "decoder_layer",
    "embed",
    "forward",
    "from_pretrained",
    "head",
    "init_params",
    "load_tokenizer",
    "param_shapes",
    "preset",
]
