"""How a command stops on request.

Ctrl-C (SIGINT) and SIGTERM (what schedulers send before they kill) are caught from the moment
the command starts, before its slow imports (a signal arriving inside a C extension's import can
otherwise be swallowed as an ImportError), and recorded. Training acts on the request between
steps, where its state can be saved; every other command stops at once. A second signal always
stops at once. Signals this process was started ignoring (`nohup`, `cmd &`) stay ignored.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

log = logging.getLogger("lomo_jax")

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A stop on a signal; the message says what was kept."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message)
        self.signum = signum


class _Requests:
    def __init__(self):
        self.signum: int | None = None
        self.deferred = True
        self.previous: dict[int, object] = {}

    def handle(self, signum: int, frame) -> None:
        if self.signum is not None or not self.deferred:
            self.restore()
            raise Interrupted(signum)
        self.signum = signum
        log.warning(
            "%s: stopping at the next safe point (send it again to stop at once)",
            signal.Signals(signum).name,
        )

    def install(self) -> None:
        self.signum, self.deferred = None, True
        for sig in SIGNALS:
            if signal.getsignal(sig) is not signal.SIG_IGN:
                self.previous[sig] = signal.signal(sig, self.handle)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()


_requests = _Requests()


@contextlib.contextmanager
def caught() -> Iterator[None]:
    """Records SIGINT / SIGTERM for the block (nested blocks share the outer one's record)."""
    if _requests.previous or threading.current_thread() is not threading.main_thread():
        yield
        return
    _requests.install()
    try:
        yield
    finally:
        _requests.restore()
        _requests.signum = None  # a request is for this block: none is pending after it


def act_now() -> None:
    """From here on a signal stops at once; one that came before stops now."""
    _requests.deferred = False
    if _requests.signum is not None:
        raise Interrupted(_requests.signum)


def requested() -> int | None:
    """The signal that asked this process to stop, if any (only a `caught()` block records
    one)."""
    return _requests.signum
