"""Stream and key names. Every key lives under one namespace prefix (default ``multilora``).

The entry format is the same on every stream: one field, ``event``, holding the event's JSON.
A raw producer in any language writes ``XADD <ns>:ingress * event '<json>'``.
"""

from __future__ import annotations

import msgspec

EVENT_FIELD = "event"


class Streams(msgspec.Struct, frozen=True):
    """The key names of one deployment (one namespace)."""

    namespace: str = "multilora"

    @property
    def ingress(self) -> str:
        return f"{self.namespace}:ingress"

    @property
    def control(self) -> str:
        return f"{self.namespace}:control"

    @property
    def tasks(self) -> str:
        return f"{self.namespace}:rollout.tasks"

    @property
    def groups(self) -> str:
        return f"{self.namespace}:rollout.groups"

    @property
    def requests(self) -> str:
        """Client-driven adapters' training requests (gateways → trainer)."""
        return f"{self.namespace}:train.requests"

    def future(self, request_id: str) -> str:
        """Hash holding the durable result record of one client request (a future)."""
        return f"{self.namespace}:future:{request_id}"

    @property
    def paths(self) -> str:
        """Hash: a client's ``tinker://`` path → what it names (weights or a checkpoint)."""
        return f"{self.namespace}:paths"

    @property
    def dead(self) -> str:
        return f"{self.namespace}:dead"

    def lease(self, consumer: str) -> str:
        """Key of the lease that protects a consumer name (one live process per name)."""
        return f"{self.namespace}:lease:{consumer}"

    def status(self, adapter: str) -> str:
        """Hash holding the status projection of one adapter."""
        return f"{self.namespace}:status:{adapter}"

    @property
    def status_index(self) -> str:
        """Set of adapter names that have a status hash."""
        return f"{self.namespace}:status"

    def key(self, *parts: str) -> str:
        """Any other key of this namespace."""
        return ":".join((self.namespace, *parts))
