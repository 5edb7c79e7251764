"""Import: stream a source checkpoint, tensor by tensor, into the lomo-jax tree."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from convert.layout import TreeBuilder
from convert.sources import detect
from lomo_jax import checkpoint, hub
from lomo_jax.atomic import check_free
from lomo_jax.config import LlamaConfig
from lomo_jax.generation_config import GenerationConfig
from lomo_jax.lock import claim
from lomo_jax.tokenizer import tokenizer_from


def load(
    path: str | Path, tokenizer: str | Path | None = None, dtype: Any = None
) -> tuple[LlamaConfig, dict, list[Path]]:
    """(config, numpy parameter tree, tokenizer files) of a HF / Meta / llama2.c checkpoint;
    `path` may be a Hub id (`org/name`) in the local Hugging Face cache."""
    src = detect(hub.resolve(path), tokenizer)
    src.check_size()
    builder = TreeBuilder(src.config, np.dtype(dtype) if dtype is not None else src.dtype)
    for file, name, array in src.tensors():
        builder.put(file, name, array)
    return src.config, builder.finish(str(src.path)), src.tokenizer_files


def import_checkpoint(
    src: str | Path,
    out: str | Path,
    tokenizer: str | Path | None = None,
    dtype: Any = None,
    overwrite: bool = False,
) -> Path:
    with claim(out, "import", reads=(src,)) as path:  # before the source is read
        check_free(path, overwrite)
        source = hub.resolve(src)
        generation = GenerationConfig.find(source)  # a bad one is refused before the weights load
        cfg, params, files = load(source, tokenizer, dtype)
        tokenizer_from(files)  # a file that is no tokenizer is refused now, not at its first use
        return checkpoint.save_pretrained(out, cfg, params, files, overwrite, generation)
