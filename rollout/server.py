"""SGLang-compatible HTTP front of the embedded engine, so one client speaks to both.

Endpoints, with SGLang's request and response shapes (the subset is listed in
``docs/SGLANG.md``): ``GET /health``, ``GET /health_generate``, ``GET /get_model_info`` (also
``/model_info``), ``GET /get_server_info`` (also ``/server_info``), ``GET|POST /flush_cache``
(nothing to flush: no KV cache outlives a batch), ``POST /generate``, ``POST /load_lora_adapter``,
``POST /unload_lora_adapter``. Bodies are parsed and rendered by :mod:`rollout.sglang_api`;
concurrent ``/generate`` calls are merged into engine batches by :class:`~rollout.batcher.Batcher`.

Adapter names carry the version (``"math@7"``); the same names work on a real SGLang server,
where each version is simply a distinct adapter. ``lora_path`` of ``/load_lora_adapter`` must lie
under one of the server's allowed roots.

Errors are 400 with ``{"error": {"message": ..., "param": <field>}}`` naming the bad field
(SGLang's error body plus ``param``; load/unload answers also carry SGLang's ``success: false``
and ``error_message``); an unexpected failure is a 500 with the message.

Run ``python -m rollout.server --model models/smollm2-135m --allowed-root runs/artifacts``; its
:class:`ServerConfig` loads like every process config (:func:`events.config.load`: defaults <
``--config`` file < ``MULTILORA_SERVER_<FIELD>`` < flags).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Annotated, Any

import msgspec

from events.bootstrap import EXIT_CONFIG
from events.config import Port, Positive, load
from events.errors import ConfigError, MultiLoraError
from rollout.adapter_slots import AdapterRef, RequestError
from rollout.batcher import Batcher
from rollout.config import Decoder
from rollout.engine import Engine, GenerateRequest
from rollout.sampling import SamplingParamError, SamplingParams
from rollout.sglang_api import BadRequest, parse_generate, render_result

logger = logging.getLogger(__name__)


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
            ("GET", "/model_info"): self._model_info,
            ("GET", "/get_server_info"): self._server_info,
            ("GET", "/server_info"): self._server_info,
            ("GET", "/flush_cache"): self._flush_cache,
            ("POST", "/flush_cache"): self._flush_cache,
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
        scored = iter(
            self.engine.prompt_logprobs(
                [r for r, f in zip(parsed.requests, parsed.prompt_logprobs, strict=True) if f]
            )
        )
        outs = [
            render_result(
                res,
                rid,
                return_logprob=flag,
                text_in_logprobs=parsed.text_in_logprobs,
                tokenizer=self.engine.tokenizer,
                input_ids=req.input_ids,
                prompt_logprobs=next(scored) if prompt else None,
            )
            for res, rid, flag, req, prompt in zip(
                results,
                parsed.rids,
                parsed.return_logprob,
                parsed.requests,
                parsed.prompt_logprobs,
                strict=True,
            )
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

    def _server_info(self, _: Any) -> Response:
        """SGLang's server arguments that apply here, plus ``internal_states``."""
        engine = self.engine
        targets = sorted({name.rsplit(".", 1)[-1] for name in engine.lora.layers})
        return 200, {
            "model_path": engine.model_path,
            "tokenizer_path": engine.model_path,
            "served_model_name": engine.model_path,
            "dtype": str(engine.lora.dtype).removeprefix("torch."),
            "device": engine.lora.device.type,
            "enable_lora": True,
            "max_loras_per_batch": engine.lora.num_slots,
            "max_lora_rank": engine.lora.max_rank,
            "lora_target_modules": targets,
            "max_running_requests": self.batcher.max_batch_rows,
            "context_length": engine.max_positions or None,
            "version": f"multilora-embedded {_version()}",
            "internal_states": [{"loaded_lora_adapters": sorted(self._loaded())}],
        }

    def _flush_cache(self, _: Any) -> Response:
        """200 as SGLang's: the engine keeps no KV cache between batches, so nothing is held."""
        return 200, None

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


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("multilora")
    except PackageNotFoundError:  # run from a checkout that was not installed
        return "unknown"


def _error(field: str, message: str) -> dict[str, Any]:
    return {"error": {"message": message, "param": field}}


def _field_of(path: str) -> str:
    return {"/generate": "lora_path"}.get(path, "body")


def _handler_class(app: RolloutServer) -> type[BaseHTTPRequestHandler]:
    """A request handler bound to ``app`` (http.server instantiates one per request)."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # headers and body go out as two writes on a kept-alive connection: with Nagle's
        # algorithm the body waits for the client's delayed ACK (~40 ms on Linux) every answer
        disable_nagle_algorithm = True

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


def _doc(text: str, *flags: str) -> msgspec.Meta:
    return msgspec.Meta(description=text, extra={"flags": flags} if flags else {})


class ServerConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Configuration of ``python -m rollout.server`` (flag names follow SGLang's where it has one:
    ``--max-loras`` is SGLang's ``--max-loras-per-batch``, see ``docs/SGLANG.md``)."""

    model_path: Annotated[str, _doc("local Hugging Face model directory", "--model")] = ""
    host: Annotated[str, _doc("address to listen on")] = "127.0.0.1"
    port: Annotated[Port, _doc("port to listen on (0: an ephemeral one)")] = 30000
    dtype: Annotated[str, _doc("model dtype")] = "float32"
    device: Annotated[str, _doc("torch device")] = "cpu"
    max_loras: Annotated[Positive, _doc("LoRA slots (adapter versions resident at once)")] = 8
    max_lora_rank: Annotated[Positive, _doc("largest LoRA rank a slot holds")] = 64
    keep_versions: Annotated[Positive, _doc("versions kept per adapter")] = 2
    lora_target_modules: Annotated[
        tuple[str, ...], _doc("modules to wrap up front (repeat the flag; none: on demand)")
    ] = ()
    allowed_roots: Annotated[
        tuple[str, ...], _doc("directories adapters may be loaded from", "--allowed-root")
    ] = ()
    decoder: Annotated[
        Decoder, _doc("decode loop (auto: CUDA-graph static on CUDA, HF eager otherwise)")
    ] = "auto"
    max_wait_ms: Annotated[
        float, msgspec.Meta(ge=0, description="longest wait for a batch to fill, ms")
    ] = 5.0

    def __post_init__(self) -> None:
        if not self.model_path:
            raise ConfigError("model_path is empty; pass --model with a local HF model directory")


def load_config(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> ServerConfig:
    """Defaults < file < env < flags into a validated :class:`ServerConfig`."""
    return load(
        ServerConfig,
        role="server",
        argv=argv,
        environ=environ,
        prog="python -m rollout.server",
        description="SGLang-compatible HTTP server of the embedded engine.",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until interrupted."""
    try:
        config = load_config(argv)
    except ConfigError as exc:
        print(f"python -m rollout.server: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    logging.basicConfig(level=logging.INFO)
    engine = Engine.from_pretrained(
        config.model_path,
        dtype=config.dtype,
        device=config.device,
        max_loras=config.max_loras,
        max_lora_rank=config.max_lora_rank,
        keep_versions=config.keep_versions,
        target_modules=list(config.lora_target_modules) or None,
        decoder=config.decoder,
    )
    server = RolloutServer(
        engine,
        allowed_roots=config.allowed_roots or [Path.cwd()],
        max_wait_s=config.max_wait_ms / 1e3,
    )
    url = server.start(config.host, config.port)
    logger.info("serving %s on %s", config.model_path, url)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
