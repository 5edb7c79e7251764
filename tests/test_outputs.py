"""Outputs are claimed before they are built: import, export, train and demo take one lock on
their destination, so a second writer is refused with one line, whichever command it is; what a
killed import or export left beside its destination is removed by the next writer there.

The interleavings are forced (the second writer runs from inside the first one's build), never
raced."""

import os
import signal
import socket

import jax
import numpy as np
import pytest

from convert import export as export_module
from lomo_jax import checkpoint
from lomo_jax.checkpoint import read_params
from lomo_jax.cli import main
from lomo_jax.rundir import RunDir
from tests.conftest import CONFIGS, make_hf_dir, random_ids, train_args
from tests.test_resume import LEFTOVER, run_with_fault
from tests.test_train_cli import write_rows

CFG = CONFIGS["gqa"]


def in_use(out, command: str) -> str:
    return (
        f"lomo-jax: error: {out}: in use by lomo-jax {command}, pid {os.getpid()} on "
        f"{socket.gethostname()}; let it finish or stop it first"
    )


def last_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and "Traceback" not in "\n".join(lines), lines
    return lines[-1]


def same_weights(a, b) -> bool:
    return all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def during(monkeypatch, module, name: str, argv: list[str]) -> list[int]:
    """Runs `lomo-jax ARGV` once, from inside the first call of MODULE.NAME (while the first
    command builds its output); -> [its exit status]."""
    original, status = getattr(module, name), []

    def hooked(*args, **kwargs):
        if not status:
            status.append(None)
            status[0] = main(argv)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, hooked)
    return status


@pytest.fixture
def sources(tmp_path):
    return make_hf_dir(tmp_path / "a", CFG, seed=0), make_hf_dir(tmp_path / "b", CFG, seed=1)


def test_two_imports_into_one_new_out(tmp_path, monkeypatch, capsys, sources):
    a, b = sources
    out = tmp_path / "out"
    second = during(monkeypatch, checkpoint, "write_params", ["import", str(b), str(out)])
    assert main(["import", str(a), str(out)]) == 0
    assert second == [1]
    assert in_use(out, "import") in capsys.readouterr().err.splitlines()
    monkeypatch.undo()
    assert main(["import", str(a), str(tmp_path / "from_a")]) == 0
    assert same_weights(read_params(out / "params"), read_params(tmp_path / "from_a" / "params"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "from_a", "out"]


def test_two_exports_into_one_new_out(tmp_path, monkeypatch, capsys, sources):
    for name, src in zip("ab", sources):
        assert main(["import", str(src), str(tmp_path / f"ckpt_{name}")]) == 0
    out = tmp_path / "hf"
    argv = ["export", str(tmp_path / "ckpt_b"), str(out)]
    second = during(monkeypatch, export_module, "write_hf", argv)
    assert main(["export", str(tmp_path / "ckpt_a"), str(out)]) == 0
    assert second == [1]
    assert in_use(out, "export") in capsys.readouterr().err.splitlines()
    monkeypatch.undo()
    assert main(["import", str(out), str(tmp_path / "back")]) == 0  # ckpt_a's weights
    assert same_weights(
        read_params(tmp_path / "back" / "params"), read_params(tmp_path / "ckpt_a" / "params")
    )


def test_no_writer_replaces_an_out_being_trained_in(tmp_path, capsys, sources):
    assert main(["import", str(sources[0]), str(tmp_path / "ckpt")]) == 0
    capsys.readouterr()
    run = tmp_path / "run"
    with RunDir.create(run):  # the lock a training run holds
        assert main(["import", str(sources[0]), str(run), "--overwrite"]) == 1
        assert main(["export", str(tmp_path / "ckpt"), str(run), "--overwrite"]) == 1
        assert main(["demo", "--out", str(run)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [in_use(run, "train")] * 3
    assert list(run.iterdir()) == []


def test_a_train_into_an_out_being_imported_is_refused(tmp_path, monkeypatch, capsys, sources):
    a, _ = sources
    data = write_rows(tmp_path / "data.jsonl", random_ids(CFG, 4, 16))
    out = tmp_path / "out"
    argv = train_args(a, data, out, "--steps", "1", "--batch-size", "2", "--seq-len", "16")
    second = during(monkeypatch, checkpoint, "write_params", argv)
    assert main(["import", str(a), str(out)]) == 0
    assert second == [1]
    assert in_use(out, "import") in capsys.readouterr().err.splitlines()
    assert checkpoint.is_checkpoint(out) and not (out / "train_config.yaml").exists()


def test_the_demo_never_replaces_what_it_did_not_write(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    assert main(["demo", "--out", str(out)]) == 1
    assert last_line(capsys) == (
        f"lomo-jax: error: {out}: already exists and is not a demo's output; "
        "give the demo another --out"
    )
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]


def leftovers(d) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize(
    "command, fault",
    [("import", "kill-at-save=1"), ("export", "kill-in=convert.safetensors_file:write")],
)
def test_what_a_killed_writer_left_is_removed_by_the_next_writer_beside_it(
    tmp_path, capsys, command, fault
):
    src = make_hf_dir(tmp_path / "src", CFG)
    if command == "export":
        assert main(["import", str(src), str(tmp_path / "ckpt")]) == 0
        src = tmp_path / "ckpt"
    outs = tmp_path / "outs"
    outs.mkdir()
    proc = run_with_fault(fault, [command, str(src), str(outs / "killed")])
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    left = leftovers(outs)
    assert any(LEFTOVER.match(name) for name in left), left  # a partial output, and its lock
    assert not (outs / "killed").exists()

    assert main([command, str(src), str(outs / "next")]) == 0  # a writer beside it
    assert sorted(p.name for p in outs.iterdir()) == ["next"]
    proc = run_with_fault(fault, [command, str(src), str(outs / "killed")])
    assert main([command, str(src), str(outs / "killed")]) == 0  # the same destination
    assert sorted(p.name for p in outs.iterdir()) == ["killed", "next"]


def test_a_writer_leaves_alone_what_a_live_writer_beside_it_builds(tmp_path, monkeypatch, sources):
    a, b = sources
    outs = tmp_path / "outs"
    seen = {}
    original = checkpoint.write_params

    def hooked(*args, **kwargs):
        if not seen:
            seen["during"] = leftovers(outs)
            seen["second"] = main(["import", str(b), str(outs / "second")])
            seen["after"] = leftovers(outs)
        return original(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "write_params", hooked)
    assert main(["import", str(a), str(outs / "first")]) == 0
    assert seen["second"] == 0
    assert seen["after"] == seen["during"]  # the first import's temporary directory and lock
    assert any(name.startswith(".first.tmp-") for name in seen["after"]), seen
    assert sorted(p.name for p in outs.iterdir()) == ["first", "second"]
