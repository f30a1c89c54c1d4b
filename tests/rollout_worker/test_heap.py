"""The heap trimmer a rollout worker calls from its idle hook (:mod:`events.heap`)."""

from __future__ import annotations

import platform

import pytest

from events.heap import HeapTrimmer


def test_the_heap_is_trimmed_at_most_once_per_interval() -> None:
    now = [100.0]
    trimmer = HeapTrimmer(interval_s=60.0, clock=lambda: now[0])
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert trimmer.available
    if not trimmer.available:
        pytest.skip("no glibc malloc_trim here")
    assert not trimmer.maybe()  # not due right after start
    now[0] += 59.0
    assert not trimmer.maybe()
    now[0] += 1.0
    assert trimmer.maybe() and trimmer.trims == 1
    assert not trimmer.maybe()  # the interval starts again
    now[0] += 60.0
    assert trimmer.maybe() and trimmer.trims == 2
