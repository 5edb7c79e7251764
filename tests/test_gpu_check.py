"""benchmarks/gpu_check.py, the one prepared GPU check, run dry on the CPU (tiny shapes), so it
cannot rot before a GPU is lent: every correctness check passes, every row measures a step, and
on the CPU the deviceless plan is the very compile the row runs."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # several processes, about 2 minutes on 2 cores
def test_dry_run_checks_and_measures_every_row(tmp_path):
    cmd = [sys.executable, "benchmarks/gpu_check.py", "--out", str(tmp_path), "--dry-run"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    checks = {c["check"]: c for c in report["checks"]}
    assert checks.pop("cuDNN attention")["skipped"] == "needs a GPU"
    assert len(checks) == 6 and all(c["ok"] for c in checks.values()), checks
    rows = {r["row"]: r for r in report["rows"]}
    assert set(rows) == {"fused-adalomo tiny 2x64", "torch-adalomo tiny 2x64", "adamw tiny 2x64"}
    if not all(importlib.util.find_spec(m) for m in ("torch", "lomo_optim")):  # make test-latest
        assert rows.pop("torch-adalomo tiny 2x64")["error"].startswith("skipped: ")
    for r in rows.values():
        assert r["tokens_per_s"] > 0 and r["finite"], r
    fused = rows["fused-adalomo tiny 2x64"]
    assert fused["plan_bytes"] == fused["xla_plan_bytes"] > fused["param_bytes"]
    table = (tmp_path / "gpu_check.md").read_text()
    assert all(name in table for name in rows)
