"""A run directory under faults: a full disk stops the run with one line and the last checkpoint
intact; a damaged checkpoint gives way to the one before it (checksums, finite weights); a run in
use is refused; a metrics line a crash cut short is dropped."""

import errno
import fcntl
import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lomo_jax import checkpoint
from lomo_jax.checkpoint import read_params, verify_checksums, write_checksums, write_params
from lomo_jax.cli import main
from lomo_jax.lock import lock_file
from tests.conftest import CONFIGS, make_hf_dir, random_ids, train_args
from tests.test_resume import leftovers, run_with_fault
from tests.test_train_cli import write_rows

pytestmark = pytest.mark.slow  # whole training runs in processes of their own

CFG = CONFIGS["gqa"]


def flags(steps: int, *extra: str) -> list[str]:
    return ["--steps", str(steps), "--batch-size", "4", "--seq-len", "16", *extra]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    return make_hf_dir(d / "hf", CFG), write_rows(d / "data.jsonl", random_ids(CFG, 16, 16, 1))


def finite_params(ckpt) -> dict:
    verify_checksums(ckpt)
    params = read_params(ckpt / "params")
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
    return params


def last_line(text: str) -> str:
    """The last line of stderr (an uncaught exception would end it instead of our one line)."""
    return text.strip().splitlines()[-1]


def test_full_disk_in_the_event_writer_stops_with_one_line(tmp_path, inputs):
    """tensorboardX's writer thread died on ENOSPC and the loop then blocked forever."""
    run = tmp_path / "run"
    proc = run_with_fault(
        "enospc-events=14", train_args(*inputs, run, *flags(40, "--save-every", "1")), timeout=300
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    err = last_line(proc.stderr)
    kept = sorted((run / "checkpoints").iterdir())[-1]
    assert err.startswith(f"lomo-jax: error: {run / 'tensorboard'}/events.out.tfevents."), err
    assert "No space left on device; stopped at step" in err
    assert f"the last checkpoint is untouched ({kept})" in err
    finite_params(kept)
    assert leftovers(run) == []


# What orbax raised when a LLaMA-7B checkpoint filled this machine's disk (tensorstore's error).
ORBAX_ENOSPC = (
    'RESOURCE_EXHAUSTED: Error writing "value/0.0" in OCDBT database at local file "{0}/": '
    'Failed writing: "{0}/d/ce04863869830283dfbb843ceb58c6ef": Failed to write 5193728 bytes '
    "to file 13: No space left on device [os_error_code='28']"
)


@pytest.mark.parametrize("fault", ["OSError", "orbax"])
def test_full_disk_during_a_checkpoint_keeps_the_previous_one(
    tmp_path, inputs, capsys, monkeypatch, fault
):
    run = tmp_path / "run"
    write, calls = checkpoint.write_params, []

    def no_space(self, dest, **kwargs):
        raise ValueError(ORBAX_ENOSPC.format(dest))

    def full(path, tree):  # the third tree is step 2's params
        calls.append(path)
        if len(calls) < 3:
            return write(path, tree)
        if fault == "OSError":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        with monkeypatch.context() as m:
            m.setattr(ocp.Checkpointer, "save", no_space)
            return write(path, tree)

    monkeypatch.setattr(checkpoint, "write_params", full)
    assert main(train_args(*inputs, run, *flags(5, "--save-every", "1"))) == 1
    err = last_line(capsys.readouterr().err)
    step1 = run / "checkpoints" / "step_00000001"
    assert err.startswith("lomo-jax: error: ") and "No space left on device" in err, err
    assert f"stopped at step 2, the last checkpoint is untouched ({step1})" in err
    assert sorted((run / "checkpoints").iterdir()) == [step1]
    finite_params(step1)
    assert leftovers(run) == []


@pytest.fixture(scope="module")
def finished(tmp_path_factory, inputs):
    """A run of two steps with a checkpoint after each."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(train_args(*inputs, run, *flags(2, "--save-every", "1"))) == 0
    return run


def data_file(params_dir):
    """The largest file of a saved parameter tree (array data)."""
    return max((p for p in params_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def flip_byte(ckpt):
    f = data_file(ckpt / "params")
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    return f


def truncate(ckpt):
    f = data_file(ckpt / "params")
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return f


def remove_leaf(ckpt):
    leaf = ckpt / "params" / "layers.mlp.up_proj.kernel"
    shutil.rmtree(leaf)
    return leaf


def bad_state(ckpt):
    (ckpt / "state.json").write_text('{"step": 2, "loss_sc')
    return ckpt / "state.json"


def infinite(ckpt):
    """Weights overflowed to inf, saved whole and with matching checksums (older versions did)."""
    params = jax.tree.map(lambda x: np.asarray(x) * np.inf, read_params(ckpt / "params"))
    shutil.rmtree(ckpt / "params")
    write_params(ckpt / "params", params)
    write_checksums(ckpt)
    return ckpt


DAMAGE = [flip_byte, truncate, remove_leaf, bad_state, infinite]


@pytest.mark.parametrize("damage", DAMAGE, ids=[d.__name__ for d in DAMAGE])
def test_a_damaged_checkpoint_gives_way_to_the_one_before(tmp_path, finished, capsys, damage):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    damaged = damage(run / "checkpoints" / "step_00000002")
    assert main(["train", "--resume", str(run), "--steps", "3"]) == 0
    err = capsys.readouterr().err
    assert str(damaged) in err and "resuming from the checkpoint before it" in err, err[-3000:]
    # Step 2 taken again from step 1's checkpoint: the weights the damaged one held, bit for bit.
    step2 = read_params(finished / "checkpoints" / "step_00000002" / "params")
    again = read_params(run / "checkpoints" / "step_00000002" / "params")
    assert [np.asarray(x).tobytes() for x in jax.tree.leaves(again)] == [
        np.asarray(x).tobytes() for x in jax.tree.leaves(step2)
    ]
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").open()] == [1, 2, 3]


def test_no_checkpoint_that_loads_is_one_line(tmp_path, finished, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    truncate(run / "checkpoints" / "step_00000002")
    f = flip_byte(run / "checkpoints" / "step_00000001")
    assert main(["train", "--resume", str(run), "--steps", "3"]) == 1  # a step to take from one
    err = capsys.readouterr().err
    assert last_line(err) == (
        f"lomo-jax: error: {f}: damaged (its checksum differs from the one saved) "
        "(and no older checkpoint loads)"
    )


def test_a_metrics_line_cut_short_is_dropped(tmp_path, finished, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 4.')  # a crash in the middle of a line
    assert main(["train", "--resume", str(run)]) == 0
    assert "metrics.jsonl: dropped unreadable line(s) 3" in capsys.readouterr().err
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").open()] == [1, 2]


def snapshot(d):
    return {p: p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_a_run_in_use_is_refused_and_a_dead_ones_lock_is_not(tmp_path, finished, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = snapshot(run)
    with open(lock_file(run), "a+") as held:  # another process training in RUN
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.truncate(0)
        held.write("lomo-jax train, pid 4242 on elsewhere\n")
        held.flush()
        assert main(["train", "--resume", str(run), "--steps", "3"]) == 1
    assert last_line(capsys.readouterr().err) == (
        f"lomo-jax: error: {run}: in use by lomo-jax train, pid 4242 on elsewhere; "
        "let it finish or stop it first"
    )
    assert snapshot(run) == before
    # The lock file stays behind, but nobody holds it any more (as after a kill): no obstacle.
    assert main(["train", "--resume", str(run)]) == 0
