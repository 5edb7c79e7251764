"""Runs `lomo-jax` in this process with one fault injected at a fixed point, for the tests that
need a process of their own (a kill, a possible hang, a signal during the imports):

    python -m tests.faults FAULT lomo-jax arguments...

FAULT is one of
    kill-at-save=N    SIGKILL as the Nth parameter tree of a checkpoint starts being written
    kill-in=MOD:FUNC  SIGKILL as MOD.FUNC is first called (e.g. convert.safetensors_file:write)
    enospc-events=N   the Nth TensorBoard record and every later one fail: "No space left"
    sigint-at-import  SIGINT while `jax` is being imported
"""

import errno
import importlib.abc
import os
import signal
import sys


class _SigintAtImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "jax":
            sys.meta_path.remove(self)
            signal.raise_signal(signal.SIGINT)
        return None


def _kill_at_save(n: int) -> None:
    from lomo_jax import checkpoint

    write, calls = checkpoint.write_params, []

    def write_params(path, tree):
        calls.append(path)
        if len(calls) == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return write(path, tree)

    checkpoint.write_params = write_params


def _kill_in(target: str) -> None:
    import importlib

    module_name, _, name = target.partition(":")
    module = importlib.import_module(module_name)

    def killed(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    setattr(module, name, killed)


def _enospc_events(n: int) -> None:
    from tensorboardX.record_writer import RecordWriter

    write, calls = RecordWriter.write, []

    def failing(self, data):
        calls.append(len(data))
        if len(calls) >= n:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.path)
        return write(self, data)

    RecordWriter.write = failing


def main() -> int:
    fault, args = sys.argv[1], sys.argv[2:]
    kind, _, n = fault.partition("=")
    if kind == "sigint-at-import":
        # Delivered even when the suite runs as a background job, which starts with it ignored.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.meta_path.insert(0, _SigintAtImport())
    elif kind == "kill-at-save":
        _kill_at_save(int(n))
    elif kind == "kill-in":
        _kill_in(n)
    elif kind == "enospc-events":
        _enospc_events(int(n))
    else:
        raise SystemExit(f"unknown fault {fault!r}")
    from lomo_jax.cli import main as lomo_jax

    return lomo_jax(args)


if __name__ == "__main__":
    sys.exit(main())
