"""Giving freed heap memory back to the operating system, for processes that run for weeks.

A long-running Python process that allocates many differently sized blocks (a rollout worker's
batches change shape with every mix of tasks) leaves glibc's heap fragmented: the memory is free
to Python but stays resident, so the process's RSS creeps up although nothing leaks.
:class:`HeapTrimmer` calls glibc's ``malloc_trim(0)`` at most every ``interval_s`` (from an idle
hook), which returns the free pages at the top and in the middle of every arena. Elsewhere
(another libc, another OS) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim  # type: ignore[no-any-return]


class HeapTrimmer:
    """``maybe()`` trims the heap when ``interval_s`` passed since the last trim."""

    def __init__(self, interval_s: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.interval_s = interval_s
        self.clock = clock
        self.trims = 0
        self._trim = _malloc_trim()
        self._last = clock()

    @property
    def available(self) -> bool:
        """Whether this process's libc can trim (glibc)."""
        return self._trim is not None

    def maybe(self) -> bool:
        """Trim now if due; True if it trimmed."""
        if self._trim is None or self.clock() - self._last < self.interval_s:
            return False
        self._last = self.clock()
        self._trim(0)
        self.trims += 1
        return True
