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
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def is_checkpoint(path: str | Path) -> bool:
    p = Path(path)
    return (p / PARAMS_DIR).is_dir() and (p / CONFIG_FILE).is_file()


def _checkpointer() -> ocp.Checkpointer:
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler())


LEAVES_FILE = "leaves.json"


def _leaf_name(path) -> str:
    parts = (getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path)
    return ".".join(str(p) for p in parts)


def write_params(path: Path, params: dict) -> None:
    """One orbax checkpoint per leaf, written one after another.

    Saved in one go, orbax stages a host copy of every array at once (save_concurrent_gb does not
    bound it on CPU), doubling an import's peak memory; leaf by leaf the extra is about one leaf.
    An import passes numpy leaves (wrapping them as jax arrays first costs another full copy).
    """
    path = path.absolute()
    path.mkdir(parents=True, exist_ok=True)
    names = []
    with _checkpointer() as ckptr:
        for leaf_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
            name = _leaf_name(leaf_path)
            ckptr.save(path / name, args=ocp.args.PyTreeSave({"value": leaf}))
            names.append(name)
    (path / LEAVES_FILE).write_text(json.dumps(names, indent=1) + "\n")


def read_params(path: Path, sharding: Any = None) -> dict:
    """Restores the tree; with `sharding` (a dict of shardings by leaf name, or one for all)
    straight onto devices."""
    path = path.absolute()
    names = json.loads((path / LEAVES_FILE).read_text())
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    tree: dict = {}
    with _checkpointer() as ckptr:
        for name in names:
            meta = ckptr.metadata(path / name)
            m = (meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree)["value"]
            s = sharding.get(name, default) if isinstance(sharding, dict) else sharding or default
            args = {"value": ocp.ArrayRestoreArgs(sharding=s, global_shape=m.shape, dtype=m.dtype)}
            value = ckptr.restore(path / name, args=ocp.args.PyTreeRestore(restore_args=args))
            node = tree
            *parents, leaf = name.split(".")
            for k in parents:
                node = node.setdefault(k, {})
            node[leaf] = value["value"]
    return tree


def read_like(path: Path, like: Any) -> Any:
    """Restores a tree written by `write_params` into the structure of `like` (any pytree)."""
    flat = read_params(path)
    leaves = []
    for leaf_path, _ in jax.tree_util.tree_flatten_with_path(like)[0]:
        node = flat
        for k in _leaf_name(leaf_path).split("."):
            node = node[k]
        leaves.append(node)
    return jax.tree.unflatten(jax.tree.structure(like), leaves)


def write_model(
    directory: Path, config: LlamaConfig, params: Any, tokenizer_files: Iterable[str | Path] = ()
) -> None:
    """Writes config, tokenizer and params into an existing directory (a training run's output
    directory is also its final model). The params folder appears only once complete."""
    for f in tokenizer_files:
        f = Path(f)
        # A SentencePiece model travels under the name Hugging Face looks for.
        dest = directory / ("tokenizer.model" if f.suffix == ".model" else f.name)
        if f.resolve() != dest.resolve():
            shutil.copy(f, dest)
    with atomic_directory(directory / PARAMS_DIR, overwrite=True) as tmp:
        write_params(tmp, params)
    (directory / CONFIG_FILE).write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")


def save_pretrained(
    out: str | Path,
    config: LlamaConfig,
    params: Any,
    tokenizer_files: Iterable[str | Path] = (),
    overwrite: bool = False,
) -> Path:
    with atomic_directory(out, overwrite) as tmp:
        write_model(tmp, config, params, tokenizer_files)
    return Path(out)


def load_pretrained(path: str | Path, sharding: Any = None) -> tuple[LlamaConfig, Any, list[Path]]:
    p = Path(path)
    cfg = LlamaConfig.from_json_file(p / CONFIG_FILE)
    params = read_params(p / PARAMS_DIR, sharding)
    toks = [p / n for n in TOKENIZER_FILES if (p / n).exists()]
    return cfg, params, toks


def tree_to_numpy(tree: Any) -> Any:
    return jax.tree.map(np.asarray, tree)
