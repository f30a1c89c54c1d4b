"""The worker's configuration: file < env < flags, loud errors, a stable default name."""

from __future__ import annotations

import socket

import pytest

from events.config import BusConfig
from events.errors import ConfigError
from rollout.config import RolloutConfig, load_config


def test_flags_override_env_override_file(tmp_path) -> None:
    file = tmp_path / "worker.yaml"
    file.write_text("model_path: /m\nmax_slots: 3\nkeep_versions: 4\nnamespace: from-file\n")
    env = {
        "MULTILORA_ROLLOUT_MAX_SLOTS": "5",
        "MULTILORA_NAMESPACE": "from-env",
        "MULTILORA_ROLLOUT_REMOTE_REWARDS": "math, reasoning_gym",
        "MULTILORA_ROLLOUT_UNSAFE_REDIS": "true",
    }
    argv = [f"--config={file}", "--max-slots=7", "--allowed-root=/a", "--allowed-root=/b"]
    argv += ["--reward", "mine=pkg.mod:fn", "--name", "w1"]  # a flag and its value apart
    config = load_config(argv, env)
    assert config.model_path == "/m" and config.keep_versions == 4  # file
    assert config.bus.namespace == "from-env" and config.bus.unsafe_redis is True  # env
    assert config.remote_rewards == ("math", "reasoning_gym")
    assert config.max_slots == 7 and config.allowed_roots == ("/a", "/b")  # flags
    assert config.reward_entry_points == {"mine": "pkg.mod:fn"}
    assert config.worker_name == "w1"
    assert config.decoder == "auto"
    assert load_config(["--model", "/m", "--decoder", "hf"], {}).decoder == "hf"
    assert load_config(["--model", "/m", "--static-cache-gb", "2.5"], {}).static_cache_gb == 2.5


def test_default_name_is_stable_per_host_and_index() -> None:
    config = load_config(["--model", "/m", "--index", "2"], {})
    assert config.bus.name == f"rollout.{socket.gethostname()}.2"
    assert load_config(["--model", "/m", "--index", "2"], {}).bus.name == config.bus.name


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        ([], {}, "model_path"),
        (["--model", "/m", "--backend", "http"], {}, "engine_url"),
        (["--model", "/m", "--max-slots", "0"], {}, r">= 1 - at `\$.max_slots` \(given: 0\)"),
        (["--model", "/m", "--reward", "x=not an entry point"], {}, "reward_entry_points"),
        (["--model", "/m", "--reward", "no-equals"], {}, "NAME=VALUE"),
        (["--model", "/m"], {"MULTILORA_ROLLOUT_BLOCK_MS": "soon"}, "block_ms"),
        (["--model", "/m", "--name", "bad name"], {}, r"\$.bus.name"),
        (["--model", "/m"], {"MULTILORA_ROLLOUT_DECODER": "fast"}, r"\$.decoder.*fast"),
        (["--model", "/m", "--static-cache-gb", "-1"], {}, r"\$.static_cache_gb"),
    ],
)
def test_bad_values_are_named(argv, env, message) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(argv, env)


def test_unknown_file_keys_are_errors(tmp_path) -> None:
    file = tmp_path / "worker.toml"
    file.write_text('model_path = "/m"\nmax_slot = 3\n')
    with pytest.raises(ConfigError, match="max_slot"):
        load_config(["--config", str(file)], {})
    with pytest.raises(ConfigError, match="not found"):
        load_config(["--config", str(tmp_path / "nope.json")], {})


def test_socket_timeout_covers_the_reward_deadline() -> None:
    config = RolloutConfig(model_path="/m", bus=BusConfig(block_ms=2000), reward_timeout_s=30)
    assert config.max_block_ms == 30_000
