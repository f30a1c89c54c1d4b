"""The ingress edge: the decoder refuses what a registration gets wrong on its own, naming the
JSON path, the value and the fix; the published JSON Schema refuses the same values; every
refused entry becomes an ``adapter.rejected`` of its own and a dead letter."""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import msgspec
import pytest
import redis

from events.codec import Decoder, encode
from events.connection import connect
from events.consumer import Consumer, Delivery
from events.effects import Effects
from events.errors import SchemaError
from events.jsonschema import ingress_schema
from events.schema import DeadLetter, IngressEvent, RegisterRequested, Rejected
from events.specs import AdapterSpec, DatasetSpec, LossSpec, RewardSpec, SamplingSpec
from events.streams import Streams
from ops.report import status_table
from orchestrator.admission import Admission, Reject
from orchestrator.fleet import Fleet
from orchestrator.ingress import (
    MAX_BYTES,
    dead_letter_effects,
    ingress_subscription,
    invalid_rejection,
)
from orchestrator.status import has_status
from tests.orchestrator import builders as b

VALID = b.register("a", "r1")  # steps=3, a jsonl dataset, one reward


def raw_with(path: str, value: Any, event: RegisterRequested = VALID) -> str:
    """``event``'s JSON with the value at dotted ``path`` (``spec.optim``) replaced."""
    data = json.loads(encode(event)["event"])
    *parents, last = path.split(".")
    node = data
    for part in parents:
        node = node[part]
    node[last] = value
    return json.dumps(data)


def refuse(raw: str, entry: str = "7-0") -> Rejected:
    """Decode ``raw`` as the trainer's ingress subscription does; it must fail. Returns the
    rejection the tenant reads."""
    with pytest.raises(SchemaError) as info:
        Decoder(IngressEvent, max_bytes=MAX_BYTES).decode({"event": raw}, entry)
    return invalid_rejection(entry, {"event": raw}, str(info.value))


def test_a_valid_registration_decodes() -> None:
    assert Decoder(IngressEvent).decode(encode(VALID)) == VALID
    for name in ("math-a.v2_0", "x" * 63, "0"):
        jsonschema.validate(json.loads(raw_with("adapter", name)), ingress_schema())
        assert Decoder(IngressEvent).decode({"event": raw_with("adapter", name)}).adapter == name


@pytest.mark.parametrize(
    "name", ["", "Math", "-a", ".a", "a b", "a/b", "a:b", "x" * 64, "é", "a\n"]
)
def test_bad_names(name: str) -> None:
    raw = raw_with("adapter", name)
    rejected = refuse(raw)
    assert rejected.field == "adapter"
    assert repr(name) in rejected.reason and "lowercase letters" in rejected.reason
    assert rejected.adapter == (name if has_status(name) else "<invalid:7-0>")
    with pytest.raises(jsonschema.ValidationError):  # producers can check before sending
        jsonschema.validate(json.loads(raw), ingress_schema())


def test_bad_registration_ids() -> None:
    for bad in ("has space", "r1\n", "x" * 129):
        rejected = refuse(raw_with("registration_id", bad))
        assert rejected.field == "registration_id" and repr(bad)[:40] in rejected.reason
        assert "printable ASCII" in rejected.reason
    assert Decoder(IngressEvent).decode({"event": raw_with("registration_id", "")})


# (JSON path, value there, the field the rejection names, words of its reason, whether the JSON
# Schema itself refuses it: cross-field rules live in __post_init__, which a schema cannot carry)
DECODE_CASES = [
    ("spec.rank", 0, "spec.rank", [">= 1", "got 0"], True),
    ("spec.alpha", 0.0, "spec.alpha", ["> 0.0", "got 0.0"], True),
    ("spec.group_size", 1, "spec.group_size", [">= 2", "got 1"], True),
    ("spec.group_size", 257, "spec.group_size", ["<= 256", "got 257"], True),
    ("spec.prompts_per_step", 0, "spec.prompts_per_step", [">= 1", "got 0"], True),
    ("spec.prompts_per_step", 1025, "spec.prompts_per_step", ["<= 1024"], True),
    ("spec.steps", 0, "spec.steps", [">= 1", "got 0"], True),
    ("spec.max_staleness", -1, "spec.max_staleness", [">= 0", "got -1"], True),
    ("spec.checkpoint_interval", 0, "spec.checkpoint_interval", [">= 1"], True),
    ("spec.keep_checkpoints", 0, "spec.keep_checkpoints", [">= 1"], True),
    ("spec.optim", {"lr": 0.0}, "spec.optim.lr", ["> 0.0", "got 0.0"], True),
    ("spec.optim", {"eps": 0.0}, "spec.optim.eps", ["> 0.0"], True),
    ("spec.optim", {"betas": [0.9, 1.0]}, "spec.optim.betas[1]", ["< 1.0", "got 1.0"], True),
    ("spec.optim", {"weight_decay": -0.1}, "spec.optim.weight_decay", [">= 0"], True),
    ("spec.optim", {"warmup_steps": -1}, "spec.optim.warmup_steps", [">= 0"], True),
    ("spec.optim", {"min_lr_ratio": 1.5}, "spec.optim.min_lr_ratio", ["<= 1"], True),
    ("spec.optim", {"max_grad_norm": -1.0}, "spec.optim.max_grad_norm", [">= 0"], True),
    ("spec.loss", {"clip_low": 1.0}, "spec.loss.clip_low", ["< 1.0"], True),
    ("spec.loss", {"clip_high": -0.1}, "spec.loss.clip_high", [">= 0"], True),
    ("spec.loss", {"kl_coef": -1.0}, "spec.loss.kl_coef", [">= 0"], True),
    ("spec.loss", {"clip_ratio_c": 0.5}, "spec.loss.clip_ratio_c", ["0.5", "> 1, or 0"], False),
    ("spec.sampling", {"temperature": -0.5}, "spec.sampling.temperature", [">= 0"], True),
    ("spec.sampling", {"top_p": 0.0}, "spec.sampling.top_p", ["> 0.0", "got 0.0"], True),
    ("spec.sampling", {"top_k": 0}, "spec.sampling.top_k", ["top_k = 0", "or -1"], False),
    ("spec.sampling", {"top_k": -2}, "spec.sampling.top_k", [">= -1"], True),
    ("spec.sampling", {"max_new_tokens": 0}, "spec.sampling.max_new_tokens", ["got 0"], True),
    ("spec.sampling", {"max_new_tokens": 32769}, "spec.sampling.max_new_tokens", [], True),
    ("spec.sampling", {"stop": ["", "x"]}, "spec.sampling.stop[0]", ["length >= 1"], True),
    ("spec.rewards", [], "spec.rewards", ["rewards = ()", "at least one reward term"], False),
    ("spec.driver", "client", "spec.driver", ["driver = 'client'", "no dataset or rewards"], False),
    ("spec.dataset", {"kind": "jsonl"}, "spec.dataset.path", ["needs a path"], False),
    ("spec.dataset", {"kind": "reasoning_gym"}, "spec.dataset.name", ["reasoning-gym"], False),
    (
        "spec.dataset",
        {"kind": "reasoning_gym", "name": "chain_sum", "size": 0},
        "spec.dataset.size",
        [">= 1"],
        True,
    ),
    (
        "spec.optim",
        {"warmup_steps": 4},
        "spec.optim.warmup_steps",
        ["optim.warmup_steps = 4", "steps = 3"],
        False,
    ),
]


@pytest.mark.parametrize(("path", "value", "field", "parts", "in_schema"), DECODE_CASES)
def test_bad_values_are_refused_at_decode_with_their_path(
    path: str, value: Any, field: str, parts: list[str], in_schema: bool
) -> None:
    raw = raw_with(path, value)
    rejected = refuse(raw)
    assert rejected.field == field, rejected
    assert rejected.adapter == "a" and rejected.ingress_entry == "7-0"
    last = field.split(".")[-1].split("[")[0]
    assert re.search(rf"(at `\$\.{re.escape(field)}`|{last} = )", rejected.reason), rejected
    for part in parts:
        assert part in rejected.reason, rejected.reason
    if in_schema:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(json.loads(raw), ingress_schema())
    else:
        jsonschema.validate(json.loads(raw), ingress_schema())


def test_cross_field_rules_also_hold_for_specs_built_in_python() -> None:
    with pytest.raises(ValueError, match=r"clip_ratio_c = 0.5 is invalid; use a value > 1"):
        LossSpec(clip_ratio_c=0.5)
    with pytest.raises(ValueError, match="top_k = 0 is invalid"):
        SamplingSpec(top_k=0)
    with pytest.raises(ValueError, match="path = '' is invalid; a parquet dataset needs a path"):
        DatasetSpec(kind="parquet")
    with pytest.raises(ValueError, match="name = '' is invalid"):
        DatasetSpec(kind="reasoning_gym")
    with pytest.raises(ValueError, match=r"optim\.warmup_steps = 4 is invalid; use at most steps"):
        b.make_spec(optim=msgspec.structs.replace(VALID.spec.optim, warmup_steps=4))
    assert LossSpec(clip_ratio_c=0.0).clip_ratio_c == 0.0  # 0: no dual clip
    # ranges are Meta constraints: checked when decoding or converting, not on construction
    with pytest.raises(msgspec.ValidationError, match=r"Expected `int` >= 1 - at `\$.rank`"):
        msgspec.convert({**msgspec.to_builtins(VALID.spec), "rank": 0}, AdapterSpec)


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity", "1e400"])
@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("spec.alpha", 12345.5),
        ("spec.optim", {"lr": 12345.5}),
        ("spec.rewards", [{"name": "math", "weight": 12345.5}]),
    ],
)
def test_non_finite_numbers_cannot_reach_the_trainer(path: str, value: Any, text: str) -> None:
    raw = raw_with(path, value).replace("12345.5", text)
    reason = refuse(raw).reason
    assert reason.startswith("malformed JSON") or "Number out of range" in reason, reason


def test_a_non_finite_number_built_in_python_is_refused_with_its_path() -> None:
    inf = b.register("a", "r1", rewards=(RewardSpec(name="math", weight=float("inf")),))
    rejected = refuse(encode(inf)["event"].decode())  # JSON has no infinity: it encodes as null
    assert rejected.field == "spec.rewards[0].weight" and "got `null`" in rejected.reason


def test_unknown_fields_and_oversize_payloads_are_refused() -> None:
    typo = refuse(raw_with("spec.rnak", 8))
    assert typo.field == "spec" and "rnak" in typo.reason and typo.adapter == "a"
    big = raw_with("spec.dataset", {"kind": "jsonl", "path": "p.jsonl", "prompt_template": "x"})
    big = big.replace('"prompt_template": "x"', f'"prompt_template": "{"x" * MAX_BYTES}"')
    rejected = refuse(big)
    assert f"{len(big.encode())} bytes" in rejected.reason and "65536" in rejected.reason
    assert rejected.adapter == "a" and rejected.field == ""


def test_each_undecodable_entry_is_reported_under_a_key_of_its_own() -> None:
    named = {
        "1-0": "{this is not json",
        "2-0": "[1, 2]",
        "3-0": json.dumps({"type": "adapter.register_requested", "adapter": 3}),
        "4-0": json.dumps({"type": "adapter.register_requested", "adapter": "y" * 300}),
        "5-0": json.dumps({"type": "adapter.register_requested", "adapter": "typo", "spec": {}}),
    }
    adapters = {
        entry: invalid_rejection(entry, {"event": raw}, "malformed").adapter
        for entry, raw in named.items()
    }
    assert adapters == {
        "1-0": "<invalid:1-0>",
        "2-0": "<invalid:2-0>",
        "3-0": "<invalid:3-0>",
        "4-0": "<invalid:4-0>",
        "5-0": "typo",
    }
    assert invalid_rejection("6-0", {}, "no event field").adapter == "<invalid:6-0>"


@pytest.mark.bus
def test_every_bad_registration_leaves_a_rejection_and_a_dead_letter(
    redis_url: str, rclient: redis.Redis, streams: Streams, admission: Admission
) -> None:
    """Undecodable entries (the consumer runtime) and admission's refusals (what the trainer's
    ``on_register`` commits) alike; ``multilora status`` shows each on its own line."""
    garbage = [rclient.xadd(streams.ingress, {"event": "{nope"}).decode() for _ in range(2)]
    ranked = rclient.xadd(streams.ingress, {"event": raw_with("spec.rank", 0)}).decode()
    unknown = b.register("c", "r3", rewards=(RewardSpec(name="nope"),))
    refused = rclient.xadd(streams.ingress, encode(unknown)).decode()

    def handler(d: Delivery) -> Effects:  # the trainer's Reject branch, without the trainer
        verdict = admission.check(d.event, Fleet(1))
        assert isinstance(verdict, Reject)
        rejected = Rejected(
            adapter=d.event.adapter,
            registration_id=d.event.registration_id,
            reason=verdict.reason,
            field=verdict.field,
            ingress_entry=d.entry_id,
        )
        effects = Effects().publish(streams.control, rejected)
        return effects.extend(
            dead_letter_effects(streams, d, verdict.reason, consumer="test", now=1.0)
        )

    subscriptions = [ingress_subscription(streams, "trainer")]
    consumer = Consumer(
        lambda: connect(redis_url), streams, "trainer-0", subscriptions, handler, block_ms=100
    )
    consumer.run(burst=True)

    letters = [
        msgspec.json.decode(fields[b"dead"], type=DeadLetter)
        for _, fields in rclient.xrange(streams.dead)
    ]
    assert [d.entry_id for d in letters] == [*garbage, ranked, refused]
    assert all(d.stream == streams.ingress and d.group == "trainer" for d in letters)
    assert letters[-1].payload == {"event": encode(unknown)["event"].decode()}
    assert letters[-1].reason.startswith("reward 'nope' is unknown")
    assert letters[-1].consumer == "test" and letters[-1].deliveries == 1
    decoder = Decoder(Rejected)
    rejections = {
        e.ingress_entry: e for e in (decoder.decode(f) for _, f in rclient.xrange(streams.control))
    }
    assert set(rejections) == {*garbage, ranked, refused}
    assert rejections[ranked].field == "spec.rank" and rejections[refused].adapter == "c"
    table = status_table(rclient, streams)
    for entry in garbage:
        line = next(r for r in table.splitlines() if r.startswith(f"<invalid:{entry}>"))
        assert "rejected" in line and "malformed JSON" in line
    assert "got 0" in next(r for r in table.splitlines() if r.startswith("a "))
