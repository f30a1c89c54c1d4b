"""Bring-your-own-loop tenants end to end: the official Tinker SDK, unmodified, drives the
gateway of a live local stack (``multilora up``'s processes: trainer, rollout worker, checkpoint,
gateway, embedded Redis) on the tiny learnable model.

- A GRPO loop written only against the SDK (:mod:`tests.e2e.tinker_loop`) learns its synthetic
  task while a dataset-driven adapter trains in the same trainer, and the step metrics show
  both in the same mixed steps.
- ``kill -9`` of the gateway between ``forward_backward`` and its result: a new gateway answers
  the future. ``kill -9`` of the trainer mid-request: the request completes, exactly once.
- More clients than slots: the extra one waits (its ``create_lora_training_client`` resolves
  when a slot frees), then trains; nobody gets "no free slots".
"""

from __future__ import annotations

import collections
import socket
import threading
import time

import pytest

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402

from events.schema import Admitted, StepDone  # noqa: E402
from tests.e2e.harness import LiveStack  # noqa: E402
from tests.e2e.specs import adapter_spec, char_reward  # noqa: E402
from tests.e2e.tinker_loop import datum, rl_loop, token_reward  # noqa: E402

pytestmark = [pytest.mark.bus]

API_KEY = "tml-e2e-key"
PROMPTS = [[40, 30], [41, 30], [42, 30], [43, 30]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(live_stack, **overrides) -> tuple[LiveStack, str]:
    port = free_port()
    live = live_stack(gateway_port=port, **overrides)
    base_url = f"http://127.0.0.1:{port}"
    live.wait_for("the gateway", lambda: _up(base_url), timeout_s=60)
    return live, base_url


def _up(base_url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{base_url}/api/v1/healthz", timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


def service(base_url: str) -> tinker.ServiceClient:
    return tinker.ServiceClient(base_url=base_url, api_key=API_KEY)


def likely_token(sampler: tinker.SamplingClient) -> int:
    """The completion token the base model samples most often (it has mass: GRPO has signal)."""
    params = types.SamplingParams(max_tokens=6, temperature=1.0)
    counts: collections.Counter[int] = collections.Counter()
    for p in PROMPTS:
        for s in sampler.sample(types.ModelInput.from_ints(p), 8, params).result().sequences:
            counts.update(s.tokens)
    return counts.most_common(1)[0][0]


@pytest.fixture
def logs_on_failure():
    """Print the stack's log tails at teardown (pytest shows them when the test failed: the
    SDK's exceptions do not carry the processes' side of the story)."""
    holder: list[LiveStack] = []
    yield holder
    if holder:
        print(holder[0].log_tails(6000))


# lr 1e-2 with the gradient clipped at 1: at 3e-2 without clipping, one CI run of five
# collapsed its policy away from the target within a step after reaching 0.67; at 1e-2 / clip 1,
# five of five runs reached >= 0.95 by the sixth iteration
def test_sdk_grpo_loop_learns_beside_a_dataset_adapter(
    live_stack, data_dir, logs_on_failure
) -> None:
    live, base_url = start(live_stack, extra_args=_extra(data_dir))
    logs_on_failure.append(live)
    registration = live.register("letters", adapter_spec(data_dir, char_reward("e"), steps=150))
    client = service(base_url)
    training = client.create_lora_training_client(base_model="tiny-llama", rank=8, seed=1)
    training = training.result() if hasattr(training, "result") else training
    target = likely_token(training.save_weights_and_get_sampling_client().result())
    log = rl_loop(training, PROMPTS, token_reward(target), iterations=16, learning_rate=1e-2)
    first, last = sum(log.rewards[:3]) / 3, sum(log.rewards[-3:]) / 3
    print("rewards", [round(r, 3) for r in log.rewards])
    assert last > first + 0.15, log.rewards
    # the client's forward/backwards shared mixed steps with the dataset-driven adapter
    dataset_steps = {int(e.metrics["mixed_step"]) for e in live.events(StepDone, registration)}
    shared = [
        m
        for m in log.fwdbwd_metrics
        if m["mixed_adapters:mean"] >= 2 and int(m["mixed_step:mean"]) in dataset_steps
    ]
    assert shared, (log.fwdbwd_metrics, sorted(dataset_steps))
    # a new client from the saved state (create_training_client_from_state_with_optimizer)
    # computes what the original does
    path = training.save_state("end").result(timeout=120).path
    resumed = client.create_training_client_from_state_with_optimizer(path).result(timeout=120)
    probe = [datum(PROMPTS[0], [target, target], [-1.0, -1.0], 1.0)]

    def logprobs(tc: tinker.TrainingClient) -> list[float]:
        out = tc.forward(probe, "importance_sampling").result(timeout=120)
        return list(out.loss_fn_outputs[0]["logprobs"].tolist())

    assert logprobs(resumed) == pytest.approx(logprobs(training), abs=1e-6)
    client.close("success").result()


def _extra(data_dir) -> dict[str, tuple[str, ...]]:
    from tests.e2e.harness import CHAR_REWARD

    return {
        "trainer": ("--extra-reward", CHAR_REWARD, "--allowed-root", str(data_dir)),
        "rollout": (
            "--reward",
            f"{CHAR_REWARD}=tests.e2e.rewards:char_fraction",
            "--allowed-root",
            str(data_dir),
            "--block-ms",
            "500",
        ),
        "gateway": ("--api-key", f"{API_KEY}=team-a", "--session-lease-s", "30"),
    }


def _wait_requests(live: LiveStack, count: int) -> None:
    live.wait_for(
        f"{count} requests on the bus",
        lambda: live.client.xlen(live.streams.requests) >= count,
        timeout_s=30,
    )


def test_kills_lose_no_request_and_extra_clients_wait(
    live_stack, data_dir, logs_on_failure
) -> None:
    live, base_url = start(live_stack, num_slots=1, extra_args=_extra(data_dir))
    logs_on_failure.append(live)
    client = service(base_url)
    training = client.create_lora_training_client(base_model="tiny-llama", rank=4, seed=2)
    training = training.result() if hasattr(training, "result") else training
    data = [datum([40, 30], [50, 51, 52], [-1.0, -1.0, -1.0], 1.0)]

    # kill -9 of the gateway between forward_backward and its result
    first = training.forward_backward(data, "importance_sampling")
    _wait_requests(live, 1)
    live.kill("gateway")
    live.restart("gateway")
    live.wait_for("the gateway again", lambda: _up(base_url), timeout_s=60)
    assert len(first.result(timeout=120).loss_fn_outputs) == 1

    # kill -9 of the trainer mid-request
    second = training.forward_backward(data, "importance_sampling")
    _wait_requests(live, 2)
    live.kill("trainer")
    live.restart("trainer")
    assert len(second.result(timeout=180).loss_fn_outputs) == 1
    step = training.optim_step(types.AdamParams(learning_rate=1e-2)).result(timeout=120)
    assert step is not None
    name = training.model_id
    steps = [e.step for e in live.events(StepDone) if e.adapter == name]
    assert steps == [1], steps  # one update, applied once, across both kills

    # save_state → one more update → load_state_with_optimizer → the same update again: the
    # client continues exactly (the checkpoint process holds the state; the logprobs agree)
    def logprobs() -> list[float]:
        out = training.forward(data, "importance_sampling").result(timeout=120)
        return list(out.loss_fn_outputs[0]["logprobs"].tolist())

    def update() -> None:
        training.forward_backward(data, "importance_sampling").result(timeout=120)
        training.optim_step(types.AdamParams(learning_rate=1e-2)).result(timeout=120)

    path = training.save_state("ckpt").result(timeout=120).path
    saved = logprobs()
    update()
    after = logprobs()
    assert after != saved
    training.load_state_with_optimizer(path).result(timeout=120)
    assert logprobs() == pytest.approx(saved, abs=1e-6)
    update()
    assert logprobs() == pytest.approx(after, abs=1e-6)

    # a second client while the only slot is taken: it waits, then trains
    other = service(base_url)
    got: list = []

    def create() -> None:
        future = other.create_lora_training_client(base_model="tiny-llama", rank=4, seed=3)
        got.append(future.result() if hasattr(future, "result") else future)

    waiter = threading.Thread(target=create, daemon=True)
    waiter.start()
    time.sleep(3.0)
    assert not got  # queued, not refused
    client.close("success").result()  # the first session ends: its model is released
    waiter.join(timeout=120)
    assert got, "the waiting client never got a slot"
    out = got[0].forward_backward(data, "importance_sampling").result(timeout=120)
    assert len(out.loss_fn_outputs) == 1
    admitted = [e for e in live.events(Admitted) if e.adapter == got[0].model_id]
    assert admitted
    other.close("success").result()
