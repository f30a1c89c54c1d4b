"""SGLang's ``/generate`` request and response shapes, parsed and rendered for the embedded engine.

Pure functions, no I/O (the HTTP routes are :mod:`rollout.server`): :func:`parse_generate` turns a
request body into engine rows and :func:`render_result` turns an engine row into SGLang's output
object. Field names follow SGLang's documented types (``GenerateReqInput``, ``SamplingParams``;
the subset is listed in ``docs/SGLANG.md``): :data:`GENERATE_FIELDS` are the request fields
accepted, :data:`SAMPLING_FIELDS` the sampling fields implemented, :data:`NEUTRAL_SAMPLING` those
accepted only at their neutral value (any other value is a 400: the engine would silently sample
differently). An invalid body raises :class:`BadRequest` naming the offending field.

``logprob_start_len`` is ``-1`` (default: output tokens only) or ``0`` (with ``return_logprob``,
also ``meta_info.input_token_logprobs`` for the whole prompt, ``None`` first, as SGLang); the
embedded engine's prompt log-probs are at temperature 1 (``log_softmax(logits)``) whatever the
row's temperature (:meth:`~rollout.engine.Engine.prompt_logprobs`).

Adapter names carry the version: ``lora_path`` ``"math@7"`` is version 7 of adapter ``math``
(plain ``"math"`` is version 0; :class:`~rollout.adapter_slots.AdapterRef`). A completion's tokens
are SGLang's ``output_ids`` on the wire and ``completion_ids`` everywhere else.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from events.errors import MultiLoraError
from rollout.adapter_slots import AdapterRef, RequestError
from rollout.engine import GenerateRequest, GenerateResult
from rollout.sampling import SamplingParamError, SamplingParams

GENERATE_FIELDS = frozenset(
    {
        "text",
        "input_ids",
        "sampling_params",
        "lora_path",
        "return_logprob",
        "return_text_in_logprobs",
        "rid",
        "stream",
        "logprob_start_len",
        "top_logprobs_num",
    }
)
# SGLang sampling fields we implement (-> SamplingParams field), and those accepted only at their
# neutral value (any other value is a 400: the engine would silently sample differently).
SAMPLING_FIELDS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "max_new_tokens": "max_new_tokens",
    "stop": "stop",
    "stop_token_ids": "stop_token_ids",
    "ignore_eos": "ignore_eos",
    "skip_special_tokens": "skip_special_tokens",
    "sampling_seed": "seed",
}
NEUTRAL_SAMPLING = {
    "n": 1,
    "min_p": 0.0,
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "repetition_penalty": 1.0,
    "min_new_tokens": 0,
    "no_stop_trim": False,
    "spaces_between_special_tokens": True,
    "regex": None,
    "json_schema": None,
    "ebnf": None,
    "logit_bias": None,
    "custom_params": None,
    "stream_interval": None,
}


class BadRequest(MultiLoraError, ValueError):
    """An HTTP request body is invalid; ``field`` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class ParsedGenerate:
    """A ``/generate`` body decoded into engine rows (one per prompt)."""

    single: bool
    rids: list[str]
    requests: list[GenerateRequest]
    return_logprob: list[bool]
    prompt_logprobs: list[bool]
    text_in_logprobs: bool


def _per_row(body: dict[str, Any], name: str, n: int, single: bool) -> list[Any]:
    """SGLang's broadcast rule: one value for every prompt, or a list of one per prompt."""
    value = body.get(name)
    if isinstance(value, list) and not (single and name == "sampling_params" and len(value) != 1):
        if len(value) != n:
            raise BadRequest(name, f"has {len(value)} entries for {n} prompts")
        return value
    return [value] * n


def _int(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(field, f"must be an integer, got {value!r}")
    return value


def parse_sampling(raw: Any, field: str) -> SamplingParams:
    """One SGLang ``sampling_params`` dict -> :class:`SamplingParams` (``null`` = defaults)."""
    if raw is None:
        return SamplingParams()
    if not isinstance(raw, dict):
        raise BadRequest(field, f"must be an object, got {type(raw).__name__}")
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key in NEUTRAL_SAMPLING:
            if value is not None and value != NEUTRAL_SAMPLING[key]:
                raise BadRequest(
                    f"{field}.{key}",
                    f"only {NEUTRAL_SAMPLING[key]!r} is supported "
                    f"by the embedded engine, got {value!r}",
                )
            continue
        if key not in SAMPLING_FIELDS:
            raise BadRequest(
                f"{field}.{key}",
                f"unknown sampling parameter; supported: {sorted(SAMPLING_FIELDS)}",
            )
        if value is None:
            continue
        if key == "stop":
            value = [value] if isinstance(value, str) else value
            if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
                raise BadRequest(f"{field}.stop", f"must be a string or list of strings: {value!r}")
            value = tuple(value)
        elif key == "stop_token_ids":
            if not isinstance(value, list):
                raise BadRequest(f"{field}.stop_token_ids", f"must be a list, got {value!r}")
            value = tuple(_int(v, f"{field}.stop_token_ids") for v in value)
        elif key in ("top_k", "max_new_tokens", "sampling_seed"):
            value = _int(value, f"{field}.{key}")
        elif key in ("ignore_eos", "skip_special_tokens"):
            if not isinstance(value, bool):
                raise BadRequest(f"{field}.{key}", f"must be a boolean, got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise BadRequest(f"{field}.{key}", f"must be a number, got {value!r}")
        kwargs[SAMPLING_FIELDS[key]] = value
    try:
        return SamplingParams(**kwargs)
    except SamplingParamError as err:
        raise BadRequest(f"{field}.{err.field}", str(err).split(": ", 1)[-1]) from err


def parse_generate(body: Any, tokenizer: Any | None) -> ParsedGenerate:
    """Validate a ``/generate`` body and turn it into engine rows; raises :class:`BadRequest`."""
    if not isinstance(body, dict):
        raise BadRequest("body", "must be a JSON object")
    unknown = sorted(set(body) - GENERATE_FIELDS)
    if unknown:
        raise BadRequest(unknown[0], f"unknown field; supported: {sorted(GENERATE_FIELDS)}")
    if body.get("stream"):
        raise BadRequest("stream", "streaming is not supported by the embedded engine")
    if body.get("top_logprobs_num") not in (None, 0):
        raise BadRequest("top_logprobs_num", "top log-probs are not supported")
    text, input_ids = body.get("text"), body.get("input_ids")
    if (text is None) == (input_ids is None):
        raise BadRequest("text", "give exactly one of text and input_ids")
    if text is not None:
        if tokenizer is None:
            raise BadRequest("text", "this server has no tokenizer; send input_ids")
        single = isinstance(text, str)
        texts = [text] if single else text
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise BadRequest("text", "must be a string or a non-empty list of strings")
        prompts = [list(tokenizer.encode(t)) for t in texts]
    else:
        if not isinstance(input_ids, list) or not input_ids:
            raise BadRequest("input_ids", "must be a non-empty list of token ids (or of lists)")
        single = not isinstance(input_ids[0], list)
        prompts = [input_ids] if single else input_ids
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, list) or not prompt:
                raise BadRequest(f"input_ids[{i}]", "must be a non-empty list of token ids")
            for tok in prompt:
                _int(tok, f"input_ids[{i}]")
    n = len(prompts)
    samplings = _per_row(body, "sampling_params", n, single)
    loras = _per_row(body, "lora_path", n, single)
    logprob_flags = _per_row(body, "return_logprob", n, single)
    requests = []
    for i in range(n):
        field = "sampling_params" if single else f"sampling_params[{i}]"
        sampling = parse_sampling(samplings[i], field)
        lora = loras[i]
        if lora is not None and not isinstance(lora, str):
            raise BadRequest("lora_path", f"entries must be adapter names or null, got {lora!r}")
        try:
            adapter = None if lora is None else AdapterRef.parse(lora)
        except RequestError as err:
            raise BadRequest("lora_path", str(err)) from err
        requests.append(
            GenerateRequest(input_ids=tuple(prompts[i]), adapter=adapter, sampling=sampling)
        )
    for flag in logprob_flags:
        if flag is not None and not isinstance(flag, bool):
            raise BadRequest("return_logprob", f"must be a boolean (or list), got {flag!r}")
    starts = _per_row(body, "logprob_start_len", n, single)
    for start in starts:
        if start not in (None, -1, 0) or isinstance(start, bool):
            raise BadRequest(
                "logprob_start_len",
                f"only -1 (output tokens) or 0 (the whole prompt too) are supported, got {start!r}",
            )
    rid = body.get("rid")
    if rid is None:
        rids = [uuid.uuid4().hex for _ in range(n)]
    elif isinstance(rid, str):
        rids = [rid] if single else [f"{rid}_{i}" for i in range(n)]
    elif isinstance(rid, list) and len(rid) == n and all(isinstance(r, str) for r in rid):
        rids = rid
    else:
        raise BadRequest("rid", "must be a string or a list of one string per prompt")
    return ParsedGenerate(
        single=single,
        rids=rids,
        requests=requests,
        return_logprob=[bool(f) for f in logprob_flags],
        prompt_logprobs=[bool(f) and s == 0 for f, s in zip(logprob_flags, starts, strict=True)],
        text_in_logprobs=bool(body.get("return_text_in_logprobs")),
    )


def render_result(
    result: GenerateResult,
    rid: str,
    *,
    return_logprob: bool,
    text_in_logprobs: bool,
    tokenizer: Any | None,
    input_ids: tuple[int, ...] = (),
    prompt_logprobs: tuple[float | None, ...] | None = None,
) -> dict[str, Any]:
    """One engine row -> SGLang's ``/generate`` output object (``prompt_logprobs`` of
    ``input_ids``, when asked for, as ``input_token_logprobs``)."""
    if result.finish_reason == "length":
        finish: dict[str, Any] = {"type": "length", "length": len(result.completion_ids)}
    else:
        finish = {"type": "stop", "matched": result.matched}
    meta: dict[str, Any] = {
        "id": rid,
        "finish_reason": finish,
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": len(result.completion_ids),
        "cached_tokens": 0,
    }
    if return_logprob:
        texts: list[str | None] = [None] * len(result.completion_ids)
        if text_in_logprobs and tokenizer is not None:
            texts = [tokenizer.decode([t]) for t in result.completion_ids]
        meta["output_token_logprobs"] = [
            [lp, tok, txt]
            for lp, tok, txt in zip(result.logprobs, result.completion_ids, texts, strict=True)
        ]
        if prompt_logprobs is not None:
            meta["input_token_logprobs"] = [
                [lp, tok, tokenizer.decode([tok]) if text_in_logprobs and tokenizer else None]
                for lp, tok in zip(prompt_logprobs, input_ids, strict=True)
            ]
    # SGLang's field name for the completion's tokens (the rest of the pipeline: completion_ids)
    return {"text": result.text, "output_ids": list(result.completion_ids), "meta_info": meta}
