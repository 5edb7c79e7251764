"""Replacing a directory survives a crash at any moment: afterwards `recover` finds the old copy or
the new one, complete; outputs get the umask's permissions."""

import os
import shutil

import pytest

from lomo_jax import atomic
from lomo_jax.atomic import atomic_directory, recover, recover_all


class Killed(BaseException):
    """Stands for SIGKILL: raised at one file operation, after which none happens."""


def crash_at(monkeypatch, k: int, killed: bool, exchange_supported: bool) -> None:
    """The k-th rename / exchange / removal fails: with `killed`, as if the process died there
    (no later operation, no clean-up runs), else with an ordinary exception."""
    calls, dead = [], []

    def wrap(fn, name):
        def op(*args, **kwargs):
            if dead:
                return None
            calls.append(name)
            if len(calls) == k:
                if killed:
                    dead.append(True)
                    raise Killed(name)
                raise OSError(f"injected failure in {name}")
            return fn(*args, **kwargs)

        return op

    monkeypatch.setattr(os, "replace", wrap(os.replace, "replace"))
    monkeypatch.setattr(os, "rename", wrap(os.rename, "rename"))
    monkeypatch.setattr(shutil, "rmtree", wrap(shutil.rmtree, "rmtree"))
    exchange = getattr(atomic, "exchange", None)
    if exchange is not None:
        swap = exchange if exchange_supported else (lambda a, b: False)
        monkeypatch.setattr(atomic, "exchange", wrap(swap, "exchange"))
    if hasattr(atomic, "remove"):
        monkeypatch.setattr(atomic, "remove", wrap(atomic.remove, "remove"))


def contents(d):
    return {p.name: p.read_text() for p in d.iterdir()} if d.is_dir() else None


OLD = {"a.txt": "old a", "b.txt": "old b"}
NEW = {"a.txt": "new a", "b.txt": "new b", "c.txt": "new c"}


@pytest.mark.parametrize("exchange_supported", [True, False], ids=["exchange", "move-aside"])
@pytest.mark.parametrize("killed", [True, False], ids=["kill", "exception"])
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_overwrite_leaves_old_or_new_whole_after_a_crash(
    tmp_path, monkeypatch, k, killed, exchange_supported
):
    out = tmp_path / "step_00000040"
    out.mkdir()
    for name, text in OLD.items():
        (out / name).write_text(text)
    with monkeypatch.context() as m:
        crash_at(m, k, killed, exchange_supported)
        try:
            with atomic_directory(out, overwrite=True) as tmp:
                for name, text in NEW.items():
                    (tmp / name).write_text(text)
        except (Killed, OSError):
            pass
    recover(out)
    assert contents(out) in (OLD, NEW)
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # nothing else left behind


def test_recover_all_removes_partial_copies_and_restores_complete_ones(tmp_path):
    (tmp_path / "step_00000005").mkdir()
    (tmp_path / ".step_00000010.tmp-1a2b").mkdir()  # a save cut short: incomplete
    (tmp_path / ".step_00000015.new-3c4d").mkdir()  # complete, its rename into place cut short
    (tmp_path / ".step_00000015.new-3c4d" / "state.json").write_text("{}")
    (tmp_path / ".step_00000001.del-5e6f").mkdir()  # a removal cut short
    (tmp_path / ".metrics.jsonl.tmp-7a8b").write_text("half")
    recover_all(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000005", "step_00000015"]
    assert (tmp_path / "step_00000015" / "state.json").read_text() == "{}"


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_follow_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "x").write_text("x")
    finally:
        os.umask(previous)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask
