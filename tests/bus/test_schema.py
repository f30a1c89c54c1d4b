"""Event schemas: round trips, the published JSON Schema, and fuzzed input (only SchemaError)."""

from __future__ import annotations

import contextlib
import json

import jsonschema
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from events.codec import Decoder, encode, stamp
from events.errors import SchemaError
from events.jsonschema import (
    SCHEMA_PATH,
    ingress_schema,
    normalise_description,
    normalise_descriptions,
    render,
)
from events.schema import (
    ALL_EVENT_TYPES,
    Admitted,
    CheckpointSaved,
    Completed,
    ControlEvent,
    Datum,
    DeregisterRequested,
    Exported,
    Failed,
    ForwardBackward,
    GroupEvent,
    IngressEvent,
    LoadWeights,
    OptimStep,
    PromptGroup,
    Queued,
    RegisterRequested,
    Rejected,
    Retired,
    RolloutGroup,
    RolloutTask,
    Sample,
    SampleTask,
    SaveRequested,
    SaveWeights,
    StepDone,
    Synced,
    SyncRequested,
    TaskEvent,
    TrainRequest,
    event_type,
)
from events.specs import AdapterSpec, DatasetSpec, RewardSpec, SamplingSpec

SPEC = AdapterSpec(
    dataset=DatasetSpec(kind="reasoning_gym", name="chain_sum", config={"min_terms": 2}),
    rewards=(RewardSpec(name="reasoning_gym"), RewardSpec(name="length_penalty", weight=0.1)),
    rank=8,
)
ENV = {"adapter": "math-a", "registration_id": "r1", "epoch": 2}

EXAMPLES = [
    RegisterRequested(**ENV, spec=SPEC),
    DeregisterRequested(**ENV),
    Rejected(**ENV, reason="bad rank", field="spec.rank", ingress_entry="1-0"),
    Admitted(**ENV, slot=3, spec=SPEC),
    Queued(**ENV, position=0, spec=SPEC),
    StepDone(**ENV, step=4, version=4, metrics={"reward_mean": 0.5}),
    SyncRequested(**ENV, version=4, step=4, uri="/a/v4", sha256="ab", bytes=10),
    Synced(**ENV, worker="w1", version=4, latency_s=0.1),
    CheckpointSaved(**ENV, step=4, uri="/c/step_000004"),
    Exported(**ENV, step=4, uri="/c/step_000004/peft"),
    Completed(**ENV, step=10),
    Retired(**ENV, slot=3),
    Failed(**ENV, reason="nan"),
    RolloutTask(
        **ENV,
        step=1,
        version=1,
        weights_uri="/a/v1",
        prompt_indices=(3, 1),
        group_size=2,
        dataset=SPEC.dataset,
        rewards=SPEC.rewards,
        sampling=SamplingSpec(),
    ),
    RolloutGroup(
        **ENV,
        task_id="t1",
        step=1,
        version=1,
        worker="w1",
        groups=(
            PromptGroup(
                prompt_index=3,
                prompt_ids=(1, 2),
                samples=(Sample(completion_ids=(5,), logprobs=(-0.5,), text="7", reward=1.0),),
            ),
        ),
    ),
    SaveRequested(**ENV, request_id="q1", name="a", step=4, version=4, state_uri="/a/v4"),
    SampleTask(**ENV, request_id="q2", version=4, weights_uri="/a/v4", prompt_ids=(1, 2)),
    ForwardBackward(
        **ENV,
        request_id="q3",
        datums=(Datum(tokens=(1, 2, 3), weights=(0.0, 1.0, 1.0)),),
        loss_fn="importance_sampling",
    ),
    OptimStep(**ENV, request_id="q4", learning_rate=1e-3),
    SaveWeights(**ENV, request_id="q5", name="s", kind="sampler"),
    LoadWeights(**ENV, request_id="q6", uri="/c/step_000004", with_optimizer=True),
]


def test_every_event_type_has_an_example() -> None:
    assert {type(e) for e in EXAMPLES} == set(ALL_EVENT_TYPES)


@pytest.mark.parametrize("event", EXAMPLES, ids=event_type)
def test_round_trip(event: msgspec.Struct) -> None:
    union = {
        RolloutTask: TaskEvent,
        SampleTask: TaskEvent,
        RolloutGroup: GroupEvent,
        ForwardBackward: TrainRequest,
        OptimStep: TrainRequest,
        SaveWeights: TrainRequest,
        LoadWeights: TrainRequest,
    }.get(type(event), ControlEvent)
    stamped = stamp(event, source="test")
    assert stamped.id and stamped.time > 0 and stamped.source == "test"
    assert Decoder(union).decode(encode(stamped)) == stamped
    assert json.loads(encode(stamped)["event"])["type"] == event_type(event)


def test_committed_json_schema_is_up_to_date() -> None:
    assert SCHEMA_PATH.read_text() == render(), "run: python -m events.jsonschema"


def _as_msgspec_022_renders(node: object) -> object:
    """``node`` with every description as msgspec 0.22 rendered docstrings: not dedented."""
    if isinstance(node, list):
        return [_as_msgspec_022_renders(item) for item in node]
    if not isinstance(node, dict):
        return node
    return {
        key: value.replace("\n", "\n    ")
        if key == "description" and isinstance(value, str)
        else _as_msgspec_022_renders(value)
        for key, value in node.items()
    }


def test_descriptions_do_not_depend_on_how_msgspec_renders_docstrings() -> None:
    raw = msgspec.json.schema(IngressEvent)
    assert normalise_descriptions(_as_msgspec_022_renders(raw)) == normalise_descriptions(raw)
    text = render()
    assert "\\n " not in text  # no indentation left after a newline in any description
    wrapped = """First line,
        wrapped here.

        Second   paragraph
        with ``code``.
    """
    assert (
        normalise_description(wrapped)
        == "First line, wrapped here.\n\nSecond paragraph with ``code``."
    )
    assert normalise_description("  one line  ") == "one line"
    described = {
        "properties": {"description": {"type": "string", "description": "a\n    b"}},
        "default": {"description": "data\n  kept"},
    }
    assert normalise_descriptions(described) == {
        "properties": {"description": {"type": "string", "description": "a b"}},
        "default": {"description": "data\n  kept"},
    }


def test_json_schema_validates_what_the_decoder_accepts_and_rejects() -> None:
    schema = ingress_schema()
    good = json.loads(encode(EXAMPLES[0])["event"])
    jsonschema.validate(good, schema)
    bad = {**good, "spec": {**good["spec"], "rnak": 8}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    with pytest.raises(SchemaError, match="rnak"):
        Decoder(IngressEvent).decode({"event": json.dumps(bad)})


def test_empty_id_is_filled_from_the_entry_id() -> None:
    raw = json.loads(encode(EXAMPLES[0])["event"])
    raw["id"] = ""
    event = Decoder(IngressEvent).decode({"event": json.dumps(raw)}, entry_id="17-0")
    assert event.id == "17-0"


def test_oversize_and_missing_field_are_schema_errors() -> None:
    with pytest.raises(SchemaError, match="over the limit"):
        Decoder(IngressEvent, max_bytes=100).decode(encode(EXAMPLES[0]))
    with pytest.raises(SchemaError, match="no 'event' field"):
        Decoder(IngressEvent).decode({"data": "{}"})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids, max_size=4)
    ),
    max_leaves=20,
)
field_names = st.sampled_from(
    ["type", "adapter", "spec", "id", "epoch", "rank", "dataset", "rewards", "kind", "name"]
)
payloads = st.fixed_dictionaries(
    {"type": st.sampled_from(["adapter.register_requested", "adapter.deregister_requested", "x"])},
    optional={
        "adapter": json_values,
        "spec": st.dictionaries(field_names, json_values, max_size=6),
        "epoch": json_values,
    },
)


@settings(max_examples=400, deadline=None)
@given(payload=payloads)
def test_fuzzed_payloads_only_raise_schema_errors(payload: dict[str, object]) -> None:
    with contextlib.suppress(SchemaError):
        Decoder(IngressEvent).decode({"event": json.dumps(payload)})


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=300))
def test_fuzzed_bytes_only_raise_schema_errors(raw: bytes) -> None:
    for union in (IngressEvent, ControlEvent, TaskEvent, GroupEvent):
        with contextlib.suppress(SchemaError):
            Decoder(union).decode({b"event": raw})
