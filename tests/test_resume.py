"""A run killed with SIGKILL after a checkpoint and resumed equals a run never interrupted, bit
for bit: same loss curve, same weights, with shuffling on and AdaLomo state."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import yaml

import lomo_jax
from lomo_jax.cli import main
from tests.conftest import CONFIGS, make_hf_dir, random_ids
from tests.test_train_cli import write_rows

CFG = CONFIGS["gqa"]
STEPS = 20


def args(src, data, out):
    return [
        "train",
        "--model",
        str(src),
        "--data",
        str(data),
        "--out",
        str(out),
        "--optimizer",
        "adalomo",
        "--lr",
        "0.01",
        "--steps",
        str(STEPS),
        "--batch-size",
        "4",
        "--seq-len",
        "16",
        "--schedule",
        "cosine",
        "--warmup-steps",
        "3",
        "--clip-grad-norm",
        "1.0",
        "--seed",
        "7",
        "--save-every",
        "5",
        "--eval-fraction",
        "0.2",
        "--eval-every",
        "10",
    ]


def losses(out):
    return [
        (m["step"], m.get("loss"), m.get("eval_loss"))
        for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    ]


def test_kill_9_then_resume_is_bit_identical(tmp_path):
    src = make_hf_dir(tmp_path / "hf", CFG)
    data = write_rows(tmp_path / "data.jsonl", random_ids(CFG, 40, 16, seed=1))

    assert main(args(src, data, tmp_path / "straight")) == 0

    killed = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    proc = subprocess.Popen(
        [sys.executable, "-m", "lomo_jax.cli", *args(src, data, killed)],
        env=env,
        stderr=subprocess.DEVNULL,
    )
    target = killed / "checkpoints" / "step_00000010"
    deadline = time.time() + 300
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "params").exists()  # it really died before the end

    assert main(["train", "--resume", str(killed)]) == 0
    assert losses(killed) == losses(tmp_path / "straight")
    a = jax.tree.leaves(lomo_jax.from_pretrained(tmp_path / "straight").params)
    b = jax.tree.leaves(lomo_jax.from_pretrained(killed).params)
    assert [np.asarray(x).tobytes() for x in a] == [np.asarray(y).tobytes() for y in b]
    assert yaml.safe_load((killed / "train_config.yaml").read_text())["steps"] == STEPS
    assert (killed / "loss.png").stat().st_size > 0
    assert len(list((killed / "checkpoints").iterdir())) == 2  # keep the last two
