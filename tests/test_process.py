"""lomo_jax leaves the process alone: importing any module changes no environment variable
and no signal handler, and a library call (a whole training run) installs no signal handler,
clears no cache, hands back no memory and switches no plotting backend. The command line does
those things itself (`lomo_jax.configure()`, `interrupt.caught()`, `host_memory.release()`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax

from lomo_jax import host_memory
from lomo_jax.train import TrainConfig, train
from tests.conftest import CONFIGS, make_hf_dir, random_ids
from tests.test_imports import modules
from tests.test_train_cli import write_rows

REPO = Path(__file__).resolve().parents[1]

_IMPORT_EVERYTHING = """
import importlib, json, os, signal, sys
before = dict(os.environ)
handlers = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
names = json.loads(sys.argv[1])
for name in names:
    importlib.import_module(name)
import lomo_jax
for name in lomo_jax.__all__:  # the lazily imported names too (they import JAX quietly)
    getattr(lomo_jax, name)
from lomo_jax.progress import plot_losses
plot_losses(sys.argv[2], {"": [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}]})
changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))
print(json.dumps({
    "imported": len(names),
    "changed": changed,
    "handlers_kept": handlers == [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)],
    "pyplot": "matplotlib.pyplot" in sys.modules,
}))
"""


def test_importing_any_module_changes_nothing(tmp_path):
    names = sorted(modules())
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    done = subprocess.run(
        [sys.executable, "-c", _IMPORT_EVERYTHING, json.dumps(names), str(tmp_path / "a.png")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(done.stdout.splitlines()[-1])
    assert r["imported"] == len(names) > 40
    assert r["changed"] == [] and r["handlers_kept"] and not r["pyplot"], r
    assert (tmp_path / "a.png").stat().st_size > 0


def test_a_training_run_called_from_python_leaves_the_process_alone(tmp_path, monkeypatch):
    cfg = CONFIGS["gqa"]
    src = make_hf_dir(tmp_path / "hf", cfg)
    data = write_rows(tmp_path / "data.jsonl", random_ids(cfg, 4, 16))
    calls = []

    def record(name):
        return lambda *a, **k: calls.append(name)

    monkeypatch.setattr(signal, "signal", record("signal.signal"))
    monkeypatch.setattr(jax, "clear_caches", record("jax.clear_caches"))
    monkeypatch.setattr(host_memory, "release", record("host_memory.release"))
    monkeypatch.setattr(host_memory, "configure", record("host_memory.configure"))
    env = dict(os.environ)
    c = TrainConfig(
        model=str(src), data=str(data), out=str(tmp_path / "run"), steps=1, batch_size=2, seq_len=16
    )
    phases = []
    history = train(c, after_phase=phases.append)
    assert [m["step"] for m in history] == [1]
    assert calls == [] and dict(os.environ) == env
    assert phases == ["compiled", "loaded"]
