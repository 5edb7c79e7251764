"""The lomo-jax model checkpoint: `config.json` (Hugging Face keys), the parameter tree saved with
orbax under `params/`, and the tokenizer files copied beside them."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from lomo_jax.atomic import atomic_directory
from lomo_jax.config import LlamaConfig

PARAMS_DIR = "params"
CONFIG_FILE = "config.json"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json")


def is_checkpoint(path: str | Path) -> bool:
    p = Path(path)
    return (p / PARAMS_DIR).is_dir() and (p / CONFIG_FILE).is_file()


def write_params(path: Path, params: Any) -> None:
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path.absolute(), params)
        ckptr.wait_until_finished()


def read_params(path: Path, sharding: Any = None) -> Any:
    """Restores the tree; with `sharding` (a tree of shardings or one for all) onto devices."""
    path = path.absolute()
    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(path)
        tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree
        if sharding is None:
            sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = (sharding if not isinstance(sharding, jax.sharding.Sharding)
                     else jax.tree.map(lambda _: sharding, tree))
        target = jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s),
                              tree, shardings)
        return ckptr.restore(path, target)


def save_pretrained(
    out: str | Path,
    config: LlamaConfig,
    params: Any,
    tokenizer_files: Iterable[str | Path] = (),
    overwrite: bool = False,
) -> Path:
    with atomic_directory(out, overwrite) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
        for f in tokenizer_files:
            f = Path(f)
            # A SentencePiece model travels under the name Hugging Face looks for.
            shutil.copy(f, tmp / ("tokenizer.model" if f.suffix == ".model" else f.name))
        write_params(tmp / PARAMS_DIR, params)
    return Path(out)


def load_pretrained(path: str | Path, sharding: Any = None) -> tuple[LlamaConfig, Any, list[Path]]:
    p = Path(path)
    cfg = LlamaConfig.from_json_file(p / CONFIG_FILE)
    params = read_params(p / PARAMS_DIR, sharding)
    toks = [p / n for n in TOKENIZER_FILES if (p / n).exists()]
    return cfg, params, toks


def tree_to_numpy(tree: Any) -> Any:
    return jax.tree.map(np.asarray, tree)
