"""``multilora watch``: progress lines from the typed rows, redrawn against a real Redis."""

from __future__ import annotations

import io

import pytest

from events.errors import ConfigError
from ops.watch import progress_bar, render_progress, watch
from orchestrator.lifecycle import Phase
from orchestrator.status import AdapterStatus
from tests.ops_report.log import lifecycle


def test_watch_draws_progress_bars(rclient, streams):
    lifecycle(rclient, streams)
    out = io.StringIO()
    watch(rclient, streams, interval_s=0.05, out=out, iterations=2)
    text = out.getvalue()
    assert text.count("\x1b[2J") == 2
    assert f"alpha  {progress_bar(2, 10)}" in text and "reward 0.500" in text
    assert progress_bar(2, 10, width=10) == "[##........]"
    assert progress_bar(3, 0, width=4) == "[....]"
    with pytest.raises(ConfigError, match="positive"):
        watch(rclient, streams, interval_s=0)


def test_render_progress_is_a_function_of_the_rows():
    rows = [
        AdapterStatus(name="sums", phase=Phase.RUNNING, step=5, steps_total=20, reward_mean=0.41),
        AdapterStatus(name="late", phase=Phase.QUEUED),
    ]
    lines = render_progress(rows).splitlines()
    assert lines[0].split() == ["sums", progress_bar(5, 20), "5/20", "running", "reward", "0.410"]
    assert lines[1].split() == ["late", progress_bar(0, None), "0/?", "queued", "reward", "-"]
    assert render_progress([]) == "(no adapters)"
