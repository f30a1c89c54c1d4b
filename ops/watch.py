"""``multilora watch``: live per-adapter progress, redrawn whenever the control log moves.

:func:`render_progress` is a pure function of the typed status rows
(:class:`~orchestrator.status.AdapterStatus`, read by :func:`ops.report.read_rows`), so anything
that wants the same lines (a one-time run, the demo) prints them without Redis in the loop.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from typing import TextIO

import redis

from events.errors import ConfigError
from events.streams import Streams
from ops.report import read_rows
from ops.tail import last_entry_id, read_new
from orchestrator.status import AdapterStatus

CLEAR_SCREEN = "\x1b[2J\x1b[H"


def progress_bar(step: int, total: int | None, width: int = 30) -> str:
    """``[#####.....]`` filled ``step/total`` of ``width`` (empty when ``total`` is unknown)."""
    filled = min(width, width * step // total) if total else 0
    return "[" + "#" * filled + "." * (width - filled) + "]"


def render_progress(rows: Iterable[AdapterStatus]) -> str:
    """One line per adapter: name, bar, step/total, lifecycle phase, reward mean."""
    rows = list(rows)
    if not rows:
        return "(no adapters)"
    width = max(len(r.name) for r in rows)
    lines = []
    for r in rows:
        total = str(r.steps_total) if r.steps_total else "?"
        phase = r.phase.value if r.phase is not None else "-"
        reward = "-" if r.reward_mean is None else f"{r.reward_mean:.3f}"
        lines.append(
            f"{r.name.ljust(width)}  {progress_bar(r.step, r.steps_total)} "
            f"{r.step:>5}/{total:<5} {phase:<10} reward {reward}"
        )
    return "\n".join(lines)


def watch(
    client: redis.Redis,
    streams: Streams,
    interval_s: float = 1.0,
    *,
    out: TextIO | None = None,
    iterations: int | None = None,
) -> None:
    """Redraw the progress lines until Ctrl-C (or ``iterations`` redraws, for tests).

    Waits on the control log with ``XREAD BLOCK`` (at most ``interval_s``) between redraws, so a
    new event redraws at once and an idle deployment costs one blocking read per interval.
    """
    if interval_s <= 0:
        raise ConfigError(f"watch interval must be positive, got {interval_s!r}")
    out = out or sys.stdout
    last_id = last_entry_id(client, streams.control)
    drawn = 0
    try:
        while iterations is None or drawn < iterations:
            stamp = time.strftime("%H:%M:%S")
            out.write(f"{CLEAR_SCREEN}multilora {streams.namespace}  {stamp}\n\n")
            out.write(render_progress(read_rows(client, streams).rows) + "\n")
            out.flush()
            drawn += 1
            if iterations is not None and drawn >= iterations:
                break
            new = read_new(client, streams.control, last_id, int(interval_s * 1000))
            if new:
                last_id = new[-1][0]
    except KeyboardInterrupt:
        out.write("\n")
