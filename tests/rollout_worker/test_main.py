"""``main()`` end to end in-process: durability refusal, then a burst run from flags."""

from __future__ import annotations

import signal

import pytest

from events.bootstrap import EXIT_CONFIG
from events.connection import connect
from events.specs import RewardSpec
from ops.redis_server import RedisServer
from rollout.main import main
from tests.rollout_worker.helpers import admitted, publish, read_groups, task

pytestmark = pytest.mark.bus


def test_main_refuses_an_unsafe_server_then_runs_with_the_override(
    tmp_path, tiny_dir, data_root, versions, streams, capsys
) -> None:
    with RedisServer(tmp_path / "r") as server:
        client = connect(server.url)
        client.config_set("appendonly", "no")
        argv = [
            f"--redis-url={server.url}",
            f"--namespace={streams.namespace}",
            "--name=m1",
            f"--model={tiny_dir}",
            f"--allowed-root={data_root}",
            "--block-ms=200",
            "--reward=always_one=tests.rollout_worker.plugins:always_one",
            f"--weights-cache={tmp_path / 'cache'}",
        ]
        assert main(argv) == EXIT_CONFIG  # refused at boot, the fix named
        assert "--unsafe-redis" in capsys.readouterr().err
        publish(client, streams.control, admitted("math", "r1"))
        t = task("math", "r1", versions[0], rewards=(RewardSpec(name="always_one"),))
        publish(client, streams.tasks, t)
        before = signal.getsignal(signal.SIGTERM)
        assert main([*argv, "--unsafe-redis", "--burst"]) == 0
        assert signal.getsignal(signal.SIGTERM) is before  # handlers restored
        (group,) = read_groups(client, streams)
        assert group.task_id == t.id and group.worker == "m1"
        assert all(s.reward == 1.0 and not s.failed for pg in group.groups for s in pg.samples)
        server.kill()  # a clean shutdown would wait for the AOF rewrite the toggle started
