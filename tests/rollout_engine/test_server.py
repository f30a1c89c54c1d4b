"""Contract tests: the SGLang-compatible server on a real socket, driven by SGLangClient."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from rollout.adapter_slots import AdapterRef
from rollout.client import GenerateOutput, SGLangClient, SGLangError
from rollout.engine import Engine, GenerateRequest
from rollout.sampling import SamplingParams
from rollout.server import RolloutServer

# Field names of SGLang's documented request types (io_struct.GenerateReqInput,
# sampling_params.SamplingParams, LoadLoRAAdapterReqInput / UnloadLoRAAdapterReqInput).
SGLANG_GENERATE_FIELDS = {
    "text",
    "input_ids",
    "sampling_params",
    "lora_path",
    "return_logprob",
    "rid",
    "logprob_start_len",
    "top_logprobs_num",
    "return_text_in_logprobs",
    "stream",
}
SGLANG_SAMPLING_FIELDS = {
    "max_new_tokens",
    "stop",
    "stop_token_ids",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
    "min_new_tokens",
    "n",
    "ignore_eos",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "no_stop_trim",
    "sampling_seed",
}
SGLANG_LOAD_FIELDS = {"lora_name", "lora_path", "pinned"}
SGLANG_UNLOAD_FIELDS = {"lora_name"}
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=8)


class Served:
    def __init__(self, engine: Engine, server: RolloutServer, url: str) -> None:
        self.engine, self.server, self.url = engine, server, url
        self.bodies: list[tuple[str, Any]] = []
        self.client = SGLangClient(url, timeout=60)


@pytest.fixture(scope="module")
def served(tiny_dir: Path, adapter_dirs: dict[str, Path]) -> Iterator[Served]:
    engine = Engine.from_pretrained(tiny_dir, max_loras=4, max_lora_rank=8, keep_versions=2)
    bodies: list[tuple[str, Any]] = []
    server = RolloutServer(
        engine,
        allowed_roots=[adapter_dirs["a"].parent],
        max_wait_s=0.01,
        on_request=lambda path, body: bodies.append((path, body)),
    )
    url = server.start("127.0.0.1", 0)
    s = Served(engine, server, url)
    s.bodies = bodies
    s.client.load_lora_adapter("a@1", str(adapter_dirs["a"]))
    s.client.load_lora_adapter("b@1", str(adapter_dirs["b"]))
    yield s
    s.client.close()
    server.stop()


def _direct(engine: Engine, ids: list[int], adapter: str | None, sp: SamplingParams = GREEDY):
    ref = None if adapter is None else AdapterRef.parse(adapter)
    return engine.generate([GenerateRequest(input_ids=tuple(ids), adapter=ref, sampling=sp)])[0]


def test_health_and_model_info(served: Served, tiny_dir: Path) -> None:
    assert served.client.health()
    info = served.client.model_info()
    assert info.model_path == str(tiny_dir) and info.is_generation
    raw = httpx.get(served.url + "/get_model_info").json()
    assert {"model_path", "tokenizer_path", "is_generation", "weight_version"} <= set(raw)
    assert httpx.get(served.url + "/health_generate").status_code == 200
    assert not SGLangClient("http://127.0.0.1:1", timeout=2).health()


def test_native_routes_rl_clients_call(served: Served, tiny_dir: Path) -> None:
    """``/model_info`` and ``/server_info`` (with their ``get_`` forms) and ``/flush_cache``,
    which RL loops call after a weight update, answer as SGLang's do."""
    assert (
        httpx.get(served.url + "/model_info").json()
        == httpx.get(served.url + "/get_model_info").json()
    )
    info = httpx.get(served.url + "/get_server_info").json()
    assert info == httpx.get(served.url + "/server_info").json()
    assert info["model_path"] == str(tiny_dir) and info["enable_lora"] is True
    assert (info["max_loras_per_batch"], info["max_lora_rank"]) == (4, 8)
    assert set(info["lora_target_modules"]) >= {"q_proj", "v_proj"}  # adapter "a" targets these
    assert {"a@1", "b@1"} <= set(info["internal_states"][0]["loaded_lora_adapters"])
    assert info["dtype"] == "float32" and info["device"] == "cpu"
    assert httpx.post(served.url + "/flush_cache").status_code == 200
    assert httpx.get(served.url + "/flush_cache").status_code == 200


def test_max_new_tokens_zero_scores_the_prompt_without_generating(served: Served) -> None:
    ids = served.engine.tokenizer.encode("Hello")
    body = {
        "input_ids": ids,
        "sampling_params": {"max_new_tokens": 0},
        "lora_path": "a@1",
        "return_logprob": True,
        "logprob_start_len": 0,
    }
    response = httpx.post(served.url + "/generate", json=body)
    assert response.status_code == 200, response.text
    out = response.json()
    assert (out["text"], out["output_ids"]) == ("", [])
    meta = out["meta_info"]
    assert meta["finish_reason"] == {"type": "length", "length": 0}
    assert meta["completion_tokens"] == 0 and meta["output_token_logprobs"] == []
    scored = served.engine.prompt_logprobs(
        [GenerateRequest(input_ids=tuple(ids), adapter=AdapterRef.parse("a@1"))]
    )[0]
    assert [lp for lp, _, _ in meta["input_token_logprobs"]] == list(scored)
    assert [tok for _, tok, _ in meta["input_token_logprobs"]] == ids
    # mixed with rows that do generate, in one batch
    mixed = served.engine.generate(
        [
            GenerateRequest(input_ids=tuple(ids), sampling=SamplingParams(max_new_tokens=0)),
            GenerateRequest(input_ids=tuple(ids), sampling=GREEDY),
        ]
    )
    assert mixed[0].completion_ids == () and len(mixed[1].completion_ids) > 0
    assert mixed[1].completion_ids == _direct(served.engine, ids, None).completion_ids


def test_generate_single_text(served: Served) -> None:
    out = served.client.generate(text="Hello", sampling_params=GREEDY, lora_path="a@1", rid="r1")
    assert isinstance(out, GenerateOutput)
    want = _direct(served.engine, served.engine.tokenizer.encode("Hello"), "a@1")
    assert (out.completion_ids, out.text, out.id) == (want.completion_ids, want.text, "r1")
    assert out.prompt_tokens == 5 and out.completion_tokens == len(want.completion_ids)
    assert out.output_token_logprobs is None


def test_generate_batch_input_ids_per_row_lora_and_logprobs(served: Served) -> None:
    prompts = [[40, 41, 42], [50, 51], [60, 61, 62, 63]]
    loras = ["a@1", None, "b@1"]
    raw = httpx.post(
        served.url + "/generate",
        json={
            "input_ids": prompts,
            "sampling_params": GREEDY.to_sglang(),
            "lora_path": loras,
            "return_logprob": True,
        },
    ).json()
    assert isinstance(raw, list) and len(raw) == 3
    for item, ids, lora in zip(raw, prompts, loras, strict=True):
        want = _direct(served.engine, ids, lora)
        meta = item["meta_info"]
        assert item["output_ids"] == list(want.completion_ids)
        assert set(meta) >= {"id", "finish_reason", "prompt_tokens", "completion_tokens"}
        assert meta["finish_reason"]["type"] in ("stop", "length")
        rows = meta["output_token_logprobs"]
        assert [len(r) for r in rows] == [3] * len(want.completion_ids)
        assert [r[1] for r in rows] == list(want.completion_ids)
        assert all(r[2] is None for r in rows)
        assert [r[0] for r in rows] == pytest.approx(list(want.logprobs), abs=1e-5)
    outs = served.client.generate_batch(prompts, GREEDY, lora_path=loras)
    assert [o.completion_ids for o in outs] == [tuple(item["output_ids"]) for item in raw]


def test_generate_per_row_sampling_params_and_text_batch(served: Served) -> None:
    params = [
        SamplingParams(temperature=0, max_new_tokens=3, ignore_eos=True),
        SamplingParams(temperature=0.9, max_new_tokens=5, seed=7, ignore_eos=True),
    ]
    outs = served.client.generate(text=["ab", "cd"], sampling_params=params, lora_path="b@1")
    assert isinstance(outs, list)
    assert [o.completion_tokens for o in outs] == [3, 5]
    assert [o.finish_reason for o in outs] == ["length", "length"]
    want = _direct(served.engine, served.engine.tokenizer.encode("cd"), "b@1", params[1])
    assert (
        outs[1].completion_ids == want.completion_ids
    )  # seeded sampling is reproducible over HTTP


def test_stop_string_reports_matched(served: Served) -> None:
    free = served.client.generate(
        text="stop me",
        sampling_params=SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True),
    )
    assert isinstance(free, GenerateOutput)
    stop = free.text[3:5]
    hit = served.client.generate(
        text="stop me",
        sampling_params={
            "temperature": 0,
            "max_new_tokens": 8,
            "ignore_eos": True,
            "stop": stop,
        },
    )
    assert isinstance(hit, GenerateOutput)
    assert (hit.finish_reason, hit.matched, hit.text) == (
        "stop",
        stop,
        free.text[: free.text.index(stop)],
    )


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"text": "x", "bogus": 1}, "bogus"),
        ({"text": "x", "input_ids": [1]}, "text"),
        ({}, "text"),
        ({"input_ids": [[1], "x"]}, "input_ids[1]"),
        ({"text": "x", "sampling_params": {"temperature": -1}}, "sampling_params.temperature"),
        ({"text": "x", "sampling_params": {"top_k": 1.5}}, "sampling_params.top_k"),
        (
            {"text": "x", "sampling_params": {"frequency_penalty": 0.5}},
            "sampling_params.frequency_penalty",
        ),
        ({"text": "x", "sampling_params": {"colour": 1}}, "sampling_params.colour"),
        ({"text": ["x", "y"], "lora_path": ["a@1"]}, "lora_path"),
        ({"text": "x", "lora_path": "nope@3"}, "lora_path"),
        ({"text": "x", "lora_path": "a@x"}, "lora_path"),
        ({"input_ids": [1, 999]}, "input_ids[0]"),
        ({"text": "x", "stream": True}, "stream"),
        ({"text": "x", "return_logprob": True, "logprob_start_len": 2}, "logprob_start_len"),
    ],
)
def test_generate_400_names_the_field(served: Served, body: dict[str, Any], param: str) -> None:
    response = httpx.post(served.url + "/generate", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param
    assert param.split(".")[-1].split("[")[0] in error["message"]


def test_bad_json_and_unknown_route(served: Served) -> None:
    response = httpx.post(served.url + "/generate", content=b"{not json")
    assert response.status_code == 400 and response.json()["error"]["param"] == "body"
    assert httpx.get(served.url + "/nope").status_code == 404


def test_load_unload_and_their_errors(
    served: Served, adapter_dirs: dict[str, Path], tmp_path: Path
) -> None:
    loaded = served.client.load_lora_adapter("c@1", str(adapter_dirs["c"]))
    assert loaded["c@1"] == str(adapter_dirs["c"])
    out = served.client.generate(input_ids=[7, 8, 9], sampling_params=GREEDY, lora_path="c@1")
    assert isinstance(out, GenerateOutput)
    assert "c@1" not in served.client.unload_lora_adapter("c@1")
    with pytest.raises(SGLangError, match=r"c@1.*not loaded") as err:
        served.client.generate(input_ids=[7, 8, 9], sampling_params=GREEDY, lora_path="c@1")
    assert err.value.status == 400 and err.value.param == "lora_path"
    with pytest.raises(SGLangError, match="not under an allowed root") as err:
        served.client.load_lora_adapter("d@1", str(tmp_path))
    assert err.value.param == "lora_path"
    with pytest.raises(SGLangError, match="not loaded"):
        served.client.unload_lora_adapter("zzz@1")
    bad = httpx.post(served.url + "/load_lora_adapter", json={"lora_path": "/x"})
    assert bad.status_code == 400 and bad.json()["success"] is False
    assert bad.json()["error"]["param"] == "lora_name"


def test_concurrent_clients_are_batched_together(served: Served) -> None:
    # a second front on the same engine, with a batching window wide enough for slow CI hosts
    server = RolloutServer(served.engine, allowed_roots=[], max_wait_s=0.5)
    url = server.start("127.0.0.1", 0)
    prompts = [[20 + i, 30 + i, 40 + i] for i in range(4)]
    loras = ["a@1", "b@1", None, "a@1"]
    wants = [
        _direct(served.engine, p, lo).completion_ids for p, lo in zip(prompts, loras, strict=True)
    ]
    barrier = threading.Barrier(len(prompts))
    got: dict[int, tuple[int, ...]] = {}

    def call(i: int) -> None:
        with SGLangClient(url, timeout=60) as client:
            barrier.wait()
            out = client.generate(input_ids=prompts[i], sampling_params=GREEDY, lora_path=loras[i])
            assert isinstance(out, GenerateOutput)
            got[i] = out.completion_ids

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(prompts))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    finally:
        server.stop()
    assert [got[i] for i in range(len(prompts))] == wants
    batches = list(server.batcher.history)
    assert sum(jobs for jobs, _ in batches) == len(prompts)
    assert max(jobs for jobs, _ in batches) > 1  # requests from different clients shared a batch


def test_client_bodies_use_sglang_field_names(
    served: Served, adapter_dirs: dict[str, Path]
) -> None:
    """What SGLangClient puts on the wire uses only SGLang's documented field names."""
    served.bodies.clear()
    client = served.client
    client.generate(text="hi", sampling_params=GREEDY, lora_path="a@1", rid="x")
    seeded = SamplingParams(
        temperature=0.5,
        top_p=0.9,
        top_k=10,
        max_new_tokens=4,
        seed=7,
        stop=("zz",),
        stop_token_ids=(3,),
        ignore_eos=True,
    )
    client.generate_batch([[5, 6], [7, 8]], [seeded, GREEDY], lora_path=["b@1", None])
    client.generate(input_ids=[5, 6], sampling_params={"temperature": 0, "max_new_tokens": 2})
    client.load_lora_adapter("c@2", str(adapter_dirs["c"]))
    client.unload_lora_adapter("c@2")
    sent = list(served.bodies)
    assert [p for p, _ in sent] == ["/generate"] * 3 + [
        "/load_lora_adapter",
        "/unload_lora_adapter",
    ]
    for path, body in sent:
        if path == "/generate":
            assert set(body) <= SGLANG_GENERATE_FIELDS, body
            samplings = body["sampling_params"]
            for sp in samplings if isinstance(samplings, list) else [samplings]:
                assert set(sp) <= SGLANG_SAMPLING_FIELDS, sp
    assert sent[1][1]["sampling_params"][0] == {
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 10,
        "max_new_tokens": 4,
        "stop": ["zz"],
        "stop_token_ids": [3],
        "ignore_eos": True,
        "sampling_seed": 7,
    }
    assert sent[1][1]["lora_path"] == ["b@1", None] and sent[1][1]["return_logprob"] is True
    assert sent[3][1] == {"lora_name": "c@2", "lora_path": str(adapter_dirs["c"])}
    assert set(sent[3][1]) <= SGLANG_LOAD_FIELDS
    assert sent[4][1] == {"lora_name": "c@2"} and set(sent[4][1]) == SGLANG_UNLOAD_FIELDS


def test_server_config_loads_like_every_process_config(tmp_path: Path) -> None:
    from events.errors import ConfigError
    from rollout.server import ServerConfig, load_config, main

    argv = ["--model", "m", "--allowed-root", "/a", "--allowed-root", "/b", "--max-loras", "3"]
    argv += ["--lora-target-modules", "q_proj", "--lora-target-modules", "v_proj"]
    config = load_config(argv, environ={"MULTILORA_SERVER_PORT": "31000"})
    assert config == ServerConfig(
        model_path="m",
        port=31000,
        max_loras=3,
        allowed_roots=("/a", "/b"),
        lora_target_modules=("q_proj", "v_proj"),
    )
    file = tmp_path / "server.toml"
    file.write_text('model_path = "from-file"\nmax_wait_ms = 2.5\n')
    assert load_config(["--config", str(file)], environ={}).max_wait_ms == 2.5
    with pytest.raises(ConfigError, match="max_loras"):
        load_config(["--model", "m", "--max-loras", "0"], environ={})
    with pytest.raises(ConfigError, match="--model"):
        load_config([], environ={})
    assert main(["--port", "1"]) == 2  # EXIT_CONFIG, before any model is loaded
