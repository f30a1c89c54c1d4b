"""Data sources: JSONL, Parquet and reasoning-gym behind one protocol, and their errors."""

from __future__ import annotations

import ast
import difflib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from events.specs import DatasetSpec
from ops.models import char_tokenizer
from rollout.data import DataError, DataSource, PromptItem, open_source

ROWS: list[dict[str, Any]] = [
    {"question": "What is 2+3?", "answer": 5, "info": {"level": 1, "tags": ["add"]}},
    {
        "question": "Natalia sold 48 clips in April...",
        "answer": "72",
        "info": {"level": 2, "tags": []},
    },
    {"question": "Solve x^{2}=4 for x>0.", "answer": "2", "info": {"level": 3, "tags": ["eq"]}},
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n\n" for r in rows), encoding="utf-8")
    return path


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Labels become a string column; ``info`` becomes a struct column."""
    rows = [{**r, "answer": str(r["answer"])} for r in rows]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def jsonl_spec(path: str, **kw: object) -> DatasetSpec:
    fields = {"input_key": "question", "label_key": "answer", "metadata_key": "info", **kw}
    return DatasetSpec(kind="jsonl", path=path, **fields)  # type: ignore[arg-type]


# --- contract: every kind of source --------------------------------------------------------------

SourceFactory = Callable[[Path], DataSource]


def _jsonl(root: Path) -> DataSource:
    write_jsonl(root / "train.jsonl", ROWS)
    return open_source(jsonl_spec("train.jsonl"), allowed_roots=[root])


def _parquet(root: Path) -> DataSource:
    write_parquet(root / "train.parquet", ROWS)
    spec = DatasetSpec(
        kind="parquet",
        path=str(root / "train.parquet"),
        input_key="question",
        label_key="answer",
        metadata_key="info",
    )
    return open_source(spec, allowed_roots=[root])


def _gym(name: str) -> SourceFactory:
    def make(root: Path) -> DataSource:
        spec = DatasetSpec(kind="reasoning_gym", name=name, size=6, seed=11)
        return open_source(spec, allowed_roots=[root])

    return make


def _chat(root: Path) -> DataSource:
    tokenizer = char_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    write_jsonl(root / "train.jsonl", ROWS)
    spec = jsonl_spec("train.jsonl", chat_template=True, prompt_template="Q: {input}")
    return open_source(spec, allowed_roots=[root], tokenizer=tokenizer)


SOURCES: dict[str, SourceFactory] = {
    "jsonl": _jsonl,
    "parquet": _parquet,
    "chain_sum": _gym("chain_sum"),
    "basic_arithmetic": _gym("basic_arithmetic"),
    "leg_counting": _gym("leg_counting"),
    "jsonl+chat": _chat,
}


@pytest.mark.parametrize("kind", sorted(SOURCES))
def test_source_contract(kind: str, tmp_path: Path) -> None:
    src = SOURCES[kind](tmp_path)
    again = SOURCES[kind](tmp_path)
    assert len(src) > 0 and len(again) == len(src)
    for i in range(len(src)):
        item = src[i]
        assert isinstance(item, PromptItem) and item.index == i
        assert item.prompt.strip() and isinstance(item.label, str) and item.label
        assert msgspec.json.decode(msgspec.json.encode(item.metadata)) == item.metadata
        assert src[i] == item == again[i]  # deterministic, across opens too
    for bad in (len(src), -1):
        with pytest.raises(IndexError, match="out of range"):
            src[bad]


def test_jsonl_items(tmp_path: Path) -> None:
    src = SOURCES["jsonl"](tmp_path)
    assert len(src) == 3
    assert src[0] == PromptItem(
        index=0, prompt="What is 2+3?", label="5", metadata={"level": 1, "tags": ["add"]}
    )
    assert src[1].label == "72"


def test_parquet_matches_jsonl(tmp_path: Path) -> None:
    assert [SOURCES["parquet"](tmp_path)[i] for i in range(3)] == [
        SOURCES["jsonl"](tmp_path)[i] for i in range(3)
    ]


def test_parquet_metadata_as_json_text(tmp_path: Path) -> None:
    rows = [{"prompt": "p", "answer": "a", "meta": json.dumps({"k": [1, 2]})}]
    write_parquet(tmp_path / "t.parquet", rows)
    spec = DatasetSpec(kind="parquet", path="t.parquet", metadata_key="meta")
    assert open_source(spec, allowed_roots=[tmp_path])[0].metadata == {"k": [1, 2]}


def test_prompt_template_keeps_other_braces(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "t.jsonl", ROWS)
    spec = jsonl_spec("t.jsonl", prompt_template="Solve: {input}\nPut the answer in \\boxed{}.")
    src = open_source(spec, allowed_roots=[tmp_path])
    assert src[0].prompt == "Solve: What is 2+3?\nPut the answer in \\boxed{}."


def test_chat_template_wraps_one_user_turn(tmp_path: Path) -> None:
    assert SOURCES["jsonl+chat"](tmp_path)[0].prompt == "<|user|>Q: What is 2+3?\n<|assistant|>"


@pytest.mark.model
def test_chat_template_of_smollm2(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    model_dir = Path(os.environ.get("MULTILORA_SMOLLM2", "models/smollm2-135m"))
    if not (model_dir / "tokenizer_config.json").exists():
        pytest.skip(f"no converted SmolLM2 at {model_dir}")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    write_jsonl(tmp_path / "t.jsonl", ROWS)
    spec = jsonl_spec("t.jsonl", chat_template=True)
    prompt = open_source(spec, allowed_roots=[tmp_path], tokenizer=tokenizer)[0].prompt
    assert "What is 2+3?" in prompt and prompt.rstrip().endswith("assistant")


def test_reasoning_gym_items_carry_their_entry(tmp_path: Path) -> None:
    import reasoning_gym

    src = SOURCES["chain_sum"](tmp_path)
    expected = reasoning_gym.create_dataset("chain_sum", size=6, seed=11)
    for i in range(len(src)):
        item, entry = src[i], expected[i]
        assert item.prompt == entry["question"] and item.label == entry["answer"]
        assert item.metadata["reasoning_gym"] == {
            "name": "chain_sum",
            "size": 6,
            "seed": 11,
            "config": {},
            "index": i,
        }
        assert item.metadata["entry"]["metadata"]["expression"] == entry["metadata"]["expression"]


def test_reasoning_gym_config_is_passed(tmp_path: Path) -> None:
    spec = DatasetSpec(
        kind="reasoning_gym",
        name="chain_sum",
        size=5,
        seed=1,
        config={"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
    )
    src = open_source(spec, allowed_roots=[])
    assert all(src[i].metadata["entry"]["metadata"]["num_terms"] == 2 for i in range(5))


# --- errors --------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"dataset file 'nope.jsonl' not found"):
        open_source(jsonl_spec("nope.jsonl"), allowed_roots=[tmp_path])


def test_paths_outside_roots_are_rejected(tmp_path: Path) -> None:
    root, outside = tmp_path / "data", tmp_path / "secret"
    root.mkdir()
    outside.mkdir()
    write_jsonl(outside / "t.jsonl", ROWS)
    (root / "link.jsonl").symlink_to(outside / "t.jsonl")
    for path in (str(outside / "t.jsonl"), "../secret/t.jsonl", "link.jsonl", "/etc/passwd"):
        with pytest.raises(DataError, match="outside the allowed data roots"):
            open_source(jsonl_spec(path), allowed_roots=[root])
    with pytest.raises(DataError, match="no data roots"):
        open_source(jsonl_spec("t.jsonl"), allowed_roots=[])
    # a symlink that stays inside the roots is fine
    write_jsonl(root / "real.jsonl", ROWS)
    (root / "alias.jsonl").symlink_to(root / "real.jsonl")
    assert len(open_source(jsonl_spec("alias.jsonl"), allowed_roots=[root])) == 3


def test_relative_paths_try_each_root(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_jsonl(tmp_path / "b" / "t.jsonl", ROWS)
    src = open_source(jsonl_spec("t.jsonl"), allowed_roots=[tmp_path / "a", tmp_path / "b"])
    assert len(src) == 3


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
@pytest.mark.parametrize("key", ["input_key", "label_key", "metadata_key"])
def test_missing_key_names_key_file_and_keys(fmt: Any, key: str, tmp_path: Path) -> None:
    path = tmp_path / f"t.{fmt}"
    (write_jsonl if fmt == "jsonl" else write_parquet)(path, ROWS)
    spec = DatasetSpec(
        kind=fmt, path=path.name, input_key="question", label_key="answer", metadata_key="info"
    )  # type: ignore[arg-type]
    spec = msgspec.structs.replace(spec, **{key: "nonexistent"})
    with pytest.raises(DataError) as err:
        open_source(spec, allowed_roots=[tmp_path])
    message = str(err.value)
    assert "'nonexistent'" in message and str(path) in message
    assert "'question'" in message and "'answer'" in message  # the keys that exist


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_empty_file(fmt: str, tmp_path: Path) -> None:
    path = tmp_path / f"t.{fmt}"
    if fmt == "jsonl":
        path.write_text("\n\n", encoding="utf-8")
    else:
        pq.write_table(
            pa.table({"prompt": pa.array([], pa.string()), "answer": pa.array([], pa.string())}),
            path,
        )
    with pytest.raises(DataError, match="has no rows"):
        open_source(DatasetSpec(kind=fmt, path=path.name), allowed_roots=[tmp_path])  # type: ignore[arg-type]


def test_unknown_reasoning_gym_name_lists_valid_ones() -> None:
    with pytest.raises(DataError, match=r"unknown reasoning-gym dataset 'chain_summ'.*'chain_sum'"):
        open_source(DatasetSpec(kind="reasoning_gym", name="chain_summ"), allowed_roots=[])


@pytest.mark.parametrize(
    ("name", "closest"),
    [("leg_count", "leg_counting"), ("sudoku_solver", "sudoku"), ("countdown_game", "countdown")],
)
def test_did_you_mean_lists_the_closest_names_first(name: str, closest: str) -> None:
    with pytest.raises(DataError) as info:
        open_source(DatasetSpec(kind="reasoning_gym", name=name), allowed_roots=[])
    suggested = re.search(r"did you mean one of (\[.*?\])\?", str(info.value))
    assert suggested is not None and ast.literal_eval(suggested[1])[0] == closest


def test_did_you_mean_ranks_by_similarity_even_when_nothing_is_close() -> None:
    """Nothing passes difflib's cutoff for "xyz": still the nearest names, not a-b-c order."""
    from reasoning_gym.factory import DATASETS

    with pytest.raises(DataError) as info:
        open_source(DatasetSpec(kind="reasoning_gym", name="xyz"), allowed_roots=[])
    suggested = re.search(r"did you mean one of (\[.*?\])\?", str(info.value))
    assert suggested is not None
    names = ast.literal_eval(suggested[1])
    assert len(names) == 5 and names != sorted(DATASETS)[:5]

    def ratio(x: str) -> float:
        return difflib.SequenceMatcher(None, x, "xyz").ratio()

    assert min(map(ratio, names)) >= max(ratio(x) for x in DATASETS if x not in names)


def test_a_spec_without_its_path_or_name_cannot_be_built() -> None:
    """Moved to the spec (events.specs): ``open_source`` never sees such a spec."""
    with pytest.raises(ValueError, match="reasoning_gym dataset needs the name"):
        DatasetSpec(kind="reasoning_gym")
    with pytest.raises(ValueError, match="jsonl dataset needs a path"):
        DatasetSpec(kind="jsonl")


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (DatasetSpec(kind="reasoning_gym", name="chain_sum", size=0), "size must be positive"),
        (
            DatasetSpec(kind="reasoning_gym", name="chain_sum", config={"bogus": 1}),
            "rejects config",
        ),
        (DatasetSpec(kind="reasoning_gym", name="chain_sum", prompt_template="Q:"), "placeholder"),
        (DatasetSpec(kind="reasoning_gym", name="chain_sum", chat_template=True), "tokenizer"),
    ],
)
def test_bad_specs(spec: DatasetSpec, match: str) -> None:
    with pytest.raises(DataError, match=match):
        open_source(spec, allowed_roots=[Path("/nonexistent-root")])


def test_tokenizer_without_chat_template(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "t.jsonl", ROWS)
    with pytest.raises(DataError, match="cannot apply a chat template"):
        open_source(
            jsonl_spec("t.jsonl", chat_template=True),
            allowed_roots=[tmp_path],
            tokenizer=char_tokenizer(),
        )


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ('{"prompt": "a", "answer": "b"}\n{not json}\n', r"t.jsonl:2 is not valid JSON"),
        ('["prompt", "answer"]\n', r"t.jsonl:1 is a JSON list"),
        ('{"prompt": 3, "answer": "b"}\n', "'prompt' must be a string"),
        ('{"prompt": "a", "answer": null}\n', "'answer' must be a string or number"),
    ],
)
def test_malformed_jsonl(content: str, match: str, tmp_path: Path) -> None:
    (tmp_path / "t.jsonl").write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=match):
        open_source(DatasetSpec(kind="jsonl", path="t.jsonl"), allowed_roots=[tmp_path])


def test_not_a_parquet_file(tmp_path: Path) -> None:
    (tmp_path / "t.parquet").write_text("hello", encoding="utf-8")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        open_source(DatasetSpec(kind="parquet", path="t.parquet"), allowed_roots=[tmp_path])
