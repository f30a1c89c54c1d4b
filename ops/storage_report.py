"""``multilora storage``: what the deployment stores, per adapter and in total.

Bytes and counts per adapter name, summed over its registrations:

- **versions**: the trainer's published versions in the artifact store
  (``{artifacts}/{adapter}/{registration}/v000123/``, :mod:`orchestrator.artifacts`), the ones
  retention has not deleted yet (:mod:`orchestrator.retention`);
- **checkpoints**: the checkpoint store's step directories
  (``{checkpoints}/{adapter}/{registration}/step_000120/``), bytes of the registration
  directories (pointers and any temporary directory included);
- **exports**: how many of those are PEFT exports: every step directory is one (it loads in
  PEFT, vLLM and SGLang unchanged), so their bytes are the checkpoints' and counted once.

Then Redis: ``used_memory`` of ``INFO memory``, the length of every stream of the namespace, and
the entries the control-log snapshot covers (:mod:`orchestrator.compaction`). ``--json`` prints
the :class:`StorageReport` as JSON. Only reads; the stores are the same flags and environment
the processes take (``--artifacts-root`` / ``MULTILORA_ARTIFACTS``, ``--checkpoints-root`` /
``MULTILORA_CHECKPOINTS``).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence

import msgspec
import redis

from events.config import DEFAULT_ARTIFACTS, DEFAULT_CHECKPOINTS, BusConfig, add_flags, load
from events.connection import connect
from events.streams import Streams
from orchestrator.artifacts import ArtifactStore
from orchestrator.checkpoint_store import CheckpointStore
from orchestrator.compaction import snapshot_key
from orchestrator.storage import Fs, is_name


class AdapterUsage(msgspec.Struct, frozen=True, kw_only=True):
    """One adapter name's footprint on the stores (see the module doc)."""

    adapter: str
    versions: int = 0
    version_bytes: int = 0
    checkpoints: int = 0
    checkpoint_bytes: int = 0
    exports: int = 0
    bytes: int = 0
    """``version_bytes + checkpoint_bytes``."""


class StreamUsage(msgspec.Struct, frozen=True, kw_only=True):
    """A stream of the namespace and its length in entries."""

    stream: str
    length: int


class StorageReport(msgspec.Struct, frozen=True, kw_only=True):
    """Everything ``multilora storage`` shows; ``total_bytes`` is over every adapter."""

    artifacts: str
    checkpoints: str
    adapters: tuple[AdapterUsage, ...]
    total_bytes: int
    redis_used_memory: int
    streams: tuple[StreamUsage, ...]
    snapshot_entries: int = 0


def storage_report(
    client: redis.Redis, streams: Streams, *, artifacts: str, checkpoints: str
) -> StorageReport:
    """Measure the stores (local directories or fsspec URLs) and Redis."""
    usage: dict[str, AdapterUsage] = {}
    store = ArtifactStore(artifacts)
    for adapter, registration in store.registrations():
        versions = store.list_versions(adapter, registration)
        size = sum(store.version_bytes(adapter, registration, v) for v in versions)
        old = usage.get(adapter, AdapterUsage(adapter=adapter))
        usage[adapter] = msgspec.structs.replace(
            old, versions=old.versions + len(versions), version_bytes=old.version_bytes + size
        )
    for adapter, steps, size in _checkpoints(checkpoints):
        old = usage.get(adapter, AdapterUsage(adapter=adapter))
        usage[adapter] = msgspec.structs.replace(
            old,
            checkpoints=old.checkpoints + steps,
            checkpoint_bytes=old.checkpoint_bytes + size,
            exports=old.exports + steps,
        )
    rows = tuple(
        msgspec.structs.replace(r, bytes=r.version_bytes + r.checkpoint_bytes)
        for r in (usage[name] for name in sorted(usage))
    )
    keys = (
        streams.ingress,
        streams.control,
        streams.tasks,
        streams.groups,
        streams.requests,
        streams.dead,
    )
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.xlen(key)
    lengths = pipe.execute()
    memory = client.info("memory")
    covered = client.hget(snapshot_key(streams), "entries")
    return StorageReport(
        artifacts=store.root,
        checkpoints=CheckpointStore(checkpoints).root,
        adapters=rows,
        total_bytes=sum(r.bytes for r in rows),
        redis_used_memory=int(memory["used_memory"]),
        streams=tuple(
            StreamUsage(stream=k, length=int(n)) for k, n in zip(keys, lengths, strict=True)
        ),
        snapshot_entries=int(covered) if covered is not None else 0,
    )


def _checkpoints(root: str) -> list[tuple[str, int, int]]:
    """``(adapter, step directories, bytes)`` per adapter name of the checkpoint store."""
    store, fs = CheckpointStore(root), Fs(root)
    out = []
    for adapter in fs.names(fs.root):
        if not is_name(adapter) or adapter.startswith(".") or not fs.fs.isdir(fs.join(adapter)):
            continue
        steps = size = 0
        for registration in store.registrations(adapter):
            path = fs.join(adapter, registration)
            if not fs.fs.isdir(path):
                continue
            steps += len(store.list_steps(adapter, registration))
            size += int(fs.fs.du(path, total=True))
        out.append((adapter, steps, size))
    return out


def human(n: int) -> str:
    """``1.5 MiB``-style size."""
    if n < 1024:
        return f"{n} B"
    size, unit = n / 1024, "KiB"
    for bigger in ("MiB", "GiB", "TiB"):
        if size < 1024:
            break
        size, unit = size / 1024, bigger
    return f"{size:.1f} {unit}"


def render(report: StorageReport) -> str:
    """The report as the tables ``multilora storage`` prints."""
    header = ("adapter", "versions", "bytes", "checkpoints", "bytes", "exports", "total")
    rows = [
        (
            r.adapter,
            str(r.versions),
            human(r.version_bytes),
            str(r.checkpoints),
            human(r.checkpoint_bytes),
            str(r.exports),
            human(r.bytes),
        )
        for r in report.adapters
    ]
    rows.append(("TOTAL", "", "", "", "", "", human(report.total_bytes)))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [f"artifacts: {report.artifacts}", f"checkpoints: {report.checkpoints}", ""]
    for row in [header, *rows]:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    lines += ["", f"redis used_memory: {human(report.redis_used_memory)}"]
    lines += [f"  {s.stream}: {s.length} entries" for s in report.streams]
    lines.append(f"  control-log snapshot covers {report.snapshot_entries} entries")
    return "\n".join(lines)


def cmd_storage(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> int:
    """``multilora storage [--json] [--artifacts-root URL] [--checkpoints-root URL]`` plus the
    bus target (``--redis-url``, ``--namespace``), read like every tenant command's."""
    env = os.environ if environ is None else environ
    p = argparse.ArgumentParser(prog="multilora storage", description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--artifacts-root", default=env.get("MULTILORA_ARTIFACTS", DEFAULT_ARTIFACTS))
    p.add_argument(
        "--checkpoints-root", default=env.get("MULTILORA_CHECKPOINTS", DEFAULT_CHECKPOINTS)
    )
    add_flags(p, BusConfig, only=("redis_url", "namespace"))
    p.set_defaults(redis_url=None, namespace=None)
    args = p.parse_args(argv)
    given = {k: getattr(args, k) for k in ("redis_url", "namespace") if getattr(args, k)}
    bus = load(BusConfig, role="client", argv=[], environ=env, overrides=given)
    client = connect(bus.redis_url)
    try:
        report = storage_report(
            client,
            Streams(bus.namespace),
            artifacts=args.artifacts_root,
            checkpoints=args.checkpoints_root,
        )
    finally:
        client.close()
    print(msgspec.json.encode(report).decode() if args.json else render(report))
    return 0
