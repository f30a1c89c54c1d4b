"""Client sampling (``rollout.sample``) on the rollout worker: futures answered with the ack.

State-machine tests on the fake backend and a real bus; the numerics (prompt log-probs and
sampled log-probs against a teacher-forced forward of the tiny model, with and without an
adapter) on the embedded engine at the end.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import msgspec
import pytest
import torch

from events import futures
from events.codec import new_id
from events.futures import SampleResult
from events.schema import Failed, Retired, SampleTask
from events.specs import SamplingSpec
from rollout.client_sampling import sampling_name
from rollout.groups import served_name
from rollout.worker import TASK_GROUP
from tests.rollout_worker.fakes import BOS, EOS, write_fake_version
from tests.rollout_worker.helpers import (
    admitted,
    publish,
    read_groups,
    registered,
    run_burst,
    sync,
    task,
)

pytestmark = pytest.mark.bus
NAME = served_name("math", "r1")
PROMPT = (BOS, *b"1+2=")


def sample(weights: Path | None = None, *, version: int = 0, **kw) -> SampleTask:
    """A sample request of adapter ``math`` (registration ``r1``) at ``weights`` (None: base)."""
    kw.setdefault("prompt_ids", PROMPT)
    kw.setdefault("sampling", SamplingSpec(temperature=1.0, max_new_tokens=8))
    kw.setdefault("request_id", new_id())
    kw.setdefault("id", new_id())
    if weights is None:
        kw.setdefault("adapter", "")
        kw.setdefault("registration_id", "")
    return SampleTask(
        adapter=kw.pop("adapter", "math"),
        registration_id=kw.pop("registration_id", "r1"),
        version=version,
        weights_uri="" if weights is None else str(weights),
        **kw,
    )


def submit(rclient, streams, *tasks: SampleTask) -> None:
    """What the gateway does: a pending future per request, then the task on the queue."""
    for t in tasks:
        rclient.hset(streams.future(t.request_id), mapping={"state": "pending", "kind": "sample"})
    publish(rclient, streams.tasks, *tasks)


def serve(redis_url, streams, rclient, worker, *tasks: SampleTask):
    """The control log first (the worker's view of the registrations), then ``tasks``.

    (One burst over both would race them: the two streams are read independently.)
    """
    run_burst(redis_url, streams, worker)
    submit(rclient, streams, *tasks)
    return run_burst(redis_url, streams, worker)


def answer(rclient, streams, request_id: str) -> SampleResult:
    record = futures.read(rclient, streams, request_id)
    assert record is not None and record.state == "done", record
    return msgspec.json.decode(record.result, type=SampleResult)


def failure(rclient, streams, request_id: str) -> str:
    """The error a failed future carries (category ``user``).

    Its ``state`` is checked in :func:`test_a_failed_request_reads_back_failed` alone: see there.
    """
    record = futures.read(rclient, streams, request_id)
    assert record is not None and record.result == b"" and record.category == "user", record
    assert record.error
    return record.error


def live(rclient, streams) -> None:
    publish(rclient, streams.control, registered("math", "r1"), admitted("math", "r1"))


def test_a_base_model_sample_answers_its_future(make_fake_worker, redis_url, streams, rclient):
    worker = make_fake_worker("w1")
    req = sample(num_samples=3, seed=5)
    submit(rclient, streams, req)
    run_burst(redis_url, streams, worker)
    result = answer(rclient, streams, req.request_id)
    assert len(result.sequences) == 3 and result.prompt_logprobs is None
    for seq in result.sequences:
        assert len(seq.logprobs) == len(seq.tokens) >= 1
        assert seq.stop_reason == ("stop" if seq.tokens[-1] == EOS else "length")
    assert worker.backend.batches == [3]  # every sample in one batch
    assert worker.backend.calls == []  # no adapter was loaded
    assert read_groups(rclient, streams) == []  # no rollout group, no reward
    assert rclient.xpending(streams.tasks, TASK_GROUP)["pending"] == 0


def test_an_adapter_version_is_loaded_by_uri_and_cached_like_any_other(
    make_fake_worker, fake_versions, redis_url, streams, rclient
):
    worker = make_fake_worker("w1")
    live(rclient, streams)
    first, again = sample(fake_versions[1], version=1), sample(fake_versions[1], version=1)
    base = sample(seed=first.seed)
    serve(redis_url, streams, rclient, worker, first, again, base)
    assert worker.backend.calls == [("load", NAME, 1)]  # loaded once, under the served name
    tuned = answer(rclient, streams, first.request_id)
    assert tuned.sequences == answer(rclient, streams, again.request_id).sequences
    # the adapter changes samples
    assert tuned.sequences != answer(rclient, streams, base.request_id).sequences
    # a rollout task at that version finds it served: no second load
    publish(rclient, streams.tasks, task("math", "r1", fake_versions[1], version=1, epoch=1))
    run_burst(redis_url, streams, worker)
    assert worker.backend.calls == [("load", NAME, 1)]
    (group,) = read_groups(rclient, streams)
    assert group.version == 1


def test_prompt_logprobs_for_compute_logprobs(make_fake_worker, redis_url, streams, rclient):
    worker = make_fake_worker("w1")
    spec = SamplingSpec(temperature=1.0, max_new_tokens=1)  # the SDK's compute_logprobs
    req = sample(num_samples=2, sampling=spec, prompt_logprobs=True)
    submit(rclient, streams, req)
    run_burst(redis_url, streams, worker)
    result = answer(rclient, streams, req.request_id)
    assert [len(s.tokens) for s in result.sequences] == [1, 1]
    assert result.prompt_logprobs is not None and len(result.prompt_logprobs) == len(PROMPT)
    assert result.prompt_logprobs[0] is None
    assert all(lp is not None and lp < 0 for lp in result.prompt_logprobs[1:])
    assert worker.backend.scored == [PROMPT]  # scored once, not once per sample


def test_samples_are_reproducible_per_seed(
    make_fake_worker, fake_versions, redis_url, streams, rclient
):
    live(rclient, streams)
    req = sample(fake_versions[0], num_samples=4, seed=11)
    other_seed = sample(fake_versions[0], num_samples=4, seed=12)
    submit(rclient, streams, req, other_seed)
    run_burst(redis_url, streams, make_fake_worker("w1"))
    seqs = answer(rclient, streams, req.request_id).sequences
    assert len({s.tokens for s in seqs}) > 1  # each sample has its own seed
    assert seqs != answer(rclient, streams, other_seed.request_id).sequences
    # the same request on another worker with the same weights gives the same samples
    effects = make_fake_worker("w2").on_sample(msgspec.structs.replace(req, request_id="x"))
    (hsetnx,) = [c for c in effects.commands if c[0] == "HSETNX"]
    assert msgspec.json.decode(hsetnx[3], type=SampleResult).sequences == seqs


def test_bad_input_fails_the_future_not_the_worker(
    make_fake_worker, fake_versions, tmp_path, redis_url, streams, rclient
):
    worker = make_fake_worker("w1")  # max_prompt_tokens=256
    live(rclient, streams)
    bad = {
        "max_prompt_tokens=256": sample(prompt_ids=(65,) * 300),
        "token ids must be in [0, 258)": sample(prompt_ids=(BOS, 999)),
        "token ids must be >= 0": sample(prompt_ids=(BOS, -1)),
        "not found": sample(tmp_path / "never-published", version=1),
        "needs the adapter": sample(fake_versions[0], adapter="", registration_id=""),
        "cannot load": sample(tmp_path, version=2),  # a directory, not a PEFT adapter
    }
    (tmp_path / "adapter_model.safetensors").write_bytes(b"not a PEFT dir: no config")
    good = sample(fake_versions[0])
    stats = serve(redis_url, streams, rclient, worker, *bad.values(), good).stats
    assert stats.handled == len(bad) + 1 and stats.dead_lettered == 0
    for needle, req in bad.items():
        assert needle in failure(rclient, streams, req.request_id)
    assert answer(rclient, streams, good.request_id).sequences  # the worker went on
    assert rclient.xpending(streams.tasks, TASK_GROUP)["pending"] == 0


def test_an_old_version_leaves_the_versions_rollouts_use_alone(
    make_fake_worker, fake_versions, redis_url, streams, rclient
):
    worker = make_fake_worker("w1")  # the fake keeps the newest 2 versions per name
    live(rclient, streams)
    publish(
        rclient,
        streams.control,
        sync("math", "r1", 1, fake_versions[1], epoch=1),
        sync("math", "r1", 2, fake_versions[2], epoch=1),
    )
    old = sample(fake_versions[0], version=0)
    serve(redis_url, streams, rclient, worker, old)
    assert answer(rclient, streams, old.request_id).sequences
    assert worker.backend.versions(NAME) == (1, 2)  # untouched
    assert worker.backend.versions(sampling_name(NAME, 0)) == (0,)
    # the registration ends: its sampling-only versions go with the others
    publish(
        rclient,
        streams.control,
        Failed(adapter="math", registration_id="r1", epoch=1, reason="test"),
        Retired(adapter="math", registration_id="r1", epoch=1, slot=0),
    )
    run_burst(redis_url, streams, worker)
    assert worker.backend.versions(NAME) == ()
    assert worker.backend.versions(sampling_name(NAME, 0)) == ()


def test_an_ended_registration_is_sampled_while_its_weights_last(
    make_fake_worker, fake_versions, tmp_path, redis_url, streams, rclient
):
    worker = make_fake_worker("w1")
    live(rclient, streams)
    publish(
        rclient,
        streams.control,
        Failed(adapter="math", registration_id="r1", epoch=1, reason="test"),
        Retired(adapter="math", registration_id="r1", epoch=1, slot=0),
    )
    kept = sample(fake_versions[1], version=1)  # not fenced: the saved version still loads
    gone = sample(tmp_path / "deleted", version=2)
    serve(redis_url, streams, rclient, worker, kept, gone)
    assert answer(rclient, streams, kept.request_id).sequences
    assert worker.backend.versions(NAME) == ()  # never under the ended registration's name
    error = failure(rclient, streams, gone.request_id)
    assert "registration 'r1' has ended (retired)" in error and "cannot be loaded" in error


def test_the_checksum_of_the_sync_is_checked(
    make_fake_worker, fake_versions, redis_url, streams, rclient
):
    worker = make_fake_worker("w1", history_until="9999999999999-0")  # syncs recorded only
    live(rclient, streams)
    publish(
        rclient, streams.control, sync("math", "r1", 1, fake_versions[1], epoch=1, sha256="0" * 64)
    )
    req = sample(fake_versions[1], version=1)
    serve(redis_url, streams, rclient, worker, req)
    assert "sha256" in failure(rclient, streams, req.request_id)
    assert worker.backend.calls == []


def test_a_failed_request_reads_back_failed(make_fake_worker, redis_url, streams, rclient):
    req = sample(prompt_ids=(BOS, 999))
    submit(rclient, streams, req)
    run_burst(redis_url, streams, make_fake_worker("w1"))
    record = futures.read(rclient, streams, req.request_id)
    assert record is not None and record.state == "failed"


def test_a_redone_request_never_replaces_the_first_answer(
    make_fake_worker, tmp_path, redis_url, streams, rclient
):
    weights = write_fake_version(tmp_path / "v1", seed=1)
    live(rclient, streams)
    req = sample(weights, version=1, num_samples=2, prompt_logprobs=True)
    submit(rclient, streams, req)
    # worker w1 reads the task and dies before its commit: the entry stays pending for it
    rclient.xgroup_create(streams.tasks, TASK_GROUP, id="0", mkstream=True)
    assert rclient.xreadgroup(TASK_GROUP, "w1", {streams.tasks: ">"}, count=1)
    time.sleep(0.1)
    run_burst(redis_url, streams, make_fake_worker("w2"), claim_idle_ms=50)  # reclaims it
    first = futures.read(rclient, streams, req.request_id)
    assert first is not None and first.state == "done"
    assert rclient.xpending(streams.tasks, TASK_GROUP)["pending"] == 0
    # the same request served again (a gateway's retried XADD) after the version's files were
    # rewritten: the redo computes another answer, and the first one stays
    shutil.rmtree(weights)
    write_fake_version(weights, seed=2)
    redo = make_fake_worker("w3")
    (hsetnx,) = [c for c in redo.on_sample(req).commands if c[0] == "HSETNX"]
    assert hsetnx[3].encode() != first.result
    publish(rclient, streams.tasks, msgspec.structs.replace(req, id=new_id()))
    run_burst(redis_url, streams, redo)
    assert futures.read(rclient, streams, req.request_id) == first
    # nor does a failure of a redo turn the answer into a failure
    publish(
        rclient,
        streams.tasks,
        msgspec.structs.replace(req, id=new_id(), weights_uri=str(tmp_path / "gone")),
    )
    run_burst(redis_url, streams, make_fake_worker("w4"))
    after = futures.read(rclient, streams, req.request_id)
    assert after is not None and (after.state, after.result) == ("done", first.result)


# --- numerics on the embedded engine ----------------------------------------------------------


def teacher_forced(model, ids: tuple[int, ...]) -> torch.Tensor:
    """``log_softmax(logits)`` of one teacher-forced forward: row ``t`` predicts ``ids[t + 1]``."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def test_embedded_prompt_and_sample_logprobs_equal_a_teacher_forced_forward(
    make_worker, tiny_dir, versions, redis_url, streams, rclient
):
    """Prompt log-probs at T=1 and sampled-token log-probs at T, with and without the adapter,
    equal those of the plain HF model (and PEFT's model of the version) on prompt + tokens."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    worker = make_worker("w1")
    live(rclient, streams)
    prompt = tuple(worker.backend.tokenizer("1+2=")["input_ids"])
    spec = SamplingSpec(temperature=0.8, max_new_tokens=4)
    tuned = sample(versions[1], version=1, prompt_ids=prompt, num_samples=2, sampling=spec)
    tuned = msgspec.structs.replace(tuned, prompt_logprobs=True, seed=3)
    base = msgspec.structs.replace(tuned, adapter="", registration_id="", weights_uri="")
    base = msgspec.structs.replace(base, request_id=new_id(), id=new_id())
    serve(redis_url, streams, rclient, worker, tuned, base)
    hf = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    models = {
        tuned.request_id: PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tiny_dir), str(versions[1])
        ).eval(),
        base.request_id: hf,
    }
    results = {rid: answer(rclient, streams, rid) for rid in models}
    assert results[tuned.request_id] != results[base.request_id]
    for rid, model in models.items():
        result = results[rid]
        want = teacher_forced(model, prompt)[:-1].gather(-1, torch.tensor(prompt[1:])[:, None])
        assert result.prompt_logprobs is not None and result.prompt_logprobs[0] is None
        got = torch.tensor(result.prompt_logprobs[1:])
        torch.testing.assert_close(got, want[:, 0], rtol=0, atol=1e-5)
        for seq in result.sequences:  # log_softmax(logits / T) of the sampled tokens
            with torch.no_grad():
                logits = model(torch.tensor([prompt + seq.tokens])).logits[0].float()
            at_t = torch.log_softmax(logits[len(prompt) - 1 : -1] / 0.8, dim=-1)
            want_seq = at_t.gather(-1, torch.tensor(seq.tokens)[:, None])[:, 0]
            torch.testing.assert_close(torch.tensor(seq.logprobs), want_seq, rtol=0, atol=1e-5)
