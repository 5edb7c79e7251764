"""The lomo-jax model checkpoint: `config.json` (Hugging Face keys), the parameter tree saved with
orbax under `params/`, `generation_config.json`, and the tokenizer files (chat templates
included) copied beside them.

`params/checksums.json` records every file's size and checksum when it is written; a load checks
them first, so a truncated, missing or damaged file is an error naming it, never weights that
load silently wrong."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import xxhash

from lomo_jax.atomic import atomic_directory, copy_file, write_file
from lomo_jax.config import LlamaConfig
from lomo_jax.distributed import barrier, is_primary
from lomo_jax.errors import UserError
from lomo_jax.generation_config import GenerationConfig
from lomo_jax.inputs import read_json
from lomo_jax.lora import LoraConfig
from lomo_jax.parameters import leaf_name, params_of
from lomo_jax.tokenizer import saved_name, tokenizer_files

# (leaf name, global shape) -> where the leaf's shards go
ShardingFn = Callable[[str, tuple[int, ...]], jax.sharding.Sharding]

PARAMS_DIR = "params"
CONFIG_FILE = "config.json"
ADAPTER_FILE = "adapter_config.json"  # the LoRA settings of a model with factors (lomo_jax.lora)


def is_checkpoint(path: str | Path) -> bool:
    p = Path(path)
    return (p / PARAMS_DIR).is_dir() and (p / CONFIG_FILE).is_file()


def _checkpointer() -> ocp.Checkpointer:
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler())


LEAVES_FILE = "leaves.json"
CHECKSUMS_FILE = "checksums.json"


# Leaves larger than this are written as slices along their first (layer) axis.
PIECE_BYTES = 256 * 2**20


@contextlib.contextmanager
def _os_errors(dest: Path) -> Iterator[None]:
    """tensorstore's failed writes (a full disk, no permission) as the OSError they are: orbax
    raises them as ValueError("RESOURCE_EXHAUSTED: ... [os_error_code='28']")."""
    try:
        yield
    except ValueError as e:
        code = re.search(r"os_error_code='(\d+)'", str(e))
        if code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(dest)) from None


def write_params(path: Path, params: Any, piece_bytes: int = PIECE_BYTES) -> None:
    """One orbax checkpoint per leaf (and per layer slice of a stacked leaf larger than
    `piece_bytes`), one after another.

    Saved in one go, orbax stages a host copy of every array at once (save_concurrent_gb does not
    bound it on CPU), doubling an import's peak memory; piece by piece the extra is one piece.
    An import passes numpy leaves (wrapping them as jax arrays first costs another full copy).
    """
    path = path.absolute()
    path.mkdir(parents=True, exist_ok=True)
    index = []
    with _checkpointer() as ckptr:
        for leaf_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
            name = leaf_name(leaf_path)
            nbytes = leaf.size * leaf.dtype.itemsize
            pieces = leaf.shape[0] if leaf.ndim > 1 and nbytes > piece_bytes else 0
            # One slice at a time: a list of them would be a second copy of the stack.
            for i, piece in enumerate((leaf[i] for i in range(pieces)) if pieces else [leaf]):
                dest = path / (f"{name}@{i}" if pieces else name)
                with _os_errors(dest):
                    ckptr.save(dest, args=ocp.args.PyTreeSave({"value": piece}))
            index.append({"name": name, "pieces": pieces})
    barrier(f"wrote {path}")  # every process's shards are there before they are summed up
    if is_primary():
        (path / LEAVES_FILE).write_text(json.dumps(index, indent=1) + "\n")
        write_checksums(path)


class CheckpointError(UserError, ValueError):
    """A checkpoint file that is missing, damaged or does not fit the model."""


def _digest(f: Path) -> str:
    h = xxhash.xxh3_128()
    with open(f, "rb") as stream:
        while chunk := stream.read(16 * 2**20):
            h.update(chunk)
    return h.hexdigest()


def _checked_files(directory: Path) -> Iterator[Path]:
    """The files a directory's checksums cover: a subdirectory with checksums of its own counts
    as its checksums file (which covers the rest)."""
    for p in sorted(directory.iterdir()):
        if p.is_dir():
            nested = p / CHECKSUMS_FILE
            yield from [nested] if nested.is_file() else _checked_files(p)
        elif p.name != CHECKSUMS_FILE:
            yield p


def write_checksums(directory: Path) -> None:
    """Records the size and xxh3-128 checksum of every file under `directory` (xxh3: a fast
    hash, docs/measurements.md)."""
    files = {
        str(f.relative_to(directory)): [f.stat().st_size, _digest(f)]
        for f in _checked_files(directory)
    }
    write_file(directory / CHECKSUMS_FILE, json.dumps({"xxh3_128": files}, indent=1) + "\n")


def verify_checksums(directory: Path) -> None:
    """Every file `write_checksums` recorded is there, of its size and checksum (directories
    written before checksums were kept pass unchecked)."""
    record = directory / CHECKSUMS_FILE
    if not record.exists():
        return
    files = read_json(record, error=CheckpointError)
    try:
        entries = [
            (_inside(directory, rel), int(size), str(digest))
            for rel, (size, digest) in files["xxh3_128"].items()
        ]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise CheckpointError(f"{record}: damaged (not a checksum list)") from None
    for f, size, digest in entries:
        if not f.is_file():
            raise CheckpointError(f"{f}: missing")
        if f.stat().st_size != size:
            raise CheckpointError(f"{f}: {f.stat().st_size} bytes, {size} when saved (cut short?)")
        if _digest(f) != digest:
            raise CheckpointError(f"{f}: damaged (its checksum differs from the one saved)")


def _inside(directory: Path, rel: str) -> Path:
    """`directory / rel` for a path `rel` that stays inside `directory`."""
    if not isinstance(rel, str) or Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise ValueError(rel)
    return directory / rel


_LEAF_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")


def _read_index(path: Path) -> list[dict]:
    f = path / LEAVES_FILE
    if not f.exists():
        raise CheckpointError(f"{f}: missing (not a lomo-jax checkpoint?)")
    index = read_json(f, error=CheckpointError)
    if not isinstance(index, list) or not all(
        isinstance(e, dict)
        and isinstance(e.get("name"), str)
        and _LEAF_NAME.fullmatch(e["name"])
        and type(e.get("pieces")) is int
        and e["pieces"] >= 0
        for e in index
    ):
        raise CheckpointError(f"{f}: not a lomo-jax parameter index")
    return index


def _metadata(ckptr: ocp.Checkpointer, item: Path):
    """The shape and dtype orbax saved for one leaf (or layer piece), nothing read."""
    with _unreadable(item):
        meta = ckptr.metadata(item)
        return (meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree)["value"]


def _saved_shapes(path: Path, index: list[dict]) -> dict[str, tuple[int, ...]]:
    """Each leaf's shape as saved under `path` (orbax's metadata: no array is read)."""
    path, shapes = path.absolute(), {}  # orbax finds no metadata under a relative path
    with _checkpointer() as ckptr:
        for e in index:
            name, pieces = e["name"], e["pieces"]
            m = _metadata(ckptr, path / (f"{name}@0" if pieces else name))
            shapes[name] = (pieces, *m.shape) if pieces else tuple(m.shape)
    return shapes


def check_fits(directory: Path, cfg: LlamaConfig) -> None:
    """The weights under `directory` are the tensors `cfg` (its config.json) describes, in its
    shapes (lomo_jax.parameters.TABLE): an edited config is refused before a weight is read.
    Where they disagree, a file damaged since it was saved is named first (its checksum)."""
    params = directory / PARAMS_DIR
    try:
        problem = _misfit(_saved_shapes(params, _read_index(params)), cfg)
    except CheckpointError:
        verify_checksums(params)
        raise
    if problem:
        verify_checksums(params)
        raise CheckpointError(f"{directory / CONFIG_FILE}: does not fit {params}: {problem}")


def _misfit(saved: dict[str, tuple[int, ...]], cfg: LlamaConfig) -> str | None:
    """How the saved shapes differ from those `cfg` gives, or None."""
    rows = params_of(cfg)
    for p in rows:
        if p.name not in saved:
            return f"{p.name!r} is missing from the weights"
        if saved[p.name] != p.shape(cfg):
            return f"{p.name!r} is {list(saved[p.name])}, the config gives {list(p.shape(cfg))}"
    extra = sorted(set(saved) - {p.name for p in rows})
    return f"{extra[0]!r} is in the weights, not in the config's model" if extra else None


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stack: jax.Array, layer: jax.Array, i) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(stack, layer, i, 0)


def _layer_sharding(s: jax.sharding.Sharding) -> jax.sharding.Sharding:
    """The sharding of one layer of a stack laid out as `s` (the layer axis is never split)."""
    if isinstance(s, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec(*s.spec[1:]))
    return s


def read_params(path: Path, sharding: ShardingFn | None = None, verified: bool = False) -> dict:
    """Restores the tree onto the first device, or with `sharding(leaf name, shape)` straight
    into each device's shards (each process reads only what its devices hold; a stack saved in
    layer pieces is filled piece by piece, so the extra is one layer's shard). Its checksums are
    checked first, unless the caller has (`verified`)."""
    path = path.absolute()
    if not verified:
        verify_checksums(path)
    index = _read_index(path)
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    sharding = sharding or (lambda name, shape: default)
    tree: dict = {}
    with _checkpointer() as ckptr:

        def shape_dtype(item: Path):
            return _metadata(ckptr, item)

        def restore(item: Path, s: jax.sharding.Sharding) -> jax.Array:
            m = shape_dtype(item)
            arg = ocp.ArrayRestoreArgs(sharding=s, global_shape=m.shape, dtype=m.dtype)
            with _unreadable(item):
                args = ocp.args.PyTreeRestore(restore_args={"value": arg})
                return ckptr.restore(item, args=args)["value"]

        for entry in index:
            name, pieces = entry["name"], entry["pieces"]
            if pieces:  # layer by layer into the stacked leaf's shards
                m = shape_dtype(path / f"{name}@0")
                s = sharding(name, (pieces, *m.shape))
                value = jnp.zeros((pieces, *m.shape), m.dtype, device=s)
                for i in range(pieces):
                    layer = restore(path / f"{name}@{i}", _layer_sharding(s))
                    value = _set_layer(value, layer, i)
            else:
                value = _owned(restore(path / name, sharding(name, shape_dtype(path / name).shape)))
            node = tree
            *parents, leaf = name.split(".")
            for k in parents:
                node = node.setdefault(k, {})
            node[leaf] = value
    return tree


def _owned(x: jax.Array) -> jax.Array:
    """`x` in a buffer XLA allocated. On CPU a restored array may share the numpy buffer
    tensorstore read into, and XLA cannot donate such a buffer: a training step would write
    that leaf to a new one and hold both. The copy costs one leaf for a moment, while reading."""
    if all(d.platform != "cpu" for d in x.sharding.device_set):
        return x
    return jnp.copy(x)


@contextlib.contextmanager
def _unreadable(item: Path) -> Iterator[None]:
    """orbax's many errors for a missing or damaged leaf, as one line naming it (checkpoints
    with checksums are checked before orbax sees them)."""
    try:
        yield
    except (OSError, ValueError, KeyError, TypeError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{item}: cannot read ({msg})") from None


def read_like(path: Path, like: Any) -> Any:
    """Restores a tree written by `write_params` into the structure and shardings of `like` (any
    pytree of arrays), whatever mesh it was saved from."""
    named = {leaf_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(like)[0]}
    index = _read_index(path)
    saved = {e["name"] for e in index}
    if saved != set(named):
        odd = sorted(saved ^ set(named))[0]
        raise CheckpointError(
            f"{path}: its tensors do not match this model and optimizer ({odd!r} is in "
            f"{'the checkpoint only' if odd in saved else 'the model only'})"
        )
    verify_checksums(path)
    for name, shape in _saved_shapes(path, index).items():  # before anything is allocated
        if shape != named[name].shape:
            raise CheckpointError(
                f"{path}: {name!r} is {list(shape)}, this run needs {list(named[name].shape)}"
            )
    flat = read_params(path, lambda name, shape: named[name].sharding, verified=True)
    leaves = []
    for name, want in named.items():
        node = flat
        for k in name.split("."):
            node = node[k]
        if (node.shape, node.dtype) != (want.shape, want.dtype):
            raise CheckpointError(
                f"{path}: {name!r} is {node.dtype}{list(node.shape)}, this run needs "
                f"{want.dtype}{list(want.shape)}"
            )
        leaves.append(node)
    return jax.tree.unflatten(jax.tree.structure(like), leaves)


def write_model(
    directory: Path,
    config: LlamaConfig,
    params: Any,
    tokenizer_files: Iterable[str | Path] = (),
    generation: GenerationConfig | None = None,
) -> None:
    """Writes config, generation config (by default the one `config` implies), tokenizer and
    params into an existing directory (a training run's output directory is also its final
    model). The params folder appears only once complete. A model with LoRA factors
    (`config.lora`) has their settings in peft's adapter_config.json."""
    for f in tokenizer_files if is_primary() else ():
        f = Path(f)
        dest = directory / saved_name(f)
        if f.resolve() != dest.resolve():
            dest.parent.mkdir(exist_ok=True)
            copy_file(f, dest)
    with atomic_directory(directory / PARAMS_DIR, overwrite=True) as tmp:
        write_params(tmp, params)
    if is_primary():
        (generation or GenerationConfig.derived(config)).write(directory)
        write_file(directory / CONFIG_FILE, json.dumps(config.to_hf_dict(), indent=2) + "\n")
        if config.lora is not None:
            write_file(directory / ADAPTER_FILE, json.dumps(config.lora.to_peft(), indent=2) + "\n")
        else:
            (directory / ADAPTER_FILE).unlink(missing_ok=True)


def save_pretrained(
    out: str | Path,
    config: LlamaConfig,
    params: Any,
    tokenizer_files: Iterable[str | Path] = (),
    overwrite: bool = False,
    generation: GenerationConfig | None = None,
) -> Path:
    """Writes a model to `out` whole or not at all (claim `out` first: `lomo_jax.lock`)."""
    with atomic_directory(out, overwrite) as tmp:
        write_model(tmp, config, params, tokenizer_files, generation)
    return Path(out)


def read_model_info(path: str | Path) -> tuple[LlamaConfig, list[Path]]:
    """A saved model's config and tokenizer files, its weights unread."""
    p = Path(path)
    raw = read_json(p / CONFIG_FILE, error=CheckpointError)
    try:
        cfg = LlamaConfig.from_hf_dict(raw)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{p / CONFIG_FILE}: invalid config: {e}") from None
    if (p / ADAPTER_FILE).is_file():
        adapter = read_json(p / ADAPTER_FILE, error=CheckpointError)
        try:
            cfg = cfg.replace(lora=LoraConfig.from_peft(adapter, cfg.num_hidden_layers))
        except ValueError as e:  # a LoraConfigError
            raise CheckpointError(f"{p / ADAPTER_FILE}: {e}") from None
    check_fits(p, cfg)
    return cfg, tokenizer_files(p)


def load_pretrained(
    path: str | Path, sharding: ShardingFn | None = None
) -> tuple[LlamaConfig, Any, list[Path]]:
    cfg, toks = read_model_info(path)
    return cfg, read_params(Path(path) / PARAMS_DIR, sharding), toks


def tree_to_numpy(tree: Any) -> Any:
    return jax.tree.map(np.asarray, tree)
