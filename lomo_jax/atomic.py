"""Write a directory completely or not at all: build it beside the target, then rename it in.

With several processes (jax.distributed) they all write into the same temporary directory,
process 0 creates and renames it, and everyone waits for both."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import jax

from lomo_jax.distributed import barrier, is_primary


class OutputExistsError(FileExistsError):
    pass


def _scratch(out: Path, shared: bool) -> Path:
    """A fresh directory beside `out`: a unique one, or with several processes one name all
    of them agree on."""
    if not shared:
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    path = out.parent / f".{out.name}.tmp-shared"
    if is_primary():
        shutil.rmtree(path, ignore_errors=True)  # left by a killed run
        path.mkdir()
    barrier(f"mkdir {path}")
    return path


@contextlib.contextmanager
def atomic_directory(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yields a fresh temporary directory that becomes `out` only if the block finishes.

    On any error the temporary directory is removed and an existing `out` is left untouched.
    """
    shared = jax.process_count() > 1
    out = Path(out).absolute()
    if out.exists() and not overwrite and (out.is_file() or any(out.iterdir())):
        raise OutputExistsError(f"{out}: already exists (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _scratch(out, shared)
    try:
        yield tmp
        barrier(f"written {out}")
        if is_primary():
            if out.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
                os.replace(out, old / out.name)
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out)
        barrier(f"renamed {out}")
    except BaseException:
        if is_primary():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
