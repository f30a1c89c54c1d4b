"""Gateway benchmark: what the Tinker gateway adds on top of the work it hands to the bus.

Runs the real local stack (``multilora up``'s processes with ``--gateway-port``: embedded Redis,
trainer, rollout worker, checkpointer, gateway) and drives it with the official Tinker SDK:

* ``fwdbwd_overhead_p50_ms`` / ``_p99_ms``: per ``forward_backward(...).result()`` call, the
  SDK's wall time minus the trainer's own step time for it (``step_s`` in the result's metrics:
  the mixed step's forward/backward that computed it). What is left is the SDK, HTTP, the
  gateway, the event on the bus, the trainer picking it up, the future record and the SDK's
  polling of ``retrieve_future``. One client, sequential calls, nothing else training.
* ``sample_overhead_p50_ms``: the same for ``sample(...).result()`` against the worker's
  ``generate_s`` (read from the future records in Redis; p50 of the call minus p50 of the
  generation, as the two are not matched call by call).
* ``requests_per_s``: ``--clients`` SDK clients, each with its own model, each sending
  forward-only requests back to back for ``--seconds``; completed requests per second (the
  trainer packs concurrent clients' requests into shared mixed steps).

Usage::

    python bench/gateway.py                  # CPU, tiny random model (~1 min)
    python bench/gateway.py --calls 20 --seconds 5 --out /tmp/gateway.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shlex
import sys
import tempfile
import threading
import time
from pathlib import Path

import msgspec

ROOT = Path(__file__).resolve().parents[1]
# run as a script, sys.path[0] is bench/, where bench/rollout.py would shadow the `rollout` package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

from bench.e2e import free_port, percentile, random_model  # noqa: E402
from events.connection import connect  # noqa: E402
from events.futures import SampleResult  # noqa: E402
from ops.launch import Stack, StackOptions  # noqa: E402

API_KEY = "tml-bench"


def wait_up(base_url: str, stack: Stack, timeout_s: float = 120.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base_url}/api/v1/healthz", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        for name, proc in stack.procs.items():
            if proc.poll() is not None:
                raise SystemExit(f"{name} exited with {proc.returncode}; see {stack.run_dir}/logs")
        time.sleep(0.2)
    raise SystemExit(f"the gateway did not come up in {timeout_s} s")


def datums(types, n: int, length: int) -> list:
    tokens = [(7 * i + 3) % 90 + 5 for i in range(length + 1)]
    return [
        types.Datum(
            model_input=types.ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * length},
        )
        for _ in range(n)
    ]


def measure(base_url: str, args: argparse.Namespace, stack: Stack) -> dict[str, float]:
    import tinker
    from tinker import types

    service = tinker.ServiceClient(base_url=base_url, api_key=API_KEY)
    training = service.create_lora_training_client(base_model="bench-model", rank=8).result()
    data = datums(types, args.datums, args.tokens)
    fwdbwd_ms: list[float] = []
    for i in range(args.warmup + args.calls):
        t0 = time.perf_counter()
        out = training.forward_backward(data, "cross_entropy").result()
        wall = time.perf_counter() - t0
        if i >= args.warmup:
            fwdbwd_ms.append(1000 * (wall - out.metrics["step_s:mean"]))
    training.optim_step(types.AdamParams(learning_rate=1e-4)).result()
    sampler = training.save_weights_and_get_sampling_client().result()
    params = types.SamplingParams(max_tokens=args.sample_tokens, temperature=1.0)
    prompt = types.ModelInput.from_ints([5, 6, 7, 8])
    sample_ms: list[float] = []
    for i in range(args.warmup + args.calls):
        t0 = time.perf_counter()
        sampler.sample(prompt, 4, params).result()
        if i >= args.warmup:
            sample_ms.append(1000 * (time.perf_counter() - t0))
    generate_ms = generate_times_ms(stack)[-args.calls :]
    rps = throughput(base_url, args)
    service.close("success").result()
    return {
        "fwdbwd_overhead_p50_ms": percentile(fwdbwd_ms, 50),
        "fwdbwd_overhead_p99_ms": percentile(fwdbwd_ms, 99),
        "sample_overhead_p50_ms": percentile(sample_ms, 50) - percentile(generate_ms, 50),
        "sample_p50_ms": percentile(sample_ms, 50),
        "sample_generate_p50_ms": percentile(generate_ms, 50),
        "requests_per_s": rps,
        "fwdbwd_calls": float(len(fwdbwd_ms)),
    }


def generate_times_ms(stack: Stack) -> list[float]:
    """``generate_s`` of every answered sample future, oldest first."""
    client = connect(stack.url)
    records = []
    for key in client.scan_iter(match=stack.streams.future("*"), count=500):
        fields = client.hgetall(key)
        if fields.get(b"kind") == b"sample" and fields.get(b"result"):
            result = msgspec.json.decode(fields[b"result"], type=SampleResult)
            records.append((float(fields.get(b"created", b"0")), 1000 * result.generate_s))
    client.close()
    return [ms for _, ms in sorted(records)]


def throughput(base_url: str, args: argparse.Namespace) -> float:
    """Forward-only requests per second over ``--clients`` concurrent SDK clients."""
    import tinker
    from tinker import types

    data = datums(types, 1, args.tokens)
    clients = [
        tinker.ServiceClient(base_url=base_url, api_key=API_KEY) for _ in range(args.clients)
    ]
    models = [
        c.create_lora_training_client(base_model="bench-model", rank=8).result() for c in clients
    ]
    done = [0] * len(models)
    stop = time.monotonic() + args.seconds

    def run(i: int) -> None:
        while time.monotonic() < stop:
            models[i].forward(data, "cross_entropy").result()
            done[i] += 1

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(models))]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    for c in clients:
        c.close("success").result()
    return sum(done) / elapsed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/gateway.py", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--calls", type=int, default=40, help="timed calls per kind")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--datums", type=int, default=4, help="datums per forward_backward")
    p.add_argument("--tokens", type=int, default=32, help="tokens per datum")
    p.add_argument("--sample-tokens", type=int, default=8)
    p.add_argument("--clients", type=int, default=3, help="concurrent clients (throughput)")
    p.add_argument("--seconds", type=float, default=10.0, help="throughput window")
    p.add_argument("--out", default="bench/results/gateway.json")
    args = p.parse_args(argv)
    import tinker

    run_dir = Path(tempfile.mkdtemp(prefix="multilora-gateway-"))
    model = random_model(run_dir / "bench-model", 64, 2)
    port = free_port()
    device = ["--device", args.device]
    options = StackOptions(
        model=str(model),
        workers=1,
        num_slots=args.clients + 1,
        max_rank=8,
        run_dir=str(run_dir / "stack"),
        namespace="bench",
        max_batch_wait_s=0.0,
        torch_threads=1 if args.device == "cpu" else 0,
        redis_port=0,
        metrics_port_base=0,
        gateway_port=port,
        extra_args={
            "trainer": device,
            "rollout": device,
            "gateway": ["--api-key", f"{API_KEY}=bench"],
        },
    )
    with Stack(options) as stack:
        base_url = f"http://127.0.0.1:{port}"
        wait_up(base_url, stack)
        result = measure(base_url, args, stack)
    out = {
        **result,
        "sdk_version": tinker.__version__,
        "device": args.device,
        "machine": f"{platform.node()} ({platform.processor() or platform.machine()})",
        "date": dt.date.today().isoformat(),
        "command": "python "
        + " ".join(shlex.quote(a) for a in ["bench/gateway.py", *sys.argv[1:]]),
    }
    print(f"{'metric':<28} {'value':>10}")
    for key, value in result.items():
        print(f"{key:<28} {value:>10.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out} (tinker SDK {out['sdk_version']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
