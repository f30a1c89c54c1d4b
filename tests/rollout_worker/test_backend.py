"""Both generation backends: the same rows give the same completions in-process and over HTTP."""

from __future__ import annotations

import math

import pytest

from rollout.adapter_slots import AdapterRef
from rollout.backend import (
    AdapterLoadError,
    BackendUnavailableError,
    EmbeddedBackend,
    GenerationRow,
    HttpBackend,
    RowRefusedError,
)
from rollout.client import SGLangClient
from rollout.engine import Engine
from rollout.sampling import SamplingParams
from rollout.server import RolloutServer


@pytest.fixture
def engines(tiny_dir):
    def build() -> Engine:
        return Engine.from_pretrained(tiny_dir, max_loras=4, max_lora_rank=8, keep_versions=2)

    return build


@pytest.fixture
def http_backend(engines, artifacts, tiny_dir):
    server = RolloutServer(engines(), allowed_roots=[artifacts])
    url = server.start()
    client = SGLangClient(url, timeout=60)
    yield HttpBackend(client, server.engine.tokenizer, keep_versions=2)
    client.close()
    server.stop()


def rows(tokenizer, version: int) -> list[GenerationRow]:
    ref = AdapterRef("math.r1", version)
    prompts = ["1+2=", "a longer prompt here"]
    return [
        GenerationRow(
            prompt_ids=tuple(tokenizer(p)["input_ids"]),
            adapter=ref if i % 2 == 0 else None,  # mixed: adapter rows and base rows
            sampling=SamplingParams(temperature=1.0, max_new_tokens=6, seed=100 + i),
        )
        for i, p in enumerate(prompts * 2)
    ]


def test_embedded_and_http_backends_agree(engines, http_backend, versions) -> None:
    embedded = EmbeddedBackend(engines())
    for backend in (embedded, http_backend):
        backend.load("math.r1", 1, str(versions[1]))
        backend.load("math.r1", 1, str(versions[1]))  # idempotent
        assert backend.versions("math.r1") == (1,)
    local = embedded.generate(rows(embedded.tokenizer, 1))
    remote = http_backend.generate(rows(embedded.tokenizer, 1))
    assert [c.completion_ids for c in local] == [c.completion_ids for c in remote]
    assert [c.text for c in local] == [c.text for c in remote]
    assert [c.finish_reason for c in local] == [c.finish_reason for c in remote]
    for a, b in zip(local, remote, strict=True):
        assert len(a.logprobs) == len(a.completion_ids)
        pairs = zip(a.logprobs, b.logprobs, strict=True)
        assert all(math.isclose(x, y, abs_tol=1e-5) for x, y in pairs)


def test_backends_keep_the_newest_versions_and_unload(engines, http_backend, versions) -> None:
    for backend in (EmbeddedBackend(engines()), http_backend):
        for v in (0, 1, 2):
            backend.load("math.r1", v, str(versions[v]))
        assert backend.versions("math.r1") == (1, 2)  # keep_versions=2
        backend.unload("math.r1")
        backend.unload("math.r1")  # nothing left: a no-op
        assert backend.versions("math.r1") == ()
        with pytest.raises(BackendUnavailableError):  # evicted under the worker: retry later
            backend.generate(rows(backend.tokenizer, 2))


def test_backends_reject_bad_adapter_dirs(engines, http_backend, artifacts) -> None:
    bad = artifacts / "empty"
    bad.mkdir(exist_ok=True)
    for backend in (EmbeddedBackend(engines()), http_backend):
        with pytest.raises(AdapterLoadError, match=r"math\.r1@3"):
            backend.load("math.r1", 3, str(bad))
        assert backend.versions("math.r1") == ()


def test_http_backend_reports_an_unreachable_server(tiny_dir) -> None:
    backend = HttpBackend(SGLangClient("http://127.0.0.1:9", timeout=2), tokenizer=None)
    with pytest.raises(BackendUnavailableError):
        backend.load("math.r1", 0, "/nowhere")


def test_embedded_and_http_backends_score_prompts_alike(engines, http_backend, versions) -> None:
    """HTTP: SGLang's ``input_token_logprobs`` (``logprob_start_len=0``) of the embedded server."""
    embedded = EmbeddedBackend(engines())
    prompt = tuple(embedded.tokenizer("score this prompt")["input_ids"])
    for backend in (embedded, http_backend):
        backend.load("math.r1", 1, str(versions[1]))
    for adapter in (AdapterRef("math.r1", 1), None):
        local = embedded.prompt_logprobs(prompt, adapter)
        remote = http_backend.prompt_logprobs(prompt, adapter)
        assert local[0] is None and remote[0] is None and len(local) == len(remote) == len(prompt)
        pairs = zip(local[1:], remote[1:], strict=True)
        assert all(math.isclose(x, y, abs_tol=1e-5) for x, y in pairs)
    with pytest.raises(RowRefusedError):  # a token id outside the vocabulary
        http_backend.prompt_logprobs((1, 10**6), None)
    with pytest.raises(RowRefusedError):
        embedded.prompt_logprobs((1, 10**6), None)
