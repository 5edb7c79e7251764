"""Peak resident memory of `lomo-jax` commands, each run in a fresh process."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

# The peak RSS of this process's own address space. (getrusage's ru_maxrss would carry over the
# parent's peak across fork + exec, and the parent may just have written a whole checkpoint.)
_HWM = "int(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:'))) * 1024"


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def child_peak_rss(argv: list[str]) -> tuple[int, float]:
    """Runs `lomo-jax argv` in a fresh process; returns (its peak RSS in bytes, seconds)."""
    t0 = time.perf_counter()
    code = (
        "import sys; from lomo_jax.cli import main; rc = main(sys.argv[1:]); "
        f"print({_HWM}, file=sys.stderr); sys.exit(rc)"
    )
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"lomo-jax {' '.join(argv)} failed:\n{r.stderr}")
    return int(r.stderr.strip().splitlines()[-1]), time.perf_counter() - t0


def baseline_rss() -> int:
    """Peak RSS of just importing the libraries the CLI loads."""
    code = f"import jax, torch, orbax.checkpoint, safetensors, lomo_jax, convert; print({_HWM})"
    return int(subprocess.check_output([sys.executable, "-c", code]).strip())
