"""The static decoder (preallocated cache, the step CUDA graphs capture) against the eager loop.

On CPU the static step runs eagerly in fp32: every row's tokens equal the eager Hugging Face
loop's and the log-probs agree to float rounding, for Llama, Qwen2 and Qwen3 shapes, mixed
adapters and base rows, sampled and greedy rows, top-k / top-p, stops and lengths. The ``gpu``
tests repeat it on CUDA with the graphs captured, across adapter loads between batches.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from ops.models import write_tiny_model
from rollout.adapter_slots import AdapterRef, EngineError
from rollout.engine import Engine, GenerateRequest, GenerateResult
from rollout.graph_decode import (
    row_bucket,
    sampling_mode,
    slot_bucket,
    unsupported_reason,
)
from rollout.lora import BASE_SLOT
from rollout.sampling import SamplingParams, sample_tokens_B, sample_tokens_static_B
from tests.rollout_engine.conftest import ALL_LINEARS, write_peft_adapter


def _requests(with_adapters: bool) -> list[GenerateRequest]:
    prompts = [(5, 6, 7), (9, 10, 11, 12, 13, 14), (20,), (5, 6, 7), (31, 32, 33, 34)]
    sampling = [
        SamplingParams(temperature=1.0, max_new_tokens=12, seed=1, ignore_eos=True),
        SamplingParams(temperature=0.0, max_new_tokens=9, ignore_eos=True),
        SamplingParams(temperature=0.8, top_k=5, max_new_tokens=20, seed=3),
        SamplingParams(temperature=1.0, max_new_tokens=12, seed=4, ignore_eos=True),
        SamplingParams(temperature=1.2, top_p=0.7, max_new_tokens=7, seed=5, stop_token_ids=(3,)),
    ]
    adapters: list[AdapterRef | None] = [None] * 5
    if with_adapters:
        adapters = [AdapterRef("a", 1), AdapterRef("b", 1), None, AdapterRef("a", 1), None]
    return [
        GenerateRequest(input_ids=p, adapter=a, sampling=s)
        for p, a, s in zip(prompts, adapters, sampling, strict=True)
    ]


def _assert_same(got: list[GenerateResult], want: list[GenerateResult], tol: float = 1e-4) -> None:
    for b, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.completion_ids == w.completion_ids, f"row {b}"
        assert g.finish_reason == w.finish_reason, f"row {b}"
        assert g.matched == w.matched
        assert torch.allclose(torch.tensor(g.logprobs), torch.tensor(w.logprobs), atol=tol), b


def _record(
    monkeypatch: pytest.MonkeyPatch, obj: object, name: str, calls: list[tuple[str, Any]]
) -> None:
    """Log ``(name, first argument)`` of every call of ``obj.name``, then make the call."""
    real = getattr(obj, name)

    def spy(first: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append((name, tuple(first) if isinstance(first, Sequence) else first))
        return real(first, *args, **kwargs)

    monkeypatch.setattr(obj, name, spy)


def _engines(model_dir: Path, adapters: dict[str, Path], **kwargs: object) -> list[Engine]:
    engines = []
    for decoder in ("hf", "static"):
        engine = Engine.from_pretrained(
            model_dir,
            max_loras=4,
            max_lora_rank=8,
            decoder=decoder,
            **kwargs,  # type: ignore[arg-type]
        )
        for name, path in adapters.items():
            engine.load_adapter(name, 1, path)
        engines.append(engine)
    return engines


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def family_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp(request.param) / "m", request.param)


@pytest.fixture(scope="module")
def family_adapters(family_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ad")
    return {
        "a": write_peft_adapter(family_dir, root / "a", rank=4, alpha=8, targets=ALL_LINEARS),
        "b": write_peft_adapter(
            family_dir, root / "b", rank=8, alpha=16, targets=["q_proj", "down_proj"], seed=2
        ),
    }


def test_static_decode_equals_the_eager_loop(
    family_dir: Path, family_adapters: dict[str, Path]
) -> None:
    hf, static = _engines(family_dir, family_adapters)
    assert (hf.decoder, static.decoder) == ("hf", "static")
    for with_adapters in (False, True):
        requests = _requests(with_adapters)
        _assert_same(static.generate(requests), hf.generate(requests))
    assert static.static is not None and static.static._buffers  # the static step ran


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_static_decode_long_batches_in_each_sampling_mode(
    tiny_dir: Path, adapter_dirs: dict[str, Path], temperature: float
) -> None:
    """A long all-greedy (or all plain-sampled) batch equals the eager loop row for row."""
    hf, static = _engines(tiny_dir, adapter_dirs)
    requests = [
        GenerateRequest(
            input_ids=tuple(range(4, 4 + 3 * b + 1)),
            adapter=[None, AdapterRef("a", 1)][b % 2],
            sampling=SamplingParams(
                temperature=temperature, max_new_tokens=90 - 7 * b, seed=b, ignore_eos=True
            ),
        )
        for b in range(5)
    ]
    _assert_same(static.generate(requests), hf.generate(requests))
    assert static.static is not None
    assert {key[4] for key in static.static._graphs} == {
        "greedy" if temperature == 0.0 else "sample"
    }


def test_rows_with_stop_strings_leave_when_the_string_appears(
    tiny_dir: Path, adapter_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The graph sees token ids, not text: rows with stop strings are read back at each check
    and end when the string appears, not at their length, with the eager loop's results."""
    hf, static = _engines(tiny_dir, adapter_dirs)
    assert static.static is not None
    requests = [
        GenerateRequest(
            input_ids=(4, 5, 6),
            sampling=SamplingParams(temperature=1.0, max_new_tokens=300, seed=s, stop=("a", "e")),
        )
        for s in range(6)
    ]
    calls: list[tuple[str, Any]] = []
    _record(monkeypatch, static.static, "run", calls)
    got, want = static.generate(requests), hf.generate(requests)
    _assert_same(got, want)
    assert all(w.finish_reason == "stop" for w in want)
    longest = max(len(w.completion_ids) for w in want)
    assert (
        sum(n for _, n in calls) < longest + 16 < 299
    )  # stopped within one check of the last stop


def test_static_buffers_stay_within_the_cache_budget(
    tiny_dir: Path, adapter_dirs: dict[str, Path]
) -> None:
    def rows(new_tokens: int) -> list[GenerateRequest]:
        sp = SamplingParams(temperature=0.0, max_new_tokens=new_tokens, ignore_eos=True)
        return [GenerateRequest(input_ids=(4, 5, 6 + b), sampling=sp) for b in range(3)]

    hf = _engines(tiny_dir, adapter_dirs)[0]
    probe = _engines(tiny_dir, adapter_dirs)[1].static
    assert probe is not None
    short, long = probe.buffer_bytes(4, 64), probe.buffer_bytes(4, 128)  # 3 rows pad to 4
    static = _engines(tiny_dir, adapter_dirs, static_cache_bytes=long)[1]
    assert static.static is not None and static.static.cache_bytes == long
    for new_tokens in (8, 100, 8):  # cache lengths 64, 128, 64: never both kept
        _assert_same(static.generate(rows(new_tokens)), hf.generate(rows(new_tokens)))
        assert static.static.cached_bytes <= long
    assert static.static.cached_bytes == short
    tight = _engines(tiny_dir, adapter_dirs, static_cache_bytes=short - 1)[1]
    assert tight.static is not None
    _assert_same(tight.generate(rows(8)), hf.generate(rows(8)))
    assert tight.static.cached_bytes == 0  # too big to keep: freed when the batch ended


ON_CUDA = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=ON_CUDA)])
def test_continuous_batching_streams_rows_through_a_few_buffer_rows(
    tiny_dir: Path, adapter_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch, device: str
) -> None:
    """Eleven rows of mixed adapters, lengths and stops through four buffer rows: short rows
    join and leave while a long one runs, and every row equals the eager loop's (on CUDA with
    the graphs captured and replayed across the joins)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    hf, static = _engines(tiny_dir, adapter_dirs, max_batch_size=4, device=device)
    assert static.static is not None
    lengths = [60, 3, 5, 2, 9, 4, 30, 1, 7, 12, 6]
    adapters = [None, AdapterRef("a", 1), AdapterRef("b", 1), AdapterRef("c", 1)]
    requests = [
        GenerateRequest(
            input_ids=tuple(range(4 + b % 3, 8 + b)),
            adapter=adapters[b % 4],
            sampling=SamplingParams(
                temperature=[0.0, 1.0, 0.9][b % 3],
                top_k=5 if b == 4 else -1,
                max_new_tokens=n,
                seed=b,
                stop_token_ids=(3,) if b % 2 else (),
            ),
        )
        for b, n in enumerate(lengths)
    ]
    events: list[tuple[str, Any]] = []
    _record(monkeypatch, static.static, "join", events)
    _record(monkeypatch, static.static, "take", events)
    _assert_same(
        static.generate(requests), hf.generate(requests), tol=1e-4 if device == "cpu" else 1e-3
    )
    joins = [index for kind, index in events if kind == "join"]
    assert len(joins) >= 3 and sum(len(index) for index in joins) == len(requests)
    assert all(b < 4 for index in joins for b in index)
    # the first row (60 tokens) is still decoding when later rows join its batch
    first_take = next(i for i, (kind, index) in enumerate(events) if kind == "take" and 0 in index)
    assert sum(1 for kind, _ in events[:first_take] if kind == "join") >= 2


def test_static_decode_rows_do_not_depend_on_batch_mates(
    tiny_dir: Path, adapter_dirs: dict[str, Path]
) -> None:
    (static,) = _engines(tiny_dir, adapter_dirs)[1:]
    requests = _requests(with_adapters=True)
    together = static.generate(requests)
    for b, request in enumerate(requests):
        _assert_same(static.generate([request]), [together[b]])


def test_static_decode_stop_string_and_eos_as_the_eager_loop(
    tiny_dir: Path, adapter_dirs: dict[str, Path]
) -> None:
    hf, static = _engines(tiny_dir, adapter_dirs)
    stops = [
        SamplingParams(temperature=1.0, max_new_tokens=30, seed=s, stop=("a", "e"))
        for s in range(6)
    ]
    requests = [GenerateRequest(input_ids=(4, 5, 6), sampling=sp) for sp in stops]
    got, want = static.generate(requests), hf.generate(requests)
    _assert_same(got, want)
    assert [g.text for g in got] == [w.text for w in want]


def test_static_sampler_equals_the_eager_sampler() -> None:
    gen = torch.Generator().manual_seed(0)
    logits_B_V = torch.randn(6, 50, generator=gen) * 3
    temperature_B = torch.tensor([0.0, 1.0, 0.7, 1.3, 1.0, 0.0])
    top_k_B = torch.tensor([-1, -1, 5, -1, 1, 3])
    top_p_B = torch.tensor([1.0, 0.9, 1.0, 0.5, 1.0, 1.0])
    uniform_B = torch.rand(6, generator=gen)
    want = sample_tokens_B(logits_B_V, temperature_B, top_k_B, top_p_B, uniform_B)
    got = sample_tokens_static_B(
        logits_B_V, temperature_B, top_k_B, top_p_B, uniform_B, filtered=True
    )
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    greedy_B = torch.zeros(6)
    want = sample_tokens_B(logits_B_V, greedy_B, top_k_B, top_p_B, uniform_B)
    got = sample_tokens_static_B(
        logits_B_V, greedy_B, top_k_B, top_p_B, uniform_B, filtered=True, greedy_only=True
    )
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    plain = (torch.full((6,), -1), torch.ones(6))
    want = sample_tokens_B(logits_B_V, temperature_B, *plain, uniform_B)
    got = sample_tokens_static_B(logits_B_V, temperature_B, *plain, uniform_B, filtered=False)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_buckets_and_support() -> None:
    assert [row_bucket(n) for n in (1, 3, 64, 65, 200)] == [1, 4, 64, 128, 256]
    assert [slot_bucket(n, 8) for n in (0, 1, 3, 8)] == [0, 1, 4, 8]
    assert slot_bucket(5, 6) == 6
    assert sampling_mode([(0.0, -1, 1.0), (0.0, 5, 0.5)]) == "greedy"
    assert sampling_mode([(0.0, -1, 1.0), (1.0, -1, 1.0)]) == "sample"
    assert sampling_mode([(1.0, -1, 0.9), (0.0, -1, 1.0)]) == "filtered"

    class Config:
        model_type = "gpt2"

    class Model:
        config = Config()

    assert "gpt2" in (unsupported_reason(Model()) or "")


def test_auto_is_the_eager_loop_on_cpu_and_a_bad_decoder_is_named(
    make_engine: Callable[..., Engine],
) -> None:
    assert make_engine().decoder == "hf"
    with pytest.raises(EngineError, match="'fast'"):
        make_engine(decoder="fast")


def test_fused_projections_share_one_weight_and_leave_the_model_unchanged(
    tiny_dir: Path, adapter_dirs: dict[str, Path]
) -> None:
    """q/k/v (and gate/up) become views of one fused weight: the HF forward (the prefill) gives
    the same logits as before, and the decoder reads that weight with one product."""
    hf, static = _engines(tiny_dir, adapter_dirs)
    assert static.static is not None
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.inference_mode(), hf.lora.route([BASE_SLOT]), static.lora.route([BASE_SLOT]):
        want = hf.model(ids).logits
        got = static.model(ids).logits
    assert torch.equal(got, want)
    attn = static.model.model.layers[0].self_attn
    q, k, v = (getattr(attn, n).base.weight for n in ("q_proj", "k_proj", "v_proj"))
    itemsize = q.element_size()
    assert k.data_ptr() == q.data_ptr() + q.numel() * itemsize
    assert v.data_ptr() == k.data_ptr() + k.numel() * itemsize
    (qkv, _o, gate_up, _down) = static.static._groups[0]
    assert [g.widths for g in qkv] == [(q.shape[0], k.shape[0], v.shape[0])]
    assert len(gate_up) == 1 and len(gate_up[0].widths) == 2
    static.use_decoder("hf")
    static.use_decoder("static-eager")  # a new decoder on the same model reuses the fusion
    assert static.static is not None and static.static._groups[0][0][0].weight is qkv[0].weight
    assert attn.k_proj.base.weight is k


def test_weights_replaced_after_fusing_are_fused_again(
    tiny_dir: Path, adapter_dirs: dict[str, Path]
) -> None:
    """A projection whose weight is swapped for a new tensor after the decoder fused it (a
    reload, a move) is read from its new values: the next batch fuses again."""
    hf, static = _engines(tiny_dir, adapter_dirs)
    requests = _requests(with_adapters=True)
    _assert_same(static.generate(requests), hf.generate(requests))
    for engine in (hf, static):
        layer = engine.model.model.layers[1]
        k_proj = layer.self_attn.k_proj.base
        new = torch.nn.Parameter(k_proj.weight.detach() * 1.5, requires_grad=False)
        k_proj.weight = new
        layer.mlp.up_proj.weight = torch.nn.Parameter(
            layer.mlp.up_proj.base.weight.detach().flip(0).clone(), requires_grad=False
        )
    assert static.static is not None and not static.static._fused_still()
    _assert_same(static.generate(requests), hf.generate(requests))
    assert static.static._fused_still()


def test_a_runs_adapter_width_follows_its_largest_rank(
    tiny_dir: Path, adapter_dirs: dict[str, Path]
) -> None:
    """A batch of rank-4 and rank-2 adapters in a rank-8 store multiplies 4 columns per adapter,
    not 8, and gives the eager loop's tokens; a rank-8 one widens the next batch."""
    hf, static = _engines(tiny_dir, adapter_dirs)
    assert static.static is not None
    small = [
        GenerateRequest(
            input_ids=(5 + b, 6, 7),
            adapter=[AdapterRef("a", 1), AdapterRef("c", 1), None][b % 3],
            sampling=SamplingParams(temperature=1.0, max_new_tokens=10, seed=b),
        )
        for b in range(6)
    ]
    _assert_same(static.generate(small), hf.generate(small))
    assert {key[2] for key in static.static._snapshots} == {4}
    wide = [*small, GenerateRequest(input_ids=(9, 9), adapter=AdapterRef("b", 1))]
    _assert_same(static.generate(wide), hf.generate(wide))
    assert {key[2] for key in static.static._snapshots} == {4, 8}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=ON_CUDA)])
def test_loads_while_a_batch_decodes_change_nothing_in_flight(
    tiny_dir: Path, adapter_dirs: dict[str, Path], version_dirs: dict[int, Path], device: str
) -> None:
    """Versions of one adapter loaded from another thread while a batch of other adapters
    decodes (a worker's syncs): the batch's tokens are those of the same batch alone, and each
    loaded version serves the eager loop's tokens right after its load returns."""
    torch.backends.cuda.matmul.allow_tf32 = False
    hf, static = _engines(tiny_dir, adapter_dirs, device=device)
    batch = [
        GenerateRequest(
            input_ids=(5 + b, 6, 7),
            adapter=[AdapterRef("a", 1), AdapterRef("b", 1), None][b % 3],
            sampling=SamplingParams(temperature=1.0, max_new_tokens=60, seed=b, ignore_eos=True),
        )
        for b in range(9)
    ]
    alone = static.generate(batch)
    got: list[GenerateResult] = []
    worker = threading.Thread(target=lambda: got.extend(static.generate(batch)))
    worker.start()
    for version in (1, 2, 3, 4):
        for engine in (static, hf):
            engine.load_adapter("v", version, version_dirs[version])
        probe = [
            GenerateRequest(
                input_ids=(4, 5),
                adapter=AdapterRef("v", version),
                sampling=SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True),
            )
        ]
        if not worker.is_alive():  # the batch is over: the probe alone says the load landed
            _assert_same(static.generate(probe), hf.generate(probe), tol=1e-3)
    worker.join()
    _assert_same(got, alone, tol=1e-5)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True)
    probe = [GenerateRequest(input_ids=(4, 5), adapter=AdapterRef("v", 4), sampling=greedy)]
    _assert_same(static.generate(probe), hf.generate(probe), tol=1e-3)


def test_triton_attention_is_refused_where_it_cannot_run(tiny_dir: Path) -> None:
    from rollout.graph_decode import StaticDecoder

    engine = Engine.from_pretrained(tiny_dir, max_loras=2, max_lora_rank=4)
    with pytest.raises(ValueError, match="triton decode attention needs"):
        StaticDecoder(engine.model, engine.lora, max_rows=4, attention="triton")
    with pytest.raises(ValueError, match="'flash'"):
        StaticDecoder(engine.model, engine.lora, max_rows=4, attention="flash")  # type: ignore[arg-type]
    assert StaticDecoder(engine.model, engine.lora, max_rows=4).attention == "sdpa"


# ---- on CUDA: the same with the graphs captured -----------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@cuda
def test_graph_decode_equals_the_eager_loop_on_cuda(
    family_dir: Path, family_adapters: dict[str, Path]
) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    hf, static = _engines(family_dir, family_adapters, device="cuda")
    assert static.static is not None and static.static.graphs
    for with_adapters in (False, True, True):  # the third replays the captured graphs
        requests = _requests(with_adapters)
        _assert_same(static.generate(requests), hf.generate(requests), tol=1e-3)


@pytest.mark.gpu
@cuda
def test_graph_replays_see_adapters_loaded_between_batches(
    tiny_dir: Path, version_dirs: dict[int, Path]
) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    hf, static = _engines(tiny_dir, {}, device="cuda")
    for version in (1, 2, 3):
        for engine in (hf, static):
            engine.load_adapter("v", version, version_dirs[version])
        requests = [
            GenerateRequest(
                input_ids=(4, 5, 6, 7),
                adapter=AdapterRef("v", version),
                sampling=SamplingParams(temperature=1.0, max_new_tokens=16, seed=s),
            )
            for s in range(8)
        ]
        _assert_same(static.generate(requests), hf.generate(requests), tol=1e-3)


@pytest.mark.gpu
@cuda
def test_graph_decode_in_bf16_follows_the_eager_loop(
    tiny_dir: Path, adapter_dirs: dict[str, Path]
) -> None:
    hf, static = _engines(tiny_dir, adapter_dirs, device="cuda", dtype="bfloat16")
    requests = [
        GenerateRequest(
            input_ids=(4 + b, 5, 6),
            adapter=[None, AdapterRef("a", 1), AdapterRef("b", 1)][b % 3],
            sampling=SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True),
        )
        for b in range(12)
    ]
    got, want = static.generate(requests), hf.generate(requests)
    first = [g.completion_ids[0] == w.completion_ids[0] for g, w in zip(got, want, strict=True)]
    assert sum(first) >= 11  # bf16 rounding may flip a near tie, rarely
    for g, w in zip(got, want, strict=True):
        assert abs(g.logprobs[0] - w.logprobs[0]) < 0.05


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(16, 8, 128), (8, 8, 64), (32, 4, 128)])
def test_triton_decode_attention_equals_sdpa_over_each_rows_columns(
    heads: int, kv_heads: int, dim: int
) -> None:
    """Each row attends to its columns ``[0, pos]`` only: equal to SDPA under the mask (bf16),
    whatever the other columns hold."""
    from rollout.decode_attention import decode_attention

    torch.manual_seed(0)
    rows, length = 37, 320
    dev, dtype = "cuda", torch.bfloat16
    q = torch.randn(rows, heads, dim, device=dev, dtype=dtype)
    k = torch.randn(rows, kv_heads, length, dim, device=dev, dtype=dtype)
    v = torch.randn(rows, kv_heads, length, dim, device=dev, dtype=dtype)
    pos = torch.randint(0, length, (rows,), device=dev)
    pos[0], pos[1] = 0, length - 1
    mask = (torch.arange(length, device=dev)[None, :] <= pos[:, None])[:, None, None, :]
    want = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None].float(),
        k.float(),
        v.float(),
        attn_mask=mask,
        scale=dim**-0.5,
        enable_gqa=heads != kv_heads,
    )[:, :, 0]
    got = decode_attention(q, k, v, pos, dim**-0.5)
    unwritten = (torch.arange(length, device=dev)[None, :] > pos[:, None])[:, None, :, None]
    k, v = k.masked_fill(unwritten, float("nan")), v.masked_fill(unwritten, float("nan"))
    again = decode_attention(q, k, v, pos, dim**-0.5)
    assert got.shape == (rows, heads, dim) and got.dtype == dtype
    assert (got.float() - want).abs().max().item() < 2e-2
    assert torch.equal(again, got)  # unwritten columns are never read


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize(("attention", "prologue"), [("triton", "torch"), ("sdpa", "triton")])
def test_static_decode_with_the_triton_kernels_follows_the_torch_ops(
    family_dir: Path, family_adapters: dict[str, Path], attention: str, prologue: str
) -> None:
    """Triton attention, or the Triton q/k-norm + RoPE + cache prologue, against SDPA and the
    torch ops in bf16: the same first decode tokens and log-probs to bf16 rounding (later
    tokens of a random model may part after a near tie, so only the first step is compared
    row by row), and most rows' first 4 tokens."""
    from rollout.graph_decode import StaticDecoder

    want_engine, got_engine = _engines(family_dir, family_adapters, device="cuda", dtype="bfloat16")
    for engine, kernels in ((want_engine, ("sdpa", "torch")), (got_engine, (attention, prologue))):
        engine.use_decoder("static")
        engine.static = StaticDecoder(
            engine.model,
            engine.lora,
            max_rows=engine.max_batch_size,
            attention=kernels[0],  # type: ignore[arg-type]
            prologue=kernels[1],  # type: ignore[arg-type]
        )
    requests = [
        GenerateRequest(
            input_ids=tuple(range(4, 4 + b % 7 + 1)),
            adapter=[None, AdapterRef("a", 1), AdapterRef("b", 1)][b % 3],
            sampling=SamplingParams(temperature=0.0, max_new_tokens=70, ignore_eos=True),
        )
        for b in range(24)
    ]
    got, want = got_engine.generate(requests), want_engine.generate(requests)
    pairs = list(zip(got, want, strict=True))
    step = [g.completion_ids[:2] == w.completion_ids[:2] for g, w in pairs]
    assert sum(step) >= 22  # bf16 rounding may flip a near tie, rarely
    same = [(g, w) for (g, w), equal in zip(pairs, step, strict=True) if equal]
    assert max(abs(g.logprobs[1] - w.logprobs[1]) for g, w in same) < 0.05
    assert sum(g.completion_ids[:4] == w.completion_ids[:4] for g, w in pairs) >= 20


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "norm"), [(16, 8, 128, True), (9, 3, 64, False)]
)
def test_triton_prologue_equals_the_torch_ops(
    heads: int, kv_heads: int, dim: int, norm: bool
) -> None:
    """q/k RMSNorm, RoPE and the cache writes in one kernel: the torch ops' values (bf16
    rounding), each K/V head in its row's column ``pos`` and nowhere else."""
    import torch.nn.functional as F

    from rollout.decode_attention import qk_rope_cache
    from rollout.graph_decode import _rope

    torch.manual_seed(0)
    rows, length, dev, dt = 37, 96, "cuda", torch.bfloat16
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * dim, device=dev, dtype=dt)
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=1)
    q, k, v = q.view(rows, heads, dim), k.view(rows, kv_heads, dim), v.view(rows, kv_heads, dim)
    q_w, k_w = (torch.rand(dim, device=dev, dtype=dt) + 0.5 for _ in range(2))
    pos = torch.randint(0, length, (rows,), device=dev)
    angle = pos[:, None].float() * torch.rand(dim // 2, device=dev)[None, :]
    cos = torch.cat([angle.cos(), angle.cos()], -1).to(dt)
    sin = torch.cat([angle.sin(), angle.sin()], -1).to(dt)
    k_cache = torch.zeros(rows, kv_heads, length, dim, device=dev, dtype=dt)
    v_cache = torch.zeros_like(k_cache)
    norms = (q_w, 1e-6, k_w, 1e-5) if norm else None
    q_out = qk_rope_cache(q, k, v, norms, cos, sin, pos, k_cache, v_cache)
    qq, kk = q.float(), k.float()
    if norm:
        qq = F.rms_norm(qq, (dim,), q_w.float(), 1e-6)
        kk = F.rms_norm(kk, (dim,), k_w.float(), 1e-5)
    half = dim // 2
    signed = torch.cat((-sin[..., :half], sin[..., half:]), -1)[:, None, None].float()
    want_q = _rope(qq[:, :, None], cos[:, None, None].float(), signed)[:, :, 0]
    want_k = _rope(kk[:, :, None], cos[:, None, None].float(), signed)[:, :, 0]
    assert (q_out.float() - want_q).abs().max().item() < 3e-2
    rows_B = torch.arange(rows, device=dev)
    assert (k_cache[rows_B, :, pos].float() - want_k).abs().max().item() < 3e-2
    assert torch.equal(v_cache[rows_B, :, pos], v)
    k_cache[rows_B, :, pos] = 0
    v_cache[rows_B, :, pos] = 0
    assert not k_cache.any() and not v_cache.any()  # no other column written
