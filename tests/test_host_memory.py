"""lomo_jax.host_memory does hand memory back: each check runs in a fresh process, whose malloc
and mappings no other test has touched (glibc and Linux only: elsewhere it does nothing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
    reason="malloc's thresholds and MADV_PAGEOUT are glibc's and Linux's",
)

_RSS = """
def rss(kind):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status")
                if l.startswith(kind + ":"))
"""


def _run(script: str, *args: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _RSS + script, *args], cwd=REPO, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


# Frees one 16 MiB block (mmapped: glibc then raises its threshold to 16 MiB), then allocates 8
# more, each followed by an untouched 1 MiB block that pins it inside the heap (no free chunk
# that size is left by the imports), and frees the 8.
_FRAGMENT = """
import ctypes, json, sys
from lomo_jax import host_memory
if sys.argv[1:] == ["configure"]:
    host_memory.configure()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = (ctypes.c_void_p,)
libc.memset.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t)
SIZE = 16 * 2**20
def block(n):
    p = libc.malloc(n); libc.memset(p, 1, n); return p
libc.free(block(SIZE))
before = rss("RssAnon")
big = []
for _ in range(8):
    big.append(block(SIZE)); libc.malloc(2**20)
for p in big:
    libc.free(p)
print(json.dumps({"kept": rss("RssAnon") - before}))
"""


def test_configured_malloc_unmaps_freed_large_blocks():
    default = _run(_FRAGMENT)["kept"]
    configured = _run(_FRAGMENT, "configure")["kept"]
    assert default >= 100 * 2**20  # glibc's moving threshold: 8 x 16 MiB stay resident
    assert configured < 8 * 2**20, configured


_PAGE_OUT = """
import json, mmap, os, tempfile
from lomo_jax import host_memory
with tempfile.TemporaryFile() as f:
    f.write(b"x" * (64 * 2**20)); f.flush(); os.fsync(f.fileno())  # clean pages: reclaimable
    m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    before = rss("RssFile")
    sum(m[i] for i in range(0, len(m), 4096))  # every page resident
    touched = rss("RssFile") - before
    host_memory.release()
    left = rss("RssFile") - before
    # The pages come back when read again.
    assert sum(m[i] for i in range(0, len(m), 4096)) == ord("x") * len(m) // 4096
print(json.dumps({"touched": touched, "left": left}))
"""


def _kernel() -> tuple[int, int]:
    major, minor = os.uname().release.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


@pytest.mark.skipif(_kernel() < (5, 4), reason="MADV_PAGEOUT is Linux 5.4's")
def test_release_hands_back_mapped_file_pages():
    r = _run(_PAGE_OUT)
    assert r["touched"] >= 60 * 2**20
    assert r["left"] < 4 * 2**20, r


def test_jax_runs_on_after_its_library_pages_are_handed_back():
    r = _run(
        """
import json
from lomo_jax import cuda_plugin, host_memory
cuda_plugin.import_jax()
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.tanh(x) @ x.T)
a = f(jnp.ones((8, 8))).tolist()
host_memory.release()
print(json.dumps({"same": f(jnp.ones((8, 8))).tolist() == a}))
"""
    )
    assert r["same"]
