"""``multilora plot``: step histories from the control log, and the PNG they make."""

from __future__ import annotations

from ops.plots import plot_curves, step_history
from tests.ops_report.log import lifecycle


def test_plot_curves_writes_a_png(rclient, streams, tmp_path):
    lifecycle(rclient, streams)
    history = step_history(rclient, streams)
    assert [s for s, _ in history["alpha"]] == [1, 2]
    assert history["alpha"][1][1]["reward_mean"] == 0.5
    path = plot_curves(rclient, streams, tmp_path / "sub" / "curves.png")
    data = (tmp_path / "sub" / "curves.png").read_bytes()
    assert path.endswith("curves.png")
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_plot_curves_with_no_steps_still_writes(rclient, streams, tmp_path):
    path = plot_curves(rclient, streams, tmp_path / "empty.png")
    assert (tmp_path / "empty.png").stat().st_size > 0
    assert path == str(tmp_path / "empty.png")
