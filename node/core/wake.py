"""A wake across forked processes that holds no lock: a non-blocking pipe.

Receiver processes tell the main process's assembler that a study may have just become complete.
A ``multiprocessing.Event`` would do it through a shared semaphore: a receiver killed (SIGKILL)
inside ``set()`` would leave it held and the assembler blocked for good. A byte written to a pipe
leaves nothing held, whenever its writer dies.
"""

from __future__ import annotations

import os
import select

_CLOSED = -1


class StudyWake:
    """Created before forking: the notifiers (any process) write a byte, one waiter reads them."""

    def __init__(self) -> None:
        self._read_fd, self._write_fd = os.pipe()
        # Non-blocking both ways: a full pipe means a wake is pending already, and draining
        # stops at an empty pipe.
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self._write_fd, False)

    def notify(self) -> None:
        """Wake the waiter (or its next wait). Never blocks and never fails: the timers still run."""
        if self._write_fd == _CLOSED:
            return
        try:
            os.write(self._write_fd, b"\0")
        except BlockingIOError:
            pass  # the pipe is full: a wake is pending already
        except BrokenPipeError:
            pass  # the waiter's end is closed: the node is stopping

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a notify; True when one came. Every notify pending is
        consumed, so one made after this returns wakes the next wait."""
        if self._read_fd == _CLOSED:
            return False
        readable, _, _ = select.select([self._read_fd], [], [], timeout)
        if not readable:
            return False
        self._drain()
        return True

    def pending(self) -> bool:
        """Whether a notify waits to be consumed (it stays so)."""
        if self._read_fd == _CLOSED:
            return False
        return bool(select.select([self._read_fd], [], [], 0)[0])

    def _drain(self) -> None:
        while True:
            try:
                if not os.read(self._read_fd, 4096):
                    return  # every write end closed
            except BlockingIOError:
                return

    def close_read_end(self) -> None:
        """In a notifier's process (after the fork): it never waits, so it keeps no read end."""
        if self._read_fd != _CLOSED:
            os.close(self._read_fd)
            self._read_fd = _CLOSED

    def close(self) -> None:
        """Close both ends in this process (once the waiter's thread has ended); idempotent."""
        self.close_read_end()
        if self._write_fd != _CLOSED:
            os.close(self._write_fd)
            self._write_fd = _CLOSED
