"""Keeping a run's resident memory to what it uses, whatever the process did before.

On a machine whose RAM the weights nearly fill, memory a finished phase left resident is memory
the step's own buffers cannot use, and how much of it a process keeps depends on its history:
a fresh and a resumed run of the same LLaMA-7B step peaked apart by different amounts from one
try to the next (README, LLaMA-7B on a 24 GB machine). Three things kept it, all measured there:
- glibc's malloc keeps freed memory inside its heaps until asked for it back: compiling a
  training step leaves LLVM's many small allocations there, reading a checkpoint host copies'
  worth;
- its mmap threshold moves: after the first free of an mmapped block of up to 32 MiB, blocks
  that size come from the heap and stay there when freed, by an amount that depends on the
  order of earlier allocations;
- the code pages the compiler ran (most of them XLA's) stay mapped until the kernel needs the
  memory, which depends on what else the machine read meanwhile.
`configure()` fixes the thresholds at the start; `release()` after each phase hands back the
rest, leaving the step's peak to the step.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from pathlib import Path

MADV_PAGEOUT = 21  # Linux >= 5.4
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
# Blocks from 4 MiB up (every array worth counting) are mapped on their own and unmapped when
# freed; below it, the 1 MiB blocks XLA:CPU's matrix products allocate and free by the thousand
# per step stay in the heap (a threshold of 128 KiB made them system calls, and the products
# slower: docs/measurements.md). The heap is trimmed only once 64 MiB are
# free at its top: with the thresholds fixed, glibc's default of 128 KiB would shrink the heap
# and grow it again around each of those blocks.
MMAP_THRESHOLD_BYTES = 4 * 2**20
TRIM_THRESHOLD_BYTES = 64 * 2**20


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


_LIBC = _libc()
_TRIM = getattr(_LIBC, "malloc_trim", None)  # glibc only (not musl, not macOS)
_MALLOPT = getattr(_LIBC, "mallopt", None)
_MADVISE = getattr(_LIBC, "madvise", None)
if _MADVISE is not None:
    _MADVISE.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


def _read_only_file_mappings() -> list[tuple[int, int]]:
    """(start, length) of every mapping of a file this process cannot write to through it: the
    code and constants of Python, XLA and every other library."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:  # no /proc: not Linux
        return []
    out = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/") and "w" not in fields[1]:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            out.append((start, end - start))
    return out


def configure() -> None:
    """Fixes malloc's mmap and trim thresholds (glibc; elsewhere nothing happens). Call it once,
    before the work starts: the CLI does."""
    if _MALLOPT is not None:
        _MALLOPT(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        _MALLOPT(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)


def release() -> None:
    """Collects Python's garbage, returns every malloc arena's free pages to the OS, and asks the
    kernel to reclaim the pages of read-only file mappings (the libraries' code) that no other
    process maps; those the next phase runs come back from the page cache or the disk."""
    gc.collect()
    if _TRIM is not None:
        _TRIM(0)
    if _MADVISE is not None:
        for start, length in _read_only_file_mappings():
            _MADVISE(start, length, MADV_PAGEOUT)
