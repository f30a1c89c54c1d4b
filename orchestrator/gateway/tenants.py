"""API keys → tenants: who is calling (the operator's list, built once at start-up).

A tenant is a name (``alice``, ``team-a``) the operator gives one or more API keys. Every record
the gateway creates (models, sessions, sampling sessions, futures) carries its tenant, and a
tenant only ever sees its own: another tenant's looks exactly like one that does not exist (404).

The Tinker SDK sends the key as ``X-API-Key`` (and refuses, client-side, a key that does not start
with ``tml-``); ``Authorization: Bearer KEY`` is accepted too for other clients. Keys are kept as
SHA-256 digests only, so a key never sits in memory, logs or Redis in the clear.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping

from events.config import read_file
from events.errors import ConfigError
from orchestrator.gateway.errors import HttpError

TENANT_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
"""Tenant names: 1-64 letters, digits, ``_``, ``.``, ``-`` (they become part of Redis keys)."""


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Tenants:
    """The key → tenant map; :meth:`authenticate` answers who a request's headers belong to."""

    def __init__(self, keys: Mapping[str, str]) -> None:
        """``keys``: API key → tenant name. Raises ConfigError naming a bad tenant or key."""
        self._by_digest: dict[str, str] = {}
        for key, tenant in keys.items():
            if not key.strip():
                raise ConfigError(f"API key for tenant {tenant!r} is empty; give a non-empty key")
            if not TENANT_PATTERN.match(tenant):
                raise ConfigError(
                    f"tenant name {tenant!r} is invalid; use 1-64 letters, digits, '_', '.' or '-'"
                )
            self._by_digest[_digest(key.strip())] = tenant

    @classmethod
    def from_config(cls, api_keys: Mapping[str, str], api_keys_file: str = "") -> Tenants:
        """The flags' keys plus the keys file's (a mapping ``KEY: TENANT``; the flags win)."""
        merged: dict[str, str] = {}
        if api_keys_file:
            for key, tenant in read_file(api_keys_file).items():
                if not isinstance(tenant, str):
                    raise ConfigError(
                        f"keys file {api_keys_file!r}: the tenant of a key must be a string, "
                        f"got {tenant!r}"
                    )
                merged[str(key)] = tenant
        merged.update(api_keys)
        return cls(merged)

    def __len__(self) -> int:
        return len(self._by_digest)

    def authenticate(self, headers: Mapping[str, str]) -> str:
        """The tenant of the request's key; 401 (the SDK's AuthenticationError) otherwise."""
        key = headers.get("x-api-key") or headers.get("X-API-Key") or ""
        if not key:
            auth = headers.get("authorization") or headers.get("Authorization") or ""
            scheme, _, token = auth.partition(" ")
            key = token if scheme.lower() == "bearer" else ""
        if not key:
            raise HttpError(401, "no API key: send it as the X-API-Key header (api_key=...)")
        tenant = self._by_digest.get(_digest(key.strip()))
        if tenant is None:
            raise HttpError(401, "unknown API key; ask the gateway's operator for a key")
        return tenant
