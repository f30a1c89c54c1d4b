"""``multilora plot``: reward and loss against step, one line per adapter, from the control log.

The points are the ``StepMetrics`` of :meth:`ops.report.ControlView.step_history`: the metrics
of every step the lifecycle applied (a redelivered ``step_done`` is not a second point), of the
registration each adapter name shows.
"""

from __future__ import annotations

from pathlib import Path

import redis

from events.streams import Streams
from ops.report import StepMetrics, read_control


def step_history(client: redis.Redis, streams: Streams) -> dict[str, list[StepMetrics]]:
    """``{adapter: [(step, metrics), ...]}`` from the ``adapter.step_done`` events, by step."""
    return read_control(client, streams).step_history()


def plot_curves(client: redis.Redis, streams: Streams, out_path: str | Path) -> str:
    """Write a PNG of ``reward_mean`` and ``loss`` against step, one line per adapter.

    Two stacked subplots share the step axis. Adapters without any ``adapter.step_done`` are left
    out; an empty history still writes a (labelled, empty) figure so scripts can rely on the file.
    Returns the path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = step_history(client, streams)
    path = Path(out_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax_reward, ax_loss) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    try:
        for name, points in sorted(history.items()):
            for ax, key in ((ax_reward, "reward_mean"), (ax_loss, "loss")):
                xy = [(step, m[key]) for step, m in points if key in m]
                if xy:
                    ax.plot([x for x, _ in xy], [y for _, y in xy], marker=".", label=name)
        ax_reward.set_ylabel("reward_mean")
        ax_loss.set_ylabel("loss")
        ax_loss.set_xlabel("step")
        ax_reward.set_title(f"reward and loss per adapter (namespace {streams.namespace})")
        if any(history.values()):
            ax_reward.legend(loc="best", fontsize="small")
        else:
            ax_reward.text(0.5, 0.5, "no steps yet", ha="center", transform=ax_reward.transAxes)
        for ax in (ax_reward, ax_loss):
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return str(path)
