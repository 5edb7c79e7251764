"""Handing the host memory a phase has freed back to the operating system.

glibc's malloc keeps freed memory inside its heaps, resident and counted in RSS, until something
asks for it back. Compiling a training step leaves about 0.4 GB there (LLVM's many small
allocations; measured on a 2-layer model, the program is no smaller at 7B), and reading a
checkpoint leaves host copies' worth: on a machine whose RAM the weights nearly fill, that is
memory the step's own buffers cannot use, and how much of it stays depends on the process's
history. `release()` after each phase leaves the step's peak to the step.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc


def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none (musl, macOS)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_TRIM = _malloc_trim()


def release() -> None:
    """Collects Python's garbage, then returns every malloc arena's free pages to the OS."""
    gc.collect()
    if _TRIM is not None:
        _TRIM(0)
