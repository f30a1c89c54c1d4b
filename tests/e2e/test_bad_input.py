"""Bad registrations are refused with a reason the tenant can read; the service keeps running.

Each bad input reaches the live stack the way a tenant would send it (the producer client, or a
raw ``XADD`` to ingress for malformed JSON). Each must come back as ``adapter.rejected`` on the
control log with the reason and the offending field, show in ``multilora status``
(:func:`ops.report.status_table`), and leave every process up: a good adapter submitted after all
of them trains to completion.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest

from events.schema import Admitted, Completed, DeadLetter, Rejected, StepDone
from events.specs import RewardSpec
from ops.report import status_table
from tests.e2e.harness import LiveStack
from tests.e2e.specs import adapter_spec, char_reward

pytestmark = [pytest.mark.bus]


def test_bad_specs_are_rejected_with_reasons_and_a_good_one_still_trains(
    live_stack: Callable[..., LiveStack], data_dir: Path
) -> None:
    live = live_stack()
    good = adapter_spec(data_dir, char_reward("a"), steps=5)
    missing = msgspec.structs.replace(
        good.dataset, path=str(data_dir / "missing.jsonl")
    )  # a file that does not exist
    # name -> (spec, expected field, words the reason must contain); the first two are refused
    # by the ingress decoder (a rule of the event and spec structs), the others by admission
    bad = {
        "Bad Name!": (good, "adapter", "got 'Bad Name!'; use 1-63 lowercase letters"),
        "zero-steps": (
            msgspec.structs.replace(good, steps=0),
            "spec.steps",
            "Expected `int` >= 1 - at `$.spec.steps`; got 0",
        ),
        "unknown-reward": (
            msgspec.structs.replace(good, rewards=(RewardSpec(name="no_such_reward"),)),
            "spec.rewards[0].name",
            "reward 'no_such_reward' is unknown",
        ),
        "missing-data": (
            msgspec.structs.replace(good, dataset=missing),
            "spec.dataset",
            "dataset is not readable",
        ),
        "rank-too-big": (
            msgspec.structs.replace(good, rank=9),  # the stack's max rank is 8
            "spec.rank",
            "rank = 9 is invalid; use 1 <= rank <= 8",
        ),
    }
    decoder_refused = {"Bad Name!", "zero-steps"}
    registrations = {name: live.register(name, spec) for name, (spec, _, _) in bad.items()}
    garbage = [live.xadd_ingress("{this is not json"), live.xadd_ingress("not json at all")]
    wrong_field = json.dumps(
        {"type": "adapter.register_requested", "adapter": "typo", "spec": {"rnak": 4}}
    )
    typo = live.xadd_ingress(wrong_field)
    good_id = live.register("good", good)

    live.wait_for(
        "the good adapter to complete", lambda: live.events(Completed, good_id), timeout_s=90
    )
    live.check()  # every process is still up

    rejected = live.events(Rejected)
    by_name = {e.adapter: e for e in rejected}
    table = status_table(live.client, live.streams)
    cli = subprocess.run(
        [
            *(sys.executable, "-m", "ops.cli", "status", "--redis-url", live.stack.url),
            *("--namespace", live.streams.namespace),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    print(table)
    for name, (_, field, words) in bad.items():
        event = by_name[name]
        registration = "" if name in decoder_refused else registrations[name]
        assert event.registration_id == registration and event.field == field, event
        assert words in event.reason, event.reason
        for shown in (table, cli.stdout):  # ops.report and `multilora status`
            line = next(row for row in shown.splitlines() if row.startswith(name))
            assert "rejected" in line and words in line, shown
        assert not live.events(Admitted, registrations[name])

    by_entry = {e.ingress_entry: e for e in rejected if e.ingress_entry}
    for entry in garbage:  # each on its own line, none hiding another
        assert by_entry[entry].adapter == f"<invalid:{entry}>", by_entry
        assert "JSON" in by_entry[entry].reason, by_entry
    assert by_entry[typo].adapter == "typo" and "rnak" in by_entry[typo].reason, by_entry
    for entry in (*garbage, typo):
        assert by_entry[entry].reason in table and by_entry[entry].reason in cli.stdout, table
        line = next(r for r in table.splitlines() if r.startswith(by_entry[entry].adapter))
        assert by_entry[entry].reason in line, table
    # every bad registration left a dead letter (decoder- and admission-refused alike)
    letters = {
        letter.entry_id: letter
        for letter in (
            msgspec.json.decode(fields[b"dead"], type=DeadLetter)
            for _, fields in live.client.xrange(live.streams.dead)
        )
    }
    assert set(letters) >= set(by_entry), letters
    assert len(by_entry) == len(bad) + len(garbage) + 1
    for name in bad.keys() - decoder_refused:
        letter = letters[by_name[name].ingress_entry]
        assert by_name[name].reason in letter.reason and letter.stream == live.streams.ingress
        assert json.loads(letter.payload["event"])["adapter"] == name

    # The good adapter trained every step after all of that.
    assert [e.step for e in live.events(StepDone, good_id)] == [1, 2, 3, 4, 5]
    good = table.split("good", 1)[1].splitlines()[0].split()
    assert good[0] == "retired" and good[-1] == "budget"  # the lifecycle's phase, and why
