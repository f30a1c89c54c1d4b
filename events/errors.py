"""The project's small exception hierarchy.

Every error a user or operator can cause derives from :class:`MultiLoraError` and its message names
the offending value and the fix. Layers add their own leaves (``trainer`` defines ``SlotError``,
``rollout`` defines ``RewardError``) but always under one of these roots, so callers can catch
"anything this project raises on purpose" without catching programming errors.
"""

from __future__ import annotations


class MultiLoraError(Exception):
    """Root of every error this project raises on purpose."""


class ConfigError(MultiLoraError, ValueError):
    """A configuration value, CLI flag or adapter spec field is invalid."""


class SchemaError(MultiLoraError, ValueError):
    """A message on the bus could not be decoded into a known event type."""


class BusError(MultiLoraError):
    """The event bus cannot be used as configured (unsafe server, lease taken, ...)."""


class UnsafeRedisError(BusError):
    """The Redis server's persistence or eviction settings can lose acknowledged events."""


class LeaseError(BusError):
    """Another live process already holds this consumer name."""


class HandlerError(MultiLoraError):
    """A handler could not process one event; the entry is retried, then dead-lettered.

    Raise this (or a subclass) for failures tied to one entry. Any other exception escaping a
    handler is treated as a bug and crashes the process; at-least-once delivery makes that safe.
    """
