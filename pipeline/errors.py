"""The two ways a run ends early on purpose: bad user input (exit 2) and a signal (exit 128 + signal number)."""

import multiprocessing
import signal
from collections.abc import Iterator
from contextlib import contextmanager


class UserError(Exception):
    """Input the user can fix (a path, a config value, a CSV row, a checkpoint)."""

    exit_code = 2


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived. A BaseException, so no ``except Exception`` (ours or a library's) swallows it, and
    not KeyboardInterrupt, which Lightning turns into a bare exit 1."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.stage = signum, None

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _raise(signum, frame):
    # DDP workers (spawned by Lightning) compute results that are now discarded: stop them at once
    for worker in multiprocessing.active_children():
        worker.kill()
    raise Interrupted(signum)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """While inside, SIGINT and SIGTERM raise Interrupted in the main thread: every ``finally`` and context manager
    on the way out runs (temporary stage folders are removed, the run-directory lock is released)."""
    previous = {signum: signal.signal(signum, _raise) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
