"""One writer per output: `import`, `export`, `train` and `demo` claim their destination before
they build it, and a second writer of the same destination is refused with one line saying who
holds it.

A claim is an flock on `.NAME.lock` beside the destination NAME (which may not exist yet, and is
replaced whole when done: `lomo_jax.atomic`). The kernel releases it when the process ends, so a
crash leaves no claim behind. A writer that finishes removes its lock file, still holding it (a
process that opened the file meanwhile sees it gone and opens the new one); one killed leaves the
file behind, and with it whatever it had half built (`.NAME.tmp-*`, ...). The next writer in that
directory takes the dead writer's claim and puts back or removes what it left: a live writer's
claim it cannot take, so nothing in progress is touched, and a file is taken for a lock only if
lomo-jax wrote it.

With several processes (jax.distributed) process 0 claims for all of them.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from lomo_jax.atomic import check_location, recover
from lomo_jax.distributed import is_primary
from lomo_jax.errors import UserError
from lomo_jax.inputs import text_problem

_MARK = "lomo-jax "  # how a lock file lomo-jax wrote starts


class OutputInUseError(UserError, RuntimeError):
    """An output another process is writing."""


class OutputError(UserError, ValueError):
    """A destination no output can have (no name, not UTF-8, the input itself)."""


def lock_file(out: str | Path) -> Path:
    """Where the claim on `out` is held: beside it, in its real directory."""
    out = Path(out).absolute()
    return _real(out.parent) / f".{out.name}.lock"


def _real(path: Path) -> Path:
    """`path` with every link resolved (a loop of links stays as far as it resolves)."""
    return Path(os.path.realpath(path))


@contextlib.contextmanager
def claim(out: str | Path, command: str, reads: tuple[str | Path, ...] = ()) -> Iterator[Path]:
    """Holds the claim on `out` for the block and yields its absolute path; refuses at once when
    another writer holds it (another process, or another claim of this one), or when `out` is
    one of the inputs it `reads` or holds one. Holding it, puts back or removes what a killed
    writer left of `out`, and of any other output beside it whose writer is dead."""
    path = _checked(out, reads)
    if not is_primary():
        yield path
        return
    lock = lock_file(path)
    made = _make_parents(path)
    try:
        held = _take(lock, f"lomo-jax {command}")
    except BaseException:
        _remove_empty(made)
        raise
    if held is None:
        _remove_empty(made)
        raise OutputInUseError(f"{out}: in use by {_holder(lock)}; let it finish or stop it first")
    try:
        recover(path)
        _clean_beside(path.parent)
        yield path
    finally:
        _release(lock, held)
        if not path.exists():
            _remove_empty(made)


def _checked(out: str | Path, reads: tuple[str | Path, ...]) -> Path:
    if not str(out):
        raise OutputError("an empty path is no output")
    if text_problem(str(out)):
        raise OutputError(f"{out!r}: {text_problem(str(out))}")
    path = Path(out).absolute()
    if not path.name or path.name in (".", ".."):
        raise OutputError(f"{out}: not a name an output can have")
    path = _real(path.parent) / path.name
    if text_problem(str(path)):  # a working directory whose name is not UTF-8
        raise OutputError(f"{path!r}: {text_problem(str(path))}")
    check_location(path)
    for source in reads:
        src, real = _real(Path(source)), _real(path)
        if real == src or real in src.parents:
            raise OutputError(f"{out}: is {source} or holds it; write the output elsewhere")
    return path


def _make_parents(path: Path) -> list[Path]:
    """Creates the directories `path` needs; -> those it created, innermost first."""
    made = [p for p in path.parents if not p.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    return made


def _remove_empty(dirs: list[Path]) -> None:
    """Removes the directories a refused writer created, if they are still empty."""
    for d in dirs:
        try:
            d.rmdir()
        except OSError:
            return


def _take(lock: Path, holder: str) -> IO | None:
    """The lock file `lock`, locked and naming `holder`; None when another process holds it."""
    while True:
        f = open(lock, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            return None
        try:
            same = os.path.samestat(os.fstat(f.fileno()), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:  # not removed by a holder that finished while we opened it
            break
        f.close()
    f.seek(0)
    f.truncate()
    f.write(f"{holder}, pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    return f


def _holder(lock: Path) -> str:
    try:
        first = lock.read_text(errors="replace").splitlines()
    except OSError:
        first = []
    return first[0] if first and first[0].startswith(_MARK) else "another process"


def _release(lock: Path, f: IO) -> None:
    with contextlib.suppress(FileNotFoundError):
        lock.unlink()  # still holding it: see the module's docstring
    f.close()


def _clean_beside(directory: Path) -> None:
    """Puts back or removes what dead writers left in `directory` (their lock files name them):
    a complete copy a swap left is put in place, a partial one removed."""
    for lock in directory.glob(".*.lock"):
        name = lock.name[1:-5]
        if not name or not _ours(lock):
            continue
        f = _take(lock, "lomo-jax (cleaning up)")
        if f is None:
            continue  # its writer is alive (this process's own claims included)
        try:
            recover(directory / name)
        finally:
            _release(lock, f)


def _ours(lock: Path) -> bool:
    try:
        with open(lock, "rb") as f:
            return f.read(len(_MARK)) == _MARK.encode()
    except OSError:
        return False
