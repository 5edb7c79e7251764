"""A run killed with SIGKILL in the middle of a checkpoint and resumed equals a run never
interrupted, bit for bit: same loss curve, same weights, with shuffling on, AdaLomo state and
bfloat16 weights rounded stochastically (the bits are a function of seed and step: nothing more
is saved). SIGTERM and Ctrl-C save a checkpoint that resumes; a non-finite run never saves its
weights."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

import lomo_jax
from lomo_jax.checkpoint import read_params
from lomo_jax.cli import main
from tests.conftest import CONFIGS, make_hf_dir, random_ids, train_args
from tests.test_train_cli import write_rows

pytestmark = pytest.mark.slow  # whole training runs in processes of their own

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
        "--dtype",
        "bfloat16",
    )


def losses(out):
    return [
        (m["step"], m.get("loss"), m.get("eval_loss"))
        for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    ]


REPO = Path(__file__).resolve().parents[1]
LEFTOVER = re.compile(r"^\..+\.(tmp|new|old|del)-[0-9a-z]+$")


def run_with_fault(
    fault: str, argv: list[str], timeout: float = 600
) -> subprocess.CompletedProcess:
    """`lomo-jax ARGV` in a process of its own with FAULT injected (tests/faults.py)."""
    return subprocess.run(
        [sys.executable, "-m", "tests.faults", fault, *argv],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def leftovers(run):
    return sorted(str(p) for p in run.rglob(".*") if LEFTOVER.match(p.name))


def test_kill_9_then_resume_is_bit_identical(tmp_path):
    src = make_hf_dir(tmp_path / "hf", CFG)
    data = write_rows(tmp_path / "data.jsonl", random_ids(CFG, 40, 16, seed=1))

    assert main(args(src, data, tmp_path / "straight")) == 0

    # SIGKILL in the middle of the step-15 checkpoint (its params written, its optimizer state
    # not): the 6th parameter tree the run writes (steps 5, 10, 15 write two each).
    killed = tmp_path / "killed"
    proc = run_with_fault("kill-at-save=6", args(src, data, killed))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (killed / "params").exists()  # it really died before the end
    assert leftovers(killed), "the kill should have cut a checkpoint short"
    assert (killed / "checkpoints" / "step_00000010").is_dir()

    assert main(["train", "--resume", str(killed)]) == 0  # the dead process's lock is no obstacle
    assert losses(killed) == losses(tmp_path / "straight")
    a = jax.tree.leaves(lomo_jax.from_pretrained(tmp_path / "straight").params)
    b = jax.tree.leaves(lomo_jax.from_pretrained(killed).params)
    assert [np.asarray(x).tobytes() for x in a] == [np.asarray(y).tobytes() for y in b]
    assert yaml.safe_load((killed / "train_config.yaml").read_text())["steps"] == STEPS
    assert (killed / "loss.png").stat().st_size > 0
    assert list((killed / "tensorboard").glob("events.out.tfevents.*"))
    assert len(list((killed / "checkpoints").iterdir())) == 2  # keep the last two
    assert leftovers(killed) == []


@pytest.fixture(autouse=True)
def sigint_delivered():
    """Ctrl-C reaches these tests however the suite was started: a shell without job control
    starts a background job (`make test &`) with SIGINT ignored, which lomo-jax keeps."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def signal_at(monkeypatch, step: int, *signals: signal.Signals) -> None:
    """Sends SIGNALS to this process as the loop starts step STEP (counted from 0)."""
    import lomo_jax.train

    original = lomo_jax.train.batch_indices

    def hooked(n_rows, batch_size, s, shuffle, seed):
        if s == step:
            for sig in signals:
                if signal.getsignal(sig) is signal.SIG_DFL:
                    raise AssertionError(f"{sig.name} would kill the process: nothing catches it")
                signal.raise_signal(sig)
        return original(n_rows, batch_size, s, shuffle, seed)

    monkeypatch.setattr(lomo_jax.train, "batch_indices", hooked)


def test_sigterm_saves_a_second_signal_stops_at_once_and_the_run_resumes(
    tmp_path, monkeypatch, capsys
):
    src = make_hf_dir(tmp_path / "hf", CFG)
    data = write_rows(tmp_path / "data.jsonl", random_ids(CFG, 40, 16, seed=1))
    run = tmp_path / "run"
    argv = train_args(src, data, run, "--steps", "6", "--batch-size", "4", "--seq-len", "16")

    with monkeypatch.context() as m:  # a scheduler's SIGTERM during the third step
        signal_at(m, 2, signal.SIGTERM)
        assert main(argv) == 128 + signal.SIGTERM
    err = capsys.readouterr().err.strip().splitlines()[-1]
    ckpt = run / "checkpoints" / "step_00000003"
    assert err == (
        f"lomo-jax: interrupted (SIGTERM) at step 3: saved {ckpt}; "
        f"lomo-jax train --resume {run} goes on"
    )
    assert sorted((run / "checkpoints").iterdir()) == [ckpt]

    with monkeypatch.context() as m:  # Ctrl-C twice during the fifth step: stop at once
        signal_at(m, 4, signal.SIGINT, signal.SIGINT)
        assert main(["train", "--resume", str(run)]) == 128 + signal.SIGINT
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == "lomo-jax: interrupted (Ctrl-C) stopped at once; nothing half-written was kept"
    assert sorted((run / "checkpoints").iterdir()) == [ckpt]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored

    assert main(["train", "--resume", str(run)]) == 0
    assert [m[0] for m in losses(run)] == [1, 2, 3, 4, 5, 6]
    assert leftovers(run) == []


def test_ctrl_c_during_the_imports_stops_before_anything_is_written(tmp_path):
    src = make_hf_dir(tmp_path / "hf", CFG)
    data = write_rows(tmp_path / "data.jsonl", random_ids(CFG, 8, 16, seed=1))
    run = tmp_path / "run"
    argv = train_args(src, data, run, "--steps", "2", "--batch-size", "4", "--seq-len", "16")
    proc = run_with_fault("sigint-at-import", argv)
    # (JAX's own log may hold a traceback: a CUDA plugin installed on a machine without CUDA.)
    assert proc.returncode == 128 + signal.SIGINT, proc.stderr[-2000:]
    assert "KeyboardInterrupt" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last == "lomo-jax: interrupted (Ctrl-C) before training started; nothing written"
    assert not run.exists()


@pytest.mark.parametrize(
    "dtype, message, kept",
    [  # float32: the loss of step 2 is NaN; float16: step 1's update overflows the weights
        ("float32", "loss is nan at step 2; stopped, the last checkpoint is untouched", 1),
        ("float16", "the weights are not finite (inf/NaN) after step 1; not saved", 0),
    ],
)
def test_non_finite_stops_and_keeps_the_last_finite_checkpoint(
    tmp_path, capsys, dtype, message, kept
):
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
            "--dtype",
            dtype,
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
    assert err.startswith("lomo-jax: error: ") and message in err, err
    saved = sorted((run / "checkpoints").iterdir()) if (run / "checkpoints").exists() else []
    assert [p.name for p in saved] == [f"step_{s:08d}" for s in range(1, kept + 1)]
    for p in saved:  # what --resume would pick is finite
        params = read_params(p / "params")
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


@pytest.mark.parametrize("optimizer", ["adalomo", "adamw"])
def test_resume_takes_the_weights_from_the_checkpoint_only(tmp_path, optimizer):
    # A resumed run reads the model's config and tokenizer, never its weights (reading them
    # only to throw them away cost a whole model's read and left its memory behind): with the
    # model's weight file zeroed, the run resumes and equals the run never stopped.
    src = make_hf_dir(tmp_path / "hf", CFG)
    data = write_rows(tmp_path / "data.jsonl", random_ids(CFG, 8, 16, seed=1))

    def run(out, steps):
        flags = ["--optimizer", optimizer, "--lr", "0.01", "--batch-size", "4", "--seq-len", "16"]
        return main(train_args(src, data, out, *flags, "--steps", str(steps)))

    assert run(tmp_path / "straight", 4) == 0
    assert run(tmp_path / "stopped", 2) == 0
    weights = src / "model.safetensors"
    weights.write_bytes(bytes(weights.stat().st_size))
    assert main(["train", "--resume", str(tmp_path / "stopped"), "--steps", "4"]) == 0
    assert losses(tmp_path / "stopped") == losses(tmp_path / "straight")
    straight, resumed = (read_params(tmp_path / d / "params") for d in ("straight", "stopped"))
    assert jax.tree.all(jax.tree.map(np.array_equal, straight, resumed))


@pytest.mark.parametrize("resume", [False, True], ids=["fresh", "resumed"])
def test_the_step_compiles_before_any_weight_is_read(tmp_path, monkeypatch, resume):
    # The compiler's peak, and the memory malloc keeps of it, must not come on top of the
    # weights' (at LLaMA-7B a whole run's peak is decided by them): while the step compiles,
    # neither the model's weights nor the checkpoint's are in memory.
    import lomo_jax.train

    src = make_hf_dir(tmp_path / "hf", CFG)
    data = write_rows(tmp_path / "data.jsonl", random_ids(CFG, 8, 16, seed=1))
    flags = ["--lr", "0.01", "--batch-size", "4", "--seq-len", "16"]
    if resume:
        assert main(train_args(src, data, tmp_path / "run", *flags, "--steps", "1")) == 0
    before = {id(x) for x in jax.live_arrays()}
    held = []
    compile_step = lomo_jax.train._compile

    def compile_and_look(*a):
        held.append(sum(x.nbytes for x in jax.live_arrays() if id(x) not in before))
        return compile_step(*a)

    monkeypatch.setattr(lomo_jax.train, "_compile", compile_and_look)
    argv = (
        ["train", "--resume", str(tmp_path / "run"), "--steps", "2"]
        if resume
        else train_args(src, data, tmp_path / "run", *flags, "--steps", "1")
    )
    assert main(argv) == 0
    assert len(held) == 1 and held[0] < 4 * CFG.num_params / 100, held  # the batch only
