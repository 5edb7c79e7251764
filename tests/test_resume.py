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
from tests.conftest import CONFIGS, make_hf_dir, random_ids, train_args
from tests.test_train_cli import write_rows

CFG = CONFIGS["gqa"]
STEPS = 20


def args(src, data, out):
    return train_args(
        src,
        data,
        out,
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
    )


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
    assert list((killed / "tensorboard").glob("events.out.tfevents.*"))
    assert len(list((killed / "checkpoints").iterdir())) == 2  # keep the last two


def test_ctrl_c_saves_a_checkpoint_that_resumes(tmp_path):
    src = make_hf_dir(tmp_path / "hf", CFG)
    data = write_rows(tmp_path / "data.jsonl", random_ids(CFG, 40, 16, seed=1))
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "lomo_jax.cli",
        *train_args(
            src,
            data,
            run,
            "--steps",
            "100000",
            "--batch-size",
            "4",
            "--seq-len",
            "16",
        ),
    ]
    log = open(tmp_path / "stderr.txt", "w")
    proc = subprocess.Popen(cmd, env=dict(os.environ, PYTHONPATH=os.getcwd()), stderr=log)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 300
    while (
        (not metrics.exists() or len(metrics.read_text().splitlines()) < 3)
        and time.time() < deadline
        and proc.poll() is None
    ):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=300) == 130, (tmp_path / "stderr.txt").read_text()[-2000:]
    saved = sorted((run / "checkpoints").iterdir())
    assert len(saved) == 1
    step = json.loads((saved[0] / "state.json").read_text())["step"]
    assert step >= 3
    assert main(["train", "--resume", str(run), "--steps", str(step + 2)]) == 0
    assert losses(run)[-1][0] == step + 2


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    src = make_hf_dir(tmp_path / "hf", CFG)
    data = write_rows(tmp_path / "data.jsonl", random_ids(CFG, 8, 16, seed=1))
    run = tmp_path / "run"
    rc = main(
        train_args(
            src,
            data,
            run,
            "--optimizer",
            "lomo",
            "--lr",
            "1e30",
            "--steps",
            "5",
            "--batch-size",
            "4",
            "--seq-len",
            "16",
            "--save-every",
            "1",
        )
    )
    assert rc == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "loss is nan at step 2" in err and "last checkpoint is untouched" in err
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000001"]
