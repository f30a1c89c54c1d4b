"""What each cluster actor runs (pure, no ray): options, command lines, and ray staying optional."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from events.config import load
from events.errors import ConfigError
from ops.cluster_spec import LEASE_WAIT_S, REDIS_PASSWORD, ClusterOptions, launch, resolve

ROOT = Path(__file__).resolve().parents[2]


def options(tmp_path: Path, *argv: str) -> ClusterOptions:
    loaded = load(ClusterOptions, role="cluster", argv=["--run-dir", str(tmp_path), *argv])
    return resolve(loaded, model=str(tmp_path / "model"))


def test_the_local_path_and_the_cluster_modules_never_import_ray() -> None:
    code = (
        "import sys, ops.cli, ops.launch, ops.cluster, ops.cluster_spec, ops.cluster_actor\n"
        "assert ops.cli.main(['cluster']) == 2\n"  # the usage, before any ray is needed
        "assert 'ray' not in sys.modules, sorted(m for m in sys.modules if m.startswith('ray'))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_every_role_gets_its_consumer_name_the_namespace_and_the_shared_stores(
    tmp_path: Path,
) -> None:
    o = options(
        tmp_path,
        "--namespace",
        "prod",
        "--torch-threads",
        "1",
        "--trainer-args",
        "--prompts-per-task 2",
        "--env",
        "HF_HOME=/cache",
    )
    trainer = launch(o, "trainer", redis_url="redis://:pw@head:1/0")
    args = list(trainer.args)
    assert trainer.name == "trainer" and args[:4] == ["--namespace", "prod", "--name", "trainer"]
    assert args[args.index("--lease-wait-s") + 1] == str(LEASE_WAIT_S)
    assert args[args.index("--artifacts") + 1] == str(tmp_path / "artifacts")
    assert args[args.index("--checkpoints") + 1] == str(tmp_path / "checkpoints")
    assert args[args.index("--allowed-root") + 1] == str(tmp_path)  # run_dir by default
    assert args[-2:] == ["--prompts-per-task", "2"]  # the operator's flags come last
    assert "--device" not in args  # trainer_gpus 0: CPU
    # the URL (and its password) travel in the environment, never on a command line
    assert trainer.env["MULTILORA_REDIS_URL"] == "redis://:pw@head:1/0"
    assert not any("redis://" in a for a in args)
    assert trainer.env["OMP_NUM_THREADS"] == "1" and trainer.env["HF_HOME"] == "/cache"
    assert trainer.cwd == str(tmp_path) and trainer.log == str(tmp_path / "logs/trainer.log")

    worker = launch(o, "rollout", 3)
    wargs = list(worker.args)
    assert worker.name == "rollout.3" and wargs[wargs.index("--name") + 1] == "rollout.3"
    assert wargs[wargs.index("--index") + 1] == "3"
    assert "--prompts-per-task" not in wargs  # trainer_args are the trainer's only


def test_gpus_remote_rewards_and_metrics_ports_reach_the_right_roles(tmp_path: Path) -> None:
    o = options(
        tmp_path,
        "--trainer-gpus",
        "1",
        "--rollout-gpus",
        "1",
        "--remote-reward",
        "math",
        "--metrics-port-base",
        "9400",
    )
    trainer, worker = launch(o, "trainer"), launch(o, "rollout", 2)
    assert trainer.args[trainer.args.index("--device") + 1] == "cuda"
    assert worker.args[worker.args.index("--device") + 1] == "cuda"
    assert worker.args[worker.args.index("--remote-reward") + 1] == "math"
    assert worker.args[worker.args.index("--metrics-port") + 1] == "9412"
    rewards = launch(o, "rewards", 0)
    assert (
        rewards.name == "rewards.0" and rewards.args[rewards.args.index("--reward") + 1] == "math"
    )
    with pytest.raises(ConfigError, match="--remote-reward"):
        launch(options(tmp_path), "rewards", 0)


def test_the_started_redis_gets_a_password_a_port_and_its_data_dir(tmp_path: Path) -> None:
    job = launch(options(tmp_path, "--redis-port", "6500"), "redis")
    assert job.args == (str(tmp_path / "redis"), "6500")
    assert len(job.env[REDIS_PASSWORD]) == 32
    assert launch(options(tmp_path), "redis").env[REDIS_PASSWORD] != job.env[REDIS_PASSWORD]


def test_custom_resources_are_json_and_a_bad_value_names_the_flag(tmp_path: Path) -> None:
    o = options(tmp_path, "--rollout-resources", '{"node_b": 0.01}')
    assert o.resources("rollout") == {"node_b": 0.01} and o.resources("trainer") == {}
    with pytest.raises(ConfigError, match="--trainer-resources"):
        options(tmp_path, "--trainer-resources", "node_a=1")


def test_stores_may_be_urls_and_relative_paths_become_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    o = resolve(
        load(
            ClusterOptions,
            role="cluster",
            argv=["--run-dir", "run", "--artifacts", "s3://bucket/a", "--allowed-root", "data"],
        ),
        model="m",
    )
    assert o.run_dir == str(tmp_path / "run") and o.artifacts == "s3://bucket/a"
    assert o.checkpoints == str(tmp_path / "run/checkpoints")
    assert o.allowed_roots == (str(tmp_path / "data"),)
