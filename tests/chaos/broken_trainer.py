"""The real trainer with one guarantee deliberately broken, to show the chaos checker catches it.

``python -m tests.chaos.broken_trainer --break MODE trainer <trainer flags>`` patches the
trainer's classes in this process, then runs ``multilora trainer`` (:func:`ops.cli.main`)
unchanged. Production code is never edited; each patch sits at a level that survives the
trainer's write path being reworked (versions written behind the step):

``no-epoch-check``
    Fencing dropped. The trainer fences rollout groups twice: the fleet
    (:meth:`orchestrator.fleet.Fleet.accepts_group`: live registration, current epoch, known
    version) and the run (:meth:`trainer.runs.AdapterRun.wants`: the group answers a task of
    the run's epoch still in flight). Both become "any group of a step not trained yet", so
    after a restart the groups of the old epoch are trained with the new epoch's. The checker
    reports ``stale_trained``.
``lose-version-write``
    A version write that loses the step's update:
    :meth:`orchestrator.artifacts.ArtifactStore.write_version` of version ``v >= 1`` writes the
    files of version ``v - 1`` of that registration under the name of ``v`` (the directory
    exists, it verifies, its training state says step ``v - 1``), while ``step_done`` announces
    ``v``. A trainer restarted from it resumes one step back and applies that step again. The
    checker reports ``applied_twice`` (and the checkpointer dead-letters the mismatch).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping, Sequence

from events.schema import RolloutGroup
from orchestrator.artifacts import ArtifactStore, PublishedVersion
from orchestrator.fleet import Fleet
from trainer.runs import AdapterRun


def break_fencing() -> None:
    def accepts_group(
        self: Fleet, adapter: str, registration_id: str, epoch: int, version: int
    ) -> bool:
        return True

    def wants(self: AdapterRun, group: RolloutGroup) -> bool:
        return group.step > self.step and group.step in self.expected

    Fleet.accepts_group = accepts_group  # type: ignore[method-assign]
    AdapterRun.wants = wants  # type: ignore[method-assign]


def lose_version_writes() -> None:
    write = ArtifactStore.write_version
    previous: dict[tuple[str, str], Mapping[str, bytes | bytearray]] = {}

    def write_version(
        self: ArtifactStore,
        adapter: str,
        registration_id: str,
        version: int,
        files: Mapping[str, bytes | bytearray],
    ) -> PublishedVersion:
        key = (adapter, registration_id)
        stale = previous.get(key, files) if version >= 1 else files
        previous[key] = dict(files)
        return write(self, adapter, registration_id, version, stale)

    ArtifactStore.write_version = write_version  # type: ignore[method-assign]


MODES: dict[str, Callable[[], None]] = {
    "no-epoch-check": break_fencing,
    "lose-version-write": lose_version_writes,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.broken_trainer")
    parser.add_argument("--break", dest="mode", required=True, choices=sorted(MODES))
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if not rest or rest[0] != "trainer":
        parser.error("give the trainer command after the mode: --break MODE trainer <flags>")
    MODES[args.mode]()
    print(f"broken trainer: {args.mode}", file=sys.stderr, flush=True)
    from ops.cli import main as cli

    return cli(rest)


if __name__ == "__main__":
    raise SystemExit(main())
