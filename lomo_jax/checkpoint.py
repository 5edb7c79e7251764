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


def _checkpointer() -> ocp.Checkpointer:
    # Write at most ~1 GB at a time: orbax otherwise stages host copies of every array at once,
    # which doubles the peak memory of an import.
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(
        save_concurrent_gb=1, restore_concurrent_gb=1,
        save_device_host_concurrent_gb=1))


def to_device_in_place(tree: dict) -> dict:
    """Replaces each numpy leaf of a nested dict by a jax array, one at a time, so the host copy
    of a leaf is freed as soon as its device copy exists (never two copies of the model)."""
    for k, v in tree.items():
        tree[k] = to_device_in_place(v) if isinstance(v, dict) else jax.device_put(v)
    return tree


def write_params(path: Path, params: Any) -> None:
    with _checkpointer() as ckptr:
        ckptr.save(path.absolute(), args=ocp.args.PyTreeSave(params))


def read_params(path: Path, sharding: Any = None) -> Any:
    """Restores the tree; with `sharding` (a tree of shardings, or one for all) onto devices."""
    path = path.absolute()
    with _checkpointer() as ckptr:
        meta = ckptr.metadata(path)
        tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree
        if sharding is None:
            sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        if isinstance(sharding, jax.sharding.Sharding):
            sharding = jax.tree.map(lambda _: sharding, tree)
        restore_args = jax.tree.map(
            lambda m, s: ocp.ArrayRestoreArgs(sharding=s, global_shape=m.shape, dtype=m.dtype),
            tree, sharding)
        return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))


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
