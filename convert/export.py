"""Export a lomo-jax checkpoint to a directory `transformers.LlamaForCausalLM` loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from convert.layout import hf_tensors
from convert.sources import numpy_to_torch
from lomo_jax import checkpoint
from lomo_jax.atomic import atomic_directory

DEFAULT_SHARD_BYTES = 5 * 2**30  # what transformers' save_pretrained uses


def _dtype_name(a: np.ndarray) -> str:
    return {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[a.dtype.name]


def export_hf(
    ckpt: str | Path,
    out: str | Path,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
) -> Path:
    from safetensors.torch import save_file

    cfg, params, tok_files = checkpoint.load_pretrained(ckpt)
    params = checkpoint.tree_to_numpy(params)
    dtype = _dtype_name(params["embed"]["embedding"])
    with atomic_directory(out, overwrite) as tmp:
        shards: list[dict[str, np.ndarray]] = [{}]
        size = 0
        for name, a in hf_tensors(cfg, params):
            if size + a.nbytes > max_shard_bytes and shards[-1]:
                shards.append({})
                size = 0
            shards[-1][name] = a
            size += a.nbytes
        n = len(shards)
        weight_map, total = {}, 0
        for k, shard in enumerate(shards):
            fname = "model.safetensors" if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            save_file(
                {name: numpy_to_torch(a) for name, a in shard.items()},
                tmp / fname,
                metadata={"format": "pt"},
            )
            for name, a in shard.items():
                weight_map[name] = fname
                total += a.nbytes
            shards[k] = {}  # release this shard's contiguous copies before the next
        if n > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        hf_cfg = dict(cfg.to_hf_dict(), torch_dtype=dtype)
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        _export_tokenizer(tok_files, tmp, cfg)
    return Path(out)


def _export_tokenizer(files: list[Path], out: Path, cfg) -> None:
    for f in files:
        shutil.copy(f, out / f.name)
    names = {f.name for f in files}
    if names == {"tokenizer.model"}:
        # A bare SentencePiece model: tell transformers which class reads it.
        (out / "tokenizer_config.json").write_text(
            json.dumps(
                {
                    "tokenizer_class": "LlamaTokenizer",
                    "bos_token": "<s>",
                    "eos_token": "</s>",
                    "unk_token": "<unk>",
                    "add_bos_token": True,
                    "add_eos_token": False,
                    "legacy": True,
                    "model_max_length": cfg.max_position_embeddings,
                },
                indent=2,
            )
            + "\n"
        )
