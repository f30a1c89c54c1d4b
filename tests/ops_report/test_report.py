"""The status table against a real Redis: rows from the control log and the status hashes."""

from __future__ import annotations

import msgspec

from events.schema import Admitted, StepDone
from ops.plots import step_history
from ops.report import fold_control, status_table
from orchestrator.status import SKIP_FIELD, SKIPS_FIELD, SkipNote, WorkerSync
from tests.ops_report.log import SPEC, lifecycle, publish


def _line(table: str, name: str) -> list[str]:
    (line,) = [ln for ln in table.splitlines() if ln.startswith(name + " ")]
    return line.split()


def test_status_table_shows_phase_slot_step_reward_sync_reason(rclient, streams):
    lifecycle(rclient, streams)
    table = status_table(rclient, streams)
    assert table.splitlines()[0].split()[:3] == ["ADAPTER", "STATE", "SLOT"]
    assert _line(table, "alpha") == ["alpha", "running", "1", "2/10", "0.500", "v1/0.42s"]
    assert _line(table, "beta") == ["beta", "queued", "-", "0/10", "-", "-"]
    gamma = _line(table, "gamma")
    assert gamma[:2] == ["gamma", "rejected"]
    assert "rank 999 exceeds max_rank 64 (field rank)" in table
    assert _line(table, "delta")[:5] == ["delta", "retired", "-", "10/10", "0.875"]
    eps = _line(table, "eps")
    assert eps[:4] == ["eps", "failed", "3", "4/10"]
    assert "non-finite loss 3 times" in " ".join(eps)


def test_status_table_counts_the_shown_registrations_skips(rclient, streams):
    lifecycle(rclient, streams)
    shown = "ra"  # alpha's registration in the log (tests.ops_report.log)
    for registration, count in (("an-earlier-one", 7), (shown, 2)):
        note = SkipNote(
            step=3, reason="non-finite loss", in_a_row=1, time=1.0, registration_id=registration
        )
        fields = {
            "registration_id": shown,  # the trainer's field: the registration the hash shows
            SKIPS_FIELD: str(count),
            SKIP_FIELD: msgspec.json.encode(note).decode(),
        }
        rclient.hset(streams.status("alpha"), mapping=fields)
        rclient.sadd(streams.status_index, "alpha")
        table = status_table(rclient, streams)
        alpha = " ".join(_line(table, "alpha"))
        if registration == shown:
            assert alpha.endswith("2 steps skipped, last 3: non-finite loss"), alpha
        else:  # a note of another registration of the name is not this one's
            assert "skipped" not in alpha, alpha


def test_status_table_empty_and_undecodable_entries_are_reported(rclient, streams):
    assert "(no adapters)" in status_table(rclient, streams)
    rclient.xadd(streams.control, {"event": b'{"type": "adapter.bogus", "adapter": "x"}'})
    assert "1 control entries did not decode" in status_table(rclient, streams)


def test_reregistration_shows_the_new_run_and_ignores_late_old_work(rclient, streams):
    r1 = {"adapter": "a", "registration_id": "r1", "epoch": 1}
    r2 = {"adapter": "a", "registration_id": "r2", "epoch": 1}
    publish(
        rclient,
        streams.control,
        Admitted(**r1, slot=0, spec=SPEC),
        StepDone(**r1, step=5, version=5, metrics={"loss": 1.0}),
        Admitted(**r2, slot=1, spec=SPEC),
        StepDone(**r1, step=6, version=6, metrics={"loss": 1.0}),
        StepDone(**r2, step=1, version=1, metrics={"loss": 2.0}),
    )
    assert _line(status_table(rclient, streams), "a")[:4] == ["a", "running", "1", "1/10"]
    assert step_history(rclient, streams) == {"a": [(1, {"loss": 2.0})]}


def test_status_hashes_fill_adapters_missing_from_the_log(rclient, streams):
    rclient.sadd(streams.status_index, "old")
    rclient.hset(
        streams.status("old"),
        mapping={
            "phase": "running",
            "slot": "0",
            "step": "7",
            "steps_total": "20",
            "reward_mean": "0.3",
        },
    )
    assert _line(status_table(rclient, streams), "old")[:5] == [
        "old",
        "running",
        "0",
        "7/20",
        "0.300",
    ]


def test_status_hash_fills_what_the_log_lacks_for_the_same_registration(rclient, streams):
    lifecycle(rclient, streams)  # beta is queued; its log holds no sync
    sync = WorkerSync(registration_id="rb", version=0, latency_s=0.5, time=1.0)
    other = WorkerSync(registration_id="old", version=7, latency_s=9.0, time=2.0)
    fields = {"registration_id": "rb", "phase": "queued", "sync:w": msgspec.json.encode(sync)}
    rclient.hset(streams.status("beta"), mapping=fields)
    rclient.hset(
        streams.status("gamma"),
        mapping={
            "registration_id": "old",
            "phase": "running",
            "sync:w": msgspec.json.encode(other),
        },
    )
    rclient.sadd(streams.status_index, "beta", "gamma")
    table = status_table(rclient, streams)
    assert _line(table, "beta") == ["beta", "queued", "-", "0/10", "-", "v0/0.50s"]
    assert _line(table, "gamma")[:2] == ["gamma", "rejected"]  # the hash shows another one


def test_fold_keeps_one_entry_per_step_on_redelivery():
    env = {"adapter": "a", "registration_id": "r", "epoch": 1}
    events = [
        Admitted(**env, slot=0, spec=SPEC),
        StepDone(**env, step=1, version=1, metrics={"loss": 1.0}),
        StepDone(**env, step=1, version=1, metrics={"loss": 1.0}),
        StepDone(**env, step=2, version=2, metrics={"loss": 0.5}),
    ]
    view = fold_control(events)
    history = view.step_history()
    assert [s for s, _ in history["a"]] == [1, 2]
    assert history["a"][-1][1]["loss"] == 0.5
