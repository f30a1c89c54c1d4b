"""Adapter versions in slots: retirement beyond keep_versions, LRU eviction, in-flight pins."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from rollout.adapter_slots import (
    AdapterCapacityError,
    AdapterNotLoadedError,
    AdapterRef,
    AdapterSlots,
    StaleAdapterError,
)
from rollout.engine import Engine, GenerateRequest
from rollout.sampling import SamplingParams

R = AdapterRef
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True)


def _load(table: AdapterSlots, ref: AdapterRef) -> tuple[int, list[AdapterRef]]:
    table.check_fresh(ref)
    slot, evicted = table.place()
    _, retired = table.commit(ref, slot, "/x")
    return slot, [r for r in (evicted, *retired) if r is not None]


def test_table_retires_versions_beyond_keep() -> None:
    table = AdapterSlots(num_slots=4, keep_versions=2)
    assert _load(table, R("m", 1)) == (0, [])
    assert _load(table, R("m", 2)) == (1, [])
    assert _load(table, R("m", 3)) == (2, [R("m", 1)])
    assert table.live() == [R("m", 2), R("m", 3)]
    assert _load(table, R("m", 4))[0] == 0  # v1's slot was freed and is reused


def test_table_pinned_version_retires_after_release() -> None:
    table = AdapterSlots(num_slots=4, keep_versions=1)
    _load(table, R("m", 1))
    table.acquire([R("m", 1)])
    _, gone = _load(table, R("m", 2))
    assert gone == [R("m", 1)]
    assert table.live() == [R("m", 2)]  # no new batch may use v1 ...
    with pytest.raises(AdapterNotLoadedError, match="m@1"):
        table.acquire([R("m", 1)])
    assert table.place()[0] == 2  # ... but its slot 0 stays busy while pinned
    assert table.release([R("m", 1)]) == [0]


def test_table_lru_eviction_and_capacity_error() -> None:
    table = AdapterSlots(num_slots=2, keep_versions=2)
    _load(table, R("a", 1))
    _load(table, R("b", 1))
    table.release(table.acquire([R("a", 1)]))  # a used more recently than b
    assert _load(table, R("c", 1)) == (1, [R("b", 1)])
    table.acquire([R("a", 1), R("c", 1)])
    with pytest.raises(AdapterCapacityError, match="all 2 LoRA slots"):
        table.place()


def test_table_rejects_stale_and_unknown() -> None:
    table = AdapterSlots(num_slots=4, keep_versions=2)
    _load(table, R("m", 3))
    _load(table, R("m", 4))
    with pytest.raises(StaleAdapterError, match="keep_versions=2"):
        table.check_fresh(R("m", 1))
    with pytest.raises(AdapterNotLoadedError, match="zz"):
        table.retire("zz")


def test_adapter_ref_text_form() -> None:
    assert AdapterRef.parse("math@12") == R("math", 12)
    assert AdapterRef.parse("math") == R("math", 0)
    assert str(R("math", 3)) == "math@3"
    with pytest.raises(ValueError, match="integer"):
        AdapterRef.parse("math@x")


def _req(engine: Engine, version: int, tokens: int = 8) -> GenerateRequest:
    sp = SamplingParams(temperature=0.0, max_new_tokens=tokens, ignore_eos=True)
    return GenerateRequest(
        input_ids=tuple(engine.tokenizer.encode("version")), adapter=R("m", version), sampling=sp
    )


def test_engine_v3_evicts_v1(
    make_engine: Callable[..., Engine], version_dirs: dict[int, Path]
) -> None:
    engine = make_engine(keep_versions=2)
    for v in (1, 2, 3):
        engine.load_adapter("m", v, version_dirs[v])
    assert engine.loaded_adapters() == [R("m", 2), R("m", 3)]
    with pytest.raises(AdapterNotLoadedError, match=r"m@1.*m@2, m@3"):
        engine.generate([_req(engine, 1)])
    again = engine.load_adapter("m", 3, version_dirs[3])  # versions are immutable: a no-op
    assert again.evicted == ()
    out2, out3 = engine.generate([_req(engine, 2), _req(engine, 3)])
    assert out2.completion_ids != out3.completion_ids
    engine.unload_adapter("m", 2)
    assert engine.loaded_adapters() == [R("m", 3)]


def test_in_flight_batch_keeps_its_version(
    make_engine: Callable[..., Engine], version_dirs: dict[int, Path]
) -> None:
    engine = make_engine(keep_versions=1, max_loras=2)
    engine.load_adapter("m", 1, version_dirs[1])
    want = engine.generate([_req(engine, 1, tokens=12)])[0]

    decoding, loaded = threading.Event(), threading.Event()
    calls = []

    def pause_once(module: object, args: object, kwargs: object) -> None:
        calls.append(1)
        if len(calls) == 3:  # prefill and two decode steps done: the batch is in flight
            decoding.set()
            loaded.wait(timeout=30)

    handle = engine.model.register_forward_pre_hook(pause_once, with_kwargs=True)
    result: list[object] = []
    worker = threading.Thread(target=lambda: result.append(engine.generate([_req(engine, 1, 12)])))
    worker.start()
    try:
        assert decoding.wait(timeout=30)
        load2 = engine.load_adapter("m", 2, version_dirs[2])  # retires v1, but v1 is pinned
        assert load2.evicted == (R("m", 1),)
        assert engine.loaded_adapters() == [R("m", 2)]
        with pytest.raises(AdapterNotLoadedError, match="m@1"):  # no new batch may use v1
            engine.generate([_req(engine, 1)])
    finally:
        loaded.set()
        worker.join(timeout=30)
        handle.remove()
    got = result[0][0]  # type: ignore[index]
    assert got.completion_ids == want.completion_ids  # the in-flight rows kept v1's policy
    assert got.logprobs == pytest.approx(want.logprobs, abs=1e-5)
    assert engine.load_adapter("m", 3, version_dirs[3]).slot == 0  # v1's slot is free again
