"""SGLang-compatible HTTP front of the embedded engine, so one client speaks to both.

Endpoints, with SGLang's request and response shapes (the subset is listed in
``docs/SGLANG.md``): ``GET /health``, ``GET /health_generate``, ``GET /get_model_info``,
``POST /generate``, ``POST /load_lora_adapter``, ``POST /unload_lora_adapter``.

Adapter names carry the version: ``lora_name``/``lora_path`` ``"math@7"`` is version 7 of adapter
``math`` (plain ``"math"`` is version 0); the same names work on a real SGLang server, where each
version is simply a distinct adapter. ``lora_path`` of ``/load_lora_adapter`` must lie under one
of the server's allowed roots.

Errors are 400 with ``{"error": {"message": ..., "param": <field>}}`` naming the bad field
(SGLang's error body plus ``param``; load/unload answers also carry SGLang's ``success: false``
and ``error_message``); an unexpected failure is a 500 with the message.

Requests from concurrent HTTP clients are merged by :class:`Batcher`: the first waiting request
opens a batch, which closes after ``max_wait_s`` or at ``max_batch_rows`` rows, and runs as one
:meth:`Engine.generate` call.

The module passes 600 lines on purpose: it keeps the whole HTTP contract (body parsing, output
rendering, batching, routes, CLI) side by side, so a reader checks it against SGLang's types in
one place. The parsing half is pure and is the part to move out if it grows.
"""

from __future__ import annotations

import argparse
import json
import logging
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import msgspec

from events.errors import MultiLoraError
from rollout.engine import AdapterRef, Engine, GenerateRequest, GenerateResult, RequestError
from rollout.sampling import SamplingParamError, SamplingParams

logger = logging.getLogger(__name__)

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
    if body.get("logprob_start_len") not in (None, -1):
        raise BadRequest("logprob_start_len", "only output-token log-probs (-1) are supported")
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
        text_in_logprobs=bool(body.get("return_text_in_logprobs")),
    )


def render_result(
    result: GenerateResult,
    rid: str,
    *,
    return_logprob: bool,
    text_in_logprobs: bool,
    tokenizer: Any | None,
) -> dict[str, Any]:
    """One engine row -> SGLang's ``/generate`` output object."""
    if result.finish_reason == "length":
        finish: dict[str, Any] = {"type": "length", "length": len(result.output_ids)}
    else:
        finish = {"type": "stop", "matched": result.matched}
    meta: dict[str, Any] = {
        "id": rid,
        "finish_reason": finish,
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": len(result.output_ids),
        "cached_tokens": 0,
    }
    if return_logprob:
        texts: list[str | None] = [None] * len(result.output_ids)
        if text_in_logprobs and tokenizer is not None:
            texts = [tokenizer.decode([t]) for t in result.output_ids]
        meta["output_token_logprobs"] = [
            [lp, tok, txt]
            for lp, tok, txt in zip(result.logprobs, result.output_ids, texts, strict=True)
        ]
    return {"text": result.text, "output_ids": list(result.output_ids), "meta_info": meta}


@dataclass
class _Job:
    requests: list[GenerateRequest]
    done: threading.Event
    results: list[GenerateResult] | None = None
    error: BaseException | None = None


class Batcher:
    """Merges concurrent ``submit`` calls into engine batches (one batching thread)."""

    def __init__(
        self, engine: Engine, *, max_batch_rows: int = 256, max_wait_s: float = 0.005
    ) -> None:
        self.engine = engine
        self.max_batch_rows = max_batch_rows
        self.max_wait_s = max_wait_s
        self.history: deque[tuple[int, int]] = deque(maxlen=1024)  # (jobs, rows) per batch
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="rollout-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=60)

    def submit(self, requests: list[GenerateRequest]) -> list[GenerateResult]:
        """Queue ``requests`` as one job; block until its batch ran; re-raise its error."""
        job = _Job(requests=requests, done=threading.Event())
        self._queue.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        if job.results is None:
            raise MultiLoraError("internal: batch finished without results")
        return job.results

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            jobs, rows = [first], len(first.requests)
            deadline = time.monotonic() + self.max_wait_s
            stopping = False
            while rows < self.max_batch_rows:
                try:
                    job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job is None:
                    stopping = True
                    break
                jobs.append(job)
                rows += len(job.requests)
            self._run_jobs(jobs)
            if stopping:
                return

    def _run_jobs(self, jobs: list[_Job]) -> None:
        """Run jobs as one batch; if it fails for a caller's reason, run them one by one so
        only the offending job gets the error."""
        try:
            results = self.engine.generate([r for job in jobs for r in job.requests])
        except MultiLoraError as err:
            if len(jobs) == 1:
                self._finish(jobs[0], error=err)
                return
            for job in jobs:
                self._run_jobs([job])
            return
        except Exception as err:  # a bug: fail these calls loudly (HTTP 500), keep serving
            logger.exception("engine.generate failed")
            for job in jobs:
                self._finish(job, error=err)
            return
        self.history.append((len(jobs), len(results)))
        offset = 0
        for job in jobs:
            self._finish(job, results=results[offset : offset + len(job.requests)])
            offset += len(job.requests)

    @staticmethod
    def _finish(
        job: _Job,
        *,
        results: list[GenerateResult] | None = None,
        error: BaseException | None = None,
    ) -> None:
        job.results, job.error = results, error
        job.done.set()


Response = tuple[int, Any]  # (HTTP status, JSON payload or None for an empty body)


class RolloutServer:
    """The HTTP app: routes SGLang's endpoints to an :class:`Engine` through a :class:`Batcher`.

    ``allowed_roots``: directories adapters may be loaded from. ``on_request(path, body)`` is
    called with every decoded request body (tests record what clients send).
    """

    def __init__(
        self,
        engine: Engine,
        *,
        allowed_roots: Sequence[str | Path],
        max_wait_s: float = 0.005,
        max_batch_rows: int = 256,
        on_request: Callable[[str, Any], None] | None = None,
    ) -> None:
        self.engine = engine
        self.allowed_roots = [Path(r).resolve() for r in allowed_roots]
        self.batcher = Batcher(engine, max_batch_rows=max_batch_rows, max_wait_s=max_wait_s)
        self.on_request = on_request
        self._http: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.routes: dict[tuple[str, str], Callable[[Any], Response]] = {
            ("GET", "/health"): lambda _: (200, None),
            ("GET", "/health_generate"): self._health_generate,
            ("GET", "/get_model_info"): self._model_info,
            ("POST", "/generate"): self._generate,
            ("POST", "/load_lora_adapter"): self._load,
            ("POST", "/unload_lora_adapter"): self._unload,
        }

    # ---- lifecycle ------------------------------------------------------------------------

    def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve in background threads; return the base URL (``port=0``: an ephemeral port)."""
        self.batcher.start()
        self._http = ThreadingHTTPServer((host, port), _handler_class(self))
        self._http.daemon_threads = True
        self._thread = threading.Thread(
            target=self._http.serve_forever, name="rollout-http", daemon=True
        )
        self._thread.start()
        bound_host, bound_port = self._http.server_address[:2]
        return f"http://{bound_host!s}:{bound_port}"

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        self.batcher.stop()

    # ---- endpoints ------------------------------------------------------------------------

    def dispatch(self, method: str, path: str, raw: bytes) -> Response:
        """Route one request; every error becomes a JSON error response."""
        route = self.routes.get((method, path.split("?", 1)[0]))
        if route is None:
            return 404, {"error": {"message": f"no route {method} {path}"}}
        body: Any = None
        if method == "POST":
            try:
                body = json.loads(raw or b"null")
            except json.JSONDecodeError as err:
                return 400, _error("body", f"not valid JSON: {err}")
            if self.on_request is not None:
                self.on_request(path, body)
        try:
            return route(body)
        except (BadRequest, RequestError, SamplingParamError) as err:
            return 400, _error(err.field, str(err))
        except MultiLoraError as err:  # engine refusals: unknown adapter, no free slot, ...
            field = _field_of(path)
            return 400, _error(field, f"{field}: {err}")

    def _generate(self, body: Any) -> Response:
        parsed = parse_generate(body, self.engine.tokenizer)
        results = self.batcher.submit(parsed.requests)
        outs = [
            render_result(
                res,
                rid,
                return_logprob=flag,
                text_in_logprobs=parsed.text_in_logprobs,
                tokenizer=self.engine.tokenizer,
            )
            for res, rid, flag in zip(results, parsed.rids, parsed.return_logprob, strict=True)
        ]
        return 200, outs[0] if parsed.single else outs

    def _health_generate(self, _: Any) -> Response:
        probe = GenerateRequest(
            input_ids=(self.engine.pad_id,),
            sampling=SamplingParams(max_new_tokens=1, temperature=0.0),
        )
        try:
            self.batcher.submit([probe])
        except MultiLoraError as err:
            return 503, {"error": {"message": str(err)}}
        return 200, None

    def _model_info(self, _: Any) -> Response:
        return 200, {
            "model_path": self.engine.model_path,
            "tokenizer_path": self.engine.model_path,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": "default",
            "has_image_understanding": False,
            "has_audio_understanding": False,
        }

    def _loaded(self) -> dict[str, str]:
        return {str(ref): path for ref, path in self.engine.adapter_paths().items()}

    def _lora_update(self, body: Any, *, load: bool) -> Response:
        try:
            if not isinstance(body, dict):
                raise BadRequest("body", "must be a JSON object")
            allowed = (
                {"lora_name", "lora_path", "pinned", "lora_id"}
                if load
                else {"lora_name", "lora_id"}
            )
            unknown = sorted(set(body) - allowed)
            if unknown:
                raise BadRequest(unknown[0], f"unknown field; supported: {sorted(allowed)}")
            name = body.get("lora_name")
            if not isinstance(name, str) or not name:
                raise BadRequest("lora_name", f"must be a non-empty string, got {name!r}")
            try:
                ref = AdapterRef.parse(name)
            except RequestError as err:
                raise BadRequest("lora_name", str(err)) from err
            if load:
                self.engine.load_adapter(ref.name, ref.version, self._allowed_path(body))
            else:
                self.engine.unload_adapter(ref.name, ref.version)
        except MultiLoraError as err:
            if isinstance(err, BadRequest):
                field, message = err.field, str(err)
            else:  # engine refusals: bad adapter files, unknown version, no free slot, ...
                field = "lora_path" if load else "lora_name"
                message = f"{field}: {err}"
            return 400, {
                "success": False,
                "error_message": message,
                "loaded_adapters": self._loaded(),
                **_error(field, message),
            }
        return 200, {"success": True, "error_message": None, "loaded_adapters": self._loaded()}

    def _load(self, body: Any) -> Response:
        return self._lora_update(body, load=True)

    def _unload(self, body: Any) -> Response:
        return self._lora_update(body, load=False)

    def _allowed_path(self, body: dict[str, Any]) -> Path:
        raw = body.get("lora_path")
        if not isinstance(raw, str) or not raw:
            raise BadRequest("lora_path", f"must be a non-empty path, got {raw!r}")
        path = Path(raw).resolve()
        if not any(path.is_relative_to(root) for root in self.allowed_roots):
            roots = [str(r) for r in self.allowed_roots]
            raise BadRequest(
                "lora_path",
                f"{raw!r} is not under an allowed root {roots}; start "
                "the server with --allowed-root for the artifact directory",
            )
        return path


def _error(field: str, message: str) -> dict[str, Any]:
    return {"error": {"message": message, "param": field}}


def _field_of(path: str) -> str:
    return {"/generate": "lora_path"}.get(path, "body")


def _handler_class(app: RolloutServer) -> type[BaseHTTPRequestHandler]:
    """A request handler bound to ``app`` (http.server instantiates one per request)."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                status, payload = app.dispatch(method, self.path, raw)
            except Exception as err:  # a bug: answer 500 with the message, keep serving
                logger.exception("%s %s failed", method, self.path)
                status, payload = 500, {"error": {"message": f"{type(err).__name__}: {err}"}}
            data = b"" if payload is None else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._serve("GET")

        def do_POST(self) -> None:
            self._serve("POST")

        def log_message(self, format: str, *args: Any) -> None:
            logger.debug("%s " + format, self.address_string(), *args)

    return Handler


class ServerConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Command-line configuration of ``python -m rollout.server``."""

    model: str
    host: str = "127.0.0.1"
    port: int = 30000
    dtype: str = "float32"
    device: str = "cpu"
    max_loras: int = 8
    max_lora_rank: int = 64
    keep_versions: int = 2
    lora_target_modules: tuple[str, ...] = ()
    allowed_roots: tuple[str, ...] = ()
    max_wait_ms: float = 5.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rollout.server", description=__doc__)
    parser.add_argument("--model", required=True, help="local HF model directory")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-loras", type=int, default=8)
    parser.add_argument("--max-lora-rank", type=int, default=64)
    parser.add_argument("--keep-versions", type=int, default=2)
    parser.add_argument("--lora-target-modules", nargs="*", default=[])
    parser.add_argument("--allowed-root", action="append", default=[], dest="allowed_roots")
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    args = vars(parser.parse_args(argv))
    config = msgspec.convert(args, ServerConfig)
    logging.basicConfig(level=logging.INFO)
    engine = Engine.from_pretrained(
        config.model,
        dtype=config.dtype,
        device=config.device,
        max_loras=config.max_loras,
        max_lora_rank=config.max_lora_rank,
        keep_versions=config.keep_versions,
        target_modules=list(config.lora_target_modules) or None,
    )
    server = RolloutServer(
        engine,
        allowed_roots=config.allowed_roots or [Path.cwd()],
        max_wait_s=config.max_wait_ms / 1e3,
    )
    url = server.start(config.host, config.port)
    logger.info("serving %s on %s", config.model, url)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
