"""Write a file or directory completely or not at all, and replace one so that a crash at any
moment leaves the old copy or the new one, complete.

A directory is built under a temporary name beside its target (`.NAME.tmp-*`), renamed to
`.NAME.new-*` once complete, then swapped in: in one atomic exchange where the file system has
it (Linux renameat2), else by moving the old copy aside (`.NAME.old-*`) first. What is being
deleted is renamed `.NAME.del-*` first. A crash leaves at most these names behind; `recover`
puts back the complete copy a crash left (new, else old) and removes the rest.
Whoever calls it must know no other process is writing there (a training run holds its lock).

With several processes (jax.distributed) they all write into one temporary directory,
process 0 creates and renames it, and everyone waits for both."""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import jax

from lomo_jax.distributed import barrier, is_primary
from lomo_jax.errors import UserError

_KINDS = ("new", "old", "tmp", "del")  # the first two hold complete copies
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(tmp|new|old|del)-[0-9a-z]+$")


class OutputExistsError(UserError, FileExistsError):
    """An output that is already there (and may not be replaced)."""


class OutputPathError(UserError, NotADirectoryError):
    """An output that cannot be created where it was asked for (under a file)."""


def _sibling(out: Path, kind: str, tag: str | None = None) -> Path:
    return out.parent / f".{out.name}.{kind}-{tag or secrets.token_hex(4)}"


def check_location(out: Path) -> None:
    """`out` can be created: no ancestor of it is a file."""
    for parent in Path(out).absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputPathError(f"{out}: cannot be created, {parent} is a file")
            return


def _mkdir_fresh(out: Path, kind: str) -> Path:
    """A new empty directory beside `out` (permissions from the umask, unlike mkdtemp's 0700)."""
    while True:
        path = _sibling(out, kind)
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def _scratch(out: Path, shared: bool) -> Path:
    """A fresh directory beside `out`: a unique one, or with several processes one name all
    of them agree on."""
    if not shared:
        return _mkdir_fresh(out, "tmp")
    path = _sibling(out, "tmp", "shared")
    if is_primary():
        remove(path)  # left by a killed run
        path.mkdir()
    barrier(f"mkdir {path}")
    return path


def remove(path: Path) -> None:
    """Removes a file or a directory tree (nothing if absent)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _renameat2():
    try:
        f = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    f.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return f


_RENAMEAT2 = _renameat2()
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def exchange(a: Path, b: Path) -> bool:
    """Swaps two paths in one atomic step; False where the system or file system cannot."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: not supported here
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap_in(new: Path, out: Path) -> None:
    """`new` (complete) becomes `out`; the previous `out` is removed only afterwards."""
    if not out.exists() and not out.is_symlink():
        os.replace(new, out)
    elif exchange(new, out):
        remove(new)  # now the old copy
    else:
        old = _sibling(out, "old")
        os.replace(out, old)
        os.replace(new, out)
        discard(old)


def check_free(out: Path, overwrite: bool) -> None:
    """`out` may be written: it is absent or an empty directory, or `overwrite` says replace it
    (unless it is the working directory or holds it: replaced, it would vanish from under us)."""
    if not out.exists():
        return
    if not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise OutputExistsError(f"{out}: already exists (pass --overwrite to replace it)")
    cwd, real = Path(os.path.realpath(Path.cwd())), Path(os.path.realpath(out))
    if real == cwd or real in cwd.parents:
        raise OutputExistsError(f"{out}: the working directory or one holding it; not replaced")


@contextlib.contextmanager
def atomic_directory(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yields a fresh temporary directory that becomes `out` only if the block finishes.

    On any error the temporary directory is removed and an existing `out` is left untouched.
    """
    shared = jax.process_count() > 1
    out = Path(out).absolute()
    check_free(out, overwrite)
    check_location(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _scratch(out, shared)
    try:
        yield tmp
        barrier(f"written {out}")
        if is_primary():
            new = _sibling(out, "new")
            os.replace(tmp, new)  # from here on a crash leaves a complete copy
            _swap_in(new, out)
        barrier(f"renamed {out}")
    except BaseException:
        if is_primary():
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_file(path: Path, data: str | bytes) -> None:
    """Writes a file that is complete or absent, never half-written."""
    tmp = _sibling(path, "tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def copy_file(src: Path, dest: Path) -> None:
    """Copies a file so that `dest` is the whole of `src` or absent."""
    tmp = _sibling(dest, "tmp")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def discard(path: Path) -> None:
    """Removes a directory so that a crash midway never leaves a partial one under its name."""
    aside = _sibling(path, "del")
    os.replace(path, aside)
    remove(aside)


def recover(out: Path) -> None:
    """After a crash: puts back the complete copy of `out` if a swap was cut short, and removes
    the temporary copies."""
    found = {k: sorted(out.parent.glob(f".{glob.escape(out.name)}.{k}-*")) for k in _KINDS}
    if not out.exists() and not out.is_symlink():
        complete = found["new"] or found["old"]  # a new copy wins over the one it replaced
        if complete:
            os.replace(complete[0], out)
    for kind in _KINDS:
        for p in found[kind]:
            if p.exists() or p.is_symlink():
                remove(p)


def recover_all(directory: Path) -> None:
    """`recover` for every name in `directory` that a crash left temporary copies of."""
    if not directory.is_dir():
        return
    names = {m["name"] for p in directory.iterdir() if (m := _LEFTOVER.match(p.name))}
    for name in sorted(names):
        recover(directory / name)
