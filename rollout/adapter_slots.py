"""Which adapter version occupies which LoRA slot of the embedded engine (no tensors).

:class:`AdapterSlots` is the engine's version bookkeeping, unit tested alone: each loaded
``(name, version)`` (:class:`AdapterRef`) occupies one slot. Loading version ``v`` retires the
versions of that adapter older than the newest ``keep_versions`` (set it to max staleness + 1,
so every task still allowed to run finds its policy). A version used by a batch in flight
(*pinned*) is never evicted: its retirement waits for the batch to finish. When a load finds no
free slot it evicts the least recently used version that no batch in flight uses, or raises
:class:`AdapterCapacityError` if every slot is in use. Versions are immutable.

The embedded engine's error hierarchy (:class:`EngineError`) lives here too, because the
bookkeeping and :class:`AdapterRef` raise it; :mod:`rollout.engine` raises the same classes.
(Not to be confused with the trainer's slot table, which holds the adapters' trainable
weights.)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import msgspec

from events.errors import MultiLoraError


class EngineError(MultiLoraError):
    """Root of the engine's errors (all are the caller's to fix; none leave the engine broken)."""


class RequestError(EngineError, ValueError):
    """A generate request is invalid; ``field`` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class AdapterNotLoadedError(EngineError, LookupError):
    """A request names an adapter version that is not (or no longer) loaded."""


class AdapterCapacityError(EngineError):
    """No slot can be freed: every slot holds a version used by a batch in flight."""


class StaleAdapterError(EngineError, ValueError):
    """A load asks for a version older than the ``keep_versions`` newest already loaded."""


class AdapterRef(msgspec.Struct, frozen=True):
    """One adapter version. Text form ``"name@version"`` (plain ``"name"`` means version 0)."""

    name: str
    version: int = 0

    def __post_init__(self) -> None:
        if not self.name or "@" in self.name or self.name != self.name.strip():
            raise RequestError(
                "adapter",
                f"bad adapter name {self.name!r}: non-empty, no '@', no surrounding spaces",
            )
        if self.version < 0:
            raise RequestError("adapter", f"version must be >= 0, got {self.version}")

    def __str__(self) -> str:
        return f"{self.name}@{self.version}"

    @classmethod
    def parse(cls, text: str) -> AdapterRef:
        """``"math@3"`` -> ``AdapterRef("math", 3)``; ``"math"`` -> version 0."""
        name, sep, version = text.rpartition("@")
        if not sep:
            return cls(text, 0)
        if not version.isdigit():
            raise RequestError("lora_path", f"{text!r}: version after '@' must be an integer")
        return cls(name, int(version))


@dataclass
class SlotEntry:
    """One loaded version: its slot, directory, last use (a logical clock) and batch pins."""

    ref: AdapterRef
    slot: int
    path: str
    last_used: int
    pins: int = 0
    retired: bool = False


class AdapterSlots:
    """Bookkeeping of which adapter version occupies which slot (no tensors; unit tested alone).

    ``pins`` count batches in flight using an entry. A retired entry accepts no new batches and
    frees its slot when its last pin is released.
    """

    def __init__(self, num_slots: int, keep_versions: int) -> None:
        if keep_versions < 1:
            raise EngineError(f"keep_versions={keep_versions} must be >= 1 (max staleness + 1)")
        self.num_slots = num_slots
        self.keep_versions = keep_versions
        self._entries: dict[AdapterRef, SlotEntry] = {}
        self._clock = 0

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def live(self) -> list[AdapterRef]:
        """Loaded versions that new batches may use, by name then version."""
        refs = [e.ref for e in self._entries.values() if not e.retired]
        return sorted(refs, key=lambda r: (r.name, r.version))

    def path_of(self, ref: AdapterRef) -> str:
        return self._entries[ref].path

    def get(self, ref: AdapterRef) -> SlotEntry | None:
        entry = self._entries.get(ref)
        return None if entry is None or entry.retired else entry

    def acquire(self, refs: Iterable[AdapterRef]) -> dict[AdapterRef, int]:
        """Pin each distinct ref for one batch; return its slot. All or nothing."""
        wanted = set(refs)
        missing = [ref for ref in wanted if self.get(ref) is None]
        if missing:
            loaded = ", ".join(str(r) for r in self.live()) or "none"
            raise AdapterNotLoadedError(
                f"adapter {sorted(map(str, missing))} not loaded (loaded: "
                f"{loaded}); load it first (/load_lora_adapter)"
            )
        now = self._tick()
        slots = {}
        for ref in wanted:
            entry = self._entries[ref]
            entry.pins += 1
            entry.last_used = now
            slots[ref] = entry.slot
        return slots

    def release(self, refs: Iterable[AdapterRef]) -> list[int]:
        """Unpin one batch's refs; return slots freed by retirements that were waiting."""
        freed = []
        for ref in set(refs):
            entry = self._entries[ref]
            entry.pins -= 1
            if entry.retired and entry.pins == 0:
                del self._entries[ref]
                freed.append(entry.slot)
        return freed

    def place(self) -> tuple[int, AdapterRef | None]:
        """A slot for a new version: a free one, else evict the least recently used unpinned."""
        used = {e.slot for e in self._entries.values()}
        free = [s for s in range(self.num_slots) if s not in used]
        if free:
            return free[0], None
        idle = [e for e in self._entries.values() if e.pins == 0]
        if not idle:
            busy = ", ".join(str(e.ref) for e in self._entries.values())
            raise AdapterCapacityError(
                f"all {self.num_slots} LoRA slots hold versions used by "
                f"batches in flight ({busy}); raise max_loras or retry"
            )
        victim = min(idle, key=lambda e: e.last_used)
        del self._entries[victim.ref]
        return victim.slot, victim.ref

    def check_fresh(self, ref: AdapterRef) -> None:
        """Raise :class:`StaleAdapterError` if ``ref`` would be retired at once by newer ones."""
        newer = {
            e.ref.version
            for e in self._entries.values()
            if e.ref.name == ref.name and e.ref.version > ref.version
        }
        if len(newer) >= self.keep_versions:
            raise StaleAdapterError(
                f"{ref}: {len(newer)} newer versions of {ref.name!r} are "
                f"loaded and keep_versions={self.keep_versions}"
            )

    def commit(self, ref: AdapterRef, slot: int, path: str) -> tuple[list[int], list[AdapterRef]]:
        """Record ``ref`` in ``slot``; retire versions beyond the newest ``keep_versions``.

        Returns ``(freed_slots, retired_refs)``; pinned retirees free their slot on release.
        """
        self._entries[ref] = SlotEntry(ref=ref, slot=slot, path=path, last_used=self._tick())
        versions = sorted(
            (e for e in self._entries.values() if e.ref.name == ref.name and not e.retired),
            key=lambda e: e.ref.version,
            reverse=True,
        )
        return self._retire(versions[self.keep_versions :])

    def retire(self, name: str, version: int | None = None) -> tuple[list[int], list[AdapterRef]]:
        """Retire one version, or every version of ``name`` when ``version`` is None."""
        doomed = [
            e
            for e in self._entries.values()
            if not e.retired
            and e.ref.name == name
            and (version is None or e.ref.version == version)
        ]
        if not doomed:
            what = name if version is None else f"{name}@{version}"
            raise AdapterNotLoadedError(f"adapter {what!r} is not loaded; nothing to unload")
        return self._retire(doomed)

    def _retire(self, entries: list[SlotEntry]) -> tuple[list[int], list[AdapterRef]]:
        freed = []
        for entry in entries:
            entry.retired = True
            if entry.pins == 0:
                del self._entries[entry.ref]
                freed.append(entry.slot)
        return freed, [e.ref for e in entries]
