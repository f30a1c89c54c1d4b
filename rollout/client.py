"""A small synchronous client for SGLang's native HTTP API (and our embedded server).

The same :class:`SGLangClient` talks to ``python -m rollout.server`` and to a real SGLang server
launched with ``--enable-lora`` (see ``docs/SGLANG.md``). It sends only field names from SGLang's
documented request types (``GenerateReqInput``, ``SamplingParams``, ``LoadLoRAAdapterReqInput``),
and decodes responses at the edge into frozen records.

Adapter names are ``"name@version"`` (see :class:`rollout.adapter_slots.AdapterRef`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import httpx
import msgspec

from events.errors import MultiLoraError
from rollout.sampling import SamplingParams

SamplingArg = SamplingParams | Mapping[str, Any]


class SGLangError(MultiLoraError):
    """The server answered with an error (``status`` is the HTTP status)."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message
        self.param = param


class SGLangUnavailableError(MultiLoraError):
    """The server could not be reached (connection refused, timeout, ...)."""


class GenerateOutput(msgspec.Struct, frozen=True, kw_only=True):
    """One generated completion.

    ``completion_ids`` are the generated tokens (SGLang's JSON field ``output_ids``; renamed at
    this edge to the name the rest of the pipeline uses). ``output_token_logprobs`` (present
    when requested) is aligned with them. ``input_token_logprobs`` (requested with
    ``logprob_start_len=0``) has one entry per prompt token, ``None`` for the first.
    ``finish_reason`` is ``"stop"`` (``matched``: stop token id or string) or ``"length"``.
    """

    id: str
    text: str
    completion_ids: tuple[int, ...]
    finish_reason: str
    matched: int | str | None
    prompt_tokens: int
    completion_tokens: int
    output_token_logprobs: tuple[float, ...] | None = None
    input_token_logprobs: tuple[float | None, ...] | None = None


class ModelInfo(msgspec.Struct, frozen=True, kw_only=True):
    """``/get_model_info`` (unknown extra fields of newer servers are ignored)."""

    model_path: str
    tokenizer_path: str | None = None
    is_generation: bool = True
    weight_version: str | None = None


def _sampling_body(value: SamplingArg | None) -> dict[str, Any] | None:
    if value is None:
        return None
    return value.to_sglang() if isinstance(value, SamplingParams) else dict(value)


def decode_output(raw: Mapping[str, Any]) -> GenerateOutput:
    """One ``/generate`` output object -> :class:`GenerateOutput`.

    Older SGLang versions omit ``output_ids``; the ids are then taken from
    ``output_token_logprobs`` (so request ``return_logprob=True`` against them).
    """
    meta = raw["meta_info"]
    logprob_rows = meta.get("output_token_logprobs")
    input_rows = meta.get("input_token_logprobs")
    ids = raw.get("output_ids")
    if ids is None:
        if logprob_rows is None:
            raise SGLangError(200, "response has no output_ids; request return_logprob=True")
        ids = [row[1] for row in logprob_rows]
    finish = meta.get("finish_reason") or {}
    return GenerateOutput(
        id=str(meta.get("id", "")),
        text=raw.get("text", ""),
        completion_ids=tuple(ids),
        finish_reason=finish.get("type", ""),
        matched=finish.get("matched"),
        prompt_tokens=int(meta.get("prompt_tokens", 0)),
        completion_tokens=int(meta.get("completion_tokens", len(ids))),
        output_token_logprobs=(
            None if logprob_rows is None else tuple(float(row[0]) for row in logprob_rows)
        ),
        input_token_logprobs=(
            None
            if input_rows is None
            else tuple(None if row[0] is None else float(row[0]) for row in input_rows)
        ),
    )


class SGLangClient:
    """Blocking client of one server. Thread-safe (one ``httpx.Client`` connection pool)."""

    def __init__(
        self, base_url: str, timeout: float = 600.0, transport: httpx.BaseTransport | None = None
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> SGLangClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, body: Any = None) -> httpx.Response:
        try:
            response = self._http.request(method, path, json=body)
        except httpx.TransportError as err:
            raise SGLangUnavailableError(f"{method} {self.base_url}{path}: {err}") from err
        if response.status_code >= 400:
            raise SGLangError(response.status_code, *_error_message(response))
        return response

    def generate(
        self,
        *,
        text: str | Sequence[str] | None = None,
        input_ids: Sequence[int] | Sequence[Sequence[int]] | None = None,
        sampling_params: SamplingArg | Sequence[SamplingArg] | None = None,
        lora_path: str | Sequence[str | None] | None = None,
        return_logprob: bool = False,
        logprob_start_len: int | None = None,
        rid: str | Sequence[str] | None = None,
    ) -> GenerateOutput | list[GenerateOutput]:
        """``POST /generate``. One prompt in, one output out; a list of prompts in, a list out.

        ``sampling_params`` and ``lora_path`` are one value for all prompts or one per prompt;
        ``lora_path=None`` (or a ``None`` entry) runs the base model. ``logprob_start_len=0``
        with ``return_logprob`` also returns the prompt's log-probs (``input_token_logprobs``).
        """
        body: dict[str, Any] = {}
        if text is not None:
            body["text"] = text if isinstance(text, str) else list(text)
        if input_ids is not None:
            body["input_ids"] = [list(p) if not isinstance(p, int) else p for p in input_ids]
        if sampling_params is not None:
            if isinstance(sampling_params, (SamplingParams, Mapping)):
                body["sampling_params"] = _sampling_body(sampling_params)
            else:
                body["sampling_params"] = [_sampling_body(s) for s in sampling_params]
        if lora_path is not None:
            body["lora_path"] = lora_path if isinstance(lora_path, str) else list(lora_path)
        if return_logprob:
            body["return_logprob"] = True
        if logprob_start_len is not None:
            body["logprob_start_len"] = logprob_start_len
        if rid is not None:
            body["rid"] = rid if isinstance(rid, str) else list(rid)
        raw = self._request("POST", "/generate", body).json()
        if isinstance(raw, list):
            return [decode_output(item) for item in raw]
        return decode_output(raw)

    def generate_batch(
        self,
        input_ids: Sequence[Sequence[int]],
        sampling_params: SamplingArg | Sequence[SamplingArg],
        lora_path: str | Sequence[str | None] | None = None,
        return_logprob: bool = True,
    ) -> list[GenerateOutput]:
        """``generate`` for a list of token-id prompts; always returns a list."""
        out = self.generate(
            input_ids=[list(p) for p in input_ids],
            sampling_params=sampling_params,
            lora_path=lora_path,
            return_logprob=return_logprob,
        )
        if not isinstance(out, list):
            raise SGLangError(200, "server answered one object for a batch")
        return out

    def load_lora_adapter(self, name: str, path: str, *, pinned: bool = False) -> dict[str, Any]:
        """``POST /load_lora_adapter``; returns the server's ``loaded_adapters`` map."""
        body: dict[str, Any] = {"lora_name": name, "lora_path": path}
        if pinned:
            body["pinned"] = True
        return self._lora_update("/load_lora_adapter", body)

    def unload_lora_adapter(self, name: str) -> dict[str, Any]:
        """``POST /unload_lora_adapter``; returns the server's ``loaded_adapters`` map."""
        return self._lora_update("/unload_lora_adapter", {"lora_name": name})

    def _lora_update(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        raw = self._request("POST", path, body).json()
        if not raw.get("success", False):
            raise SGLangError(200, raw.get("error_message") or f"{path} failed")
        return dict(raw.get("loaded_adapters") or {})

    def health(self) -> bool:
        """``GET /health``: True when the server answers 200."""
        try:
            return self._http.get("/health").status_code == 200
        except httpx.TransportError:
            return False

    def model_info(self) -> ModelInfo:
        return msgspec.convert(self._request("GET", "/get_model_info").json(), ModelInfo)


def _error_message(response: httpx.Response) -> tuple[str, str | None]:
    """``(message, param)`` of SGLang's error bodies (``error.message`` / ``error_message``)."""
    try:
        body = response.json()
    except ValueError:
        return response.text or response.reason_phrase, None
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and "message" in error:
            return str(error["message"]), error.get("param")
        if body.get("error_message"):
            return str(body["error_message"]), None
        if "detail" in body:  # FastAPI validation errors (real SGLang)
            return msgspec.json.encode(body["detail"]).decode(), None
    return response.text, None
