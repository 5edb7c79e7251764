"""lomo-jax: full-parameter fine-tuning of LLaMA in JAX with the LOMO and AdaLomo fused optimizers."""

from lomo_jax.config import PRESETS, LlamaConfig, preset
from lomo_jax.model import decoder_layer, embed, forward, head, init_params, param_shapes
from lomo_jax.pretrained import LlamaModel, from_pretrained
from lomo_jax.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "PRESETS", "LlamaConfig", "LlamaModel", "Tokenizer", "decoder_layer", "embed", "forward",
    "from_pretrained", "head", "init_params", "load_tokenizer", "param_shapes", "preset",
]
