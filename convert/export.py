"""Export a lomo-jax checkpoint to a directory `transformers.LlamaForCausalLM` loads."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from convert import safetensors_file, torch_pickles
from convert.errors import ConversionError
from convert.layout import hf_tensors
from convert.peft import ADAPTER_DIR, merged_tensors, write_adapter
from lomo_jax import checkpoint
from lomo_jax.atomic import atomic_directory, check_free
from lomo_jax.config import LlamaConfig
from lomo_jax.generation_config import GenerationConfig
from lomo_jax.lock import claim
from lomo_jax.tokenizer import LLAMA3_BOS, LLAMA3_EOS, is_tiktoken, llama3_backend, saved_name

DEFAULT_SHARD_BYTES = 5 * 2**30  # what transformers' save_pretrained uses


def write_hf(
    out: Path,
    cfg: LlamaConfig,
    tensors: Iterable[tuple[str, np.ndarray]],
    max_shard_bytes: int | None = DEFAULT_SHARD_BYTES,
    fmt: str = "safetensors",
) -> Path:
    """Weights and config.json of a Hugging Face directory; sharded with an index above
    `max_shard_bytes`. A safetensors shard is written one tensor at a time."""
    out.mkdir(parents=True, exist_ok=True)
    shards: list[list[tuple[str, np.ndarray]]] = [[]]
    size = 0
    for name, a in tensors:
        if max_shard_bytes and size + a.nbytes > max_shard_bytes and shards[-1]:
            shards.append([])
            size = 0
        shards[-1].append((name, a))
        size += a.nbytes
    dtype = shards[0][0][1].dtype.name
    n = len(shards)
    stem, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    weight_map, total = {}, 0
    for k in range(n):
        fname = f"{stem}.{ext}" if n == 1 else f"{stem}-{k + 1:05d}-of-{n:05d}.{ext}"
        if fmt == "safetensors":
            safetensors_file.write(out / fname, shards[k], metadata={"format": "pt"})
        else:
            torch_pickles.save(out / fname, shards[k])
        weight_map.update(dict.fromkeys((name for name, _ in shards[k]), fname))
        total += sum(a.nbytes for _, a in shards[k])
        shards[k] = []  # release this shard's arrays and contiguous copies before the next
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / f"{stem}.{ext}.index.json").write_text(json.dumps(index, indent=2) + "\n")
    hf_cfg = dict(cfg.to_hf_dict(), torch_dtype=dtype)
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    return out


def export_hf(
    ckpt: str | Path,
    out: str | Path,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
    peft: bool = False,
) -> Path:
    """A lomo-jax model as the family's Hugging Face directory. A model with LoRA factors is
    written merged (W + (alpha / r) B A); with `peft`, as its base weights and the adapter in
    OUT/adapter/, which `PeftModel.from_pretrained(base, OUT/adapter)` loads."""
    with claim(out, "export", reads=(ckpt,)) as path:  # before the checkpoint is read
        check_free(path, overwrite)
        cfg, params, tok_files = checkpoint.load_pretrained(ckpt)
        if peft and cfg.lora is None:
            raise ConversionError(ckpt, "has no LoRA adapter to export (drop --peft)")
        params = checkpoint.tree_to_numpy(params)
        with atomic_directory(out, overwrite) as tmp:
            if cfg.lora is None or peft:
                tensors = hf_tensors(cfg, params)
            else:
                tensors = merged_tensors(cfg, params)
            write_hf(tmp, cfg, tensors, max_shard_bytes)
            if peft:
                write_adapter(tmp / ADAPTER_DIR, cfg, params, str(path))
            GenerationConfig.of(Path(ckpt), cfg).write(tmp)
            _export_tokenizer(tok_files, tmp, cfg)
    return Path(out)


def _export_tokenizer(files: list[Path], out: Path, cfg: LlamaConfig) -> None:
    names = {f.name for f in files}
    if names == {"tokenizer.model"} and is_tiktoken(files[0]):
        # Llama 3's tiktoken file: the tokenizer.json transformers' converter makes of it.
        llama3_backend(files[0]).save(str(out / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": LLAMA3_BOS,
            "eos_token": LLAMA3_EOS,
            "model_input_names": ["input_ids", "attention_mask"],
            "clean_up_tokenization_spaces": False,
        }
    else:
        for f in files:
            (out / saved_name(f)).parent.mkdir(exist_ok=True)
            shutil.copy(f, out / saved_name(f))
        if names != {"tokenizer.model"}:
            return
        # A bare SentencePiece model: tell transformers which class reads it.
        config = {
            "tokenizer_class": "LlamaTokenizer",
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "add_bos_token": True,
            "add_eos_token": False,
            "legacy": True,
        }
    config["model_max_length"] = cfg.max_position_embeddings
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
