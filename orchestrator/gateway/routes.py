"""The gateway's routes: the Tinker SDK's endpoints, each turned into records, events, futures.

:meth:`Gateway.handle` is the whole HTTP contract, independent of the server: route lookup (404),
the API key (401), the body size (413), the route; an :class:`HttpError` becomes its status, a
Redis outage a 503 after a short pause (the SDK retries at once), anything else a 500 with the
message (logged). The routes (``/api/v1/...``; request and response types are ``tinker.types``):

- start-up: ``healthz`` · ``client/config`` (the SDK's feature flags: API-key auth, no
  compression, sequential ``forward_backward`` chunks, no retrieve-futures poller, client-side
  custom losses) · ``client/dynamic_config`` · ``create_session`` · ``session_heartbeat`` ·
  ``sessions/<id>/finish`` · ``telemetry`` (accepted and dropped) · ``get_server_capabilities``
  · ``get_info`` · ``weights_info`` · ``create_sampling_session`` · ``samplers/<id>``;
- training (futures; :mod:`orchestrator.gateway.training`): ``create_model`` →
  ``adapter.register_requested`` on ingress · ``forward_backward`` (protobuf) →
  ``train.forward_backward`` · ``optim_step`` · ``save_weights_for_sampler`` /
  ``save_weights`` → ``train.save_weights`` · ``load_weights`` → ``train.load_weights``
  (without a model id: a model created from the checkpoint, ``adapter.register_requested``
  with ``init_from``) · ``unload_model`` → ``adapter.deregister_requested``;
- sampling (futures; :mod:`orchestrator.gateway.sampling`): ``asample`` → ``rollout.sample``
  on ``rollout.tasks``;
- ``retrieve_future``.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping

import redis

from events.streams import Streams
from orchestrator.gateway import wire
from orchestrator.gateway.call import Call, Limits, Route
from orchestrator.gateway.errors import HttpError
from orchestrator.gateway.futures_api import Futures
from orchestrator.gateway.records import Records
from orchestrator.gateway.render import PROTOBUF, Reply, error_reply, json_reply
from orchestrator.gateway.sampling import SamplingRoutes
from orchestrator.gateway.sessions import Sessions
from orchestrator.gateway.tenants import Tenants
from orchestrator.gateway.training import TrainingRoutes

log = logging.getLogger(__name__)

OUTAGE_PAUSE_S = 0.5
"""How long a request waits before its 503 while Redis is unreachable."""


class Gateway:
    """The HTTP app over one namespace (see the module doc)."""

    def __init__(
        self,
        client: redis.Redis,
        streams: Streams,
        tenants: Tenants,
        limits: Limits,
        *,
        sessions: Sessions,
        futures: Futures,
        source: str = "gateway",
    ) -> None:
        self.client = client
        self.streams = streams
        self.tenants = tenants
        self.limits = limits
        self.records = Records(client, streams)
        self.sessions = sessions
        self.futures = futures
        self.source = source
        training = TrainingRoutes(streams, self.records, sessions, futures, limits)
        sampling = SamplingRoutes(client, streams, self.records, sessions, futures, limits)
        v1 = "/api/v1/"
        self.routes: dict[tuple[str, str], Route] = {
            ("POST", v1 + "client/config"): self.client_config,
            ("POST", v1 + "client/dynamic_config"): self.dynamic_config,
            ("POST", v1 + "create_session"): self.create_session,
            ("POST", v1 + "session_heartbeat"): self.session_heartbeat,
            ("POST", v1 + "telemetry"): lambda _: json_reply({"status": "accepted"}),
            ("GET", v1 + "get_server_capabilities"): self.capabilities,
            ("POST", v1 + "get_info"): self.get_info,
            ("POST", v1 + "weights_info"): self.weights_info,
            ("POST", v1 + "create_model"): training.create_model,
            ("POST", v1 + "forward_backward"): training.forward_backward,
            ("POST", v1 + "optim_step"): training.optim_step,
            ("POST", v1 + "save_weights_for_sampler"): training.save_for_sampler,
            ("POST", v1 + "save_weights"): training.save_state,
            ("POST", v1 + "load_weights"): training.load_weights,
            ("POST", v1 + "unload_model"): training.unload_model,
            ("POST", v1 + "create_sampling_session"): sampling.create_sampling_session,
            ("POST", v1 + "asample"): sampling.asample,
            ("POST", v1 + "retrieve_future"): self.retrieve_future,
        }
        self.param_routes: list[tuple[str, re.Pattern[str], Route]] = [
            ("GET", re.compile(r"^/api/v1/samplers/([^/]+)$"), sampling.get_sampler),
            ("POST", re.compile(r"^/api/v1/sessions/([^/]+)/finish$"), self.finish_session),
        ]

    # ---- the HTTP contract --------------------------------------------------------------------

    def handle(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        length: int,
        read: Callable[[int], bytes],
    ) -> Reply:
        """Answer one request (``read(n)`` reads the body; it is not read when refused)."""
        path = path.split("?", 1)[0]
        try:
            if path == "/api/v1/healthz":
                return json_reply({"status": "ok"})
            route, param = self._route(method, path)
            tenant = self.tenants.authenticate(headers)
            if length > self.limits.max_request_bytes:
                raise HttpError(
                    413,
                    f"request body of {length} bytes is over the limit of "
                    f"{self.limits.max_request_bytes}; send fewer or shorter datums",
                )
            return route(Call(tenant, headers, read(length) if length else b"", param))
        except HttpError as err:
            return error_reply(err.status, err.message, err.field)
        except redis.RedisError as err:
            # the SDK retries a 5xx at once: the pause keeps an outage from becoming a busy loop
            log.warning("%s %s: Redis unavailable: %s", method, path, err)
            time.sleep(OUTAGE_PAUSE_S)
            return error_reply(503, f"the gateway cannot reach its Redis ({err}); retry")
        except Exception as err:  # a bug: answer 500 with the message, keep serving
            log.exception("%s %s failed", method, path)
            return error_reply(500, f"internal error: {type(err).__name__}: {err}")

    def _route(self, method: str, path: str) -> tuple[Route, str]:
        route = self.routes.get((method, path))
        if route is not None:
            return route, ""
        for m, pattern, handler in self.param_routes:
            match = pattern.match(path)
            if m == method and match:
                return handler, match.group(1)
        raise HttpError(404, f"no route {method} {path} on this gateway (see docs/TINKER.md)")

    # ---- start-up -----------------------------------------------------------------------------

    def client_config(self, call: Call) -> Reply:
        return json_reply(
            {
                "pjwt_auth_enabled": False,
                "credential_default_source": "api_key",
                "parallel_fwdbwd_chunks": False,
                "proto_compress_fwdbwd": False,
                "fwdbwd_max_chunk_bytes_count": self.limits.fwdbwd_chunk_bytes,
                "use_pyqwest_transport": False,
                "sample_use_retrieve_futures": False,
                "sample_max_concurrent_requests": self.limits.max_inflight,
                "custom_loss_server_side": False,
                "sample_join_sampling_session": False,
            }
        )

    def dynamic_config(self, call: Call) -> Reply:
        return json_reply({"refresh_interval_sec": 300, "sample_cancel_enabled": False})

    def create_session(self, call: Call) -> Reply:
        wire.decode(call.body, wire.CreateSession)
        session_id = self.sessions.create(call.tenant)
        return json_reply({"type": "create_session", "session_id": session_id})

    def session_heartbeat(self, call: Call) -> Reply:
        body = wire.decode(call.body, wire.SessionRef)
        self.sessions.heartbeat(call.tenant, body.session_id)
        return json_reply({"type": "session_heartbeat"})

    def finish_session(self, call: Call) -> Reply:
        self.sessions.finish(call.tenant, call.param)
        return json_reply({})

    def capabilities(self, call: Call) -> Reply:
        model = {"model_name": self.limits.base_model, "trainable": True, "sampleable": True}
        if self.limits.max_context_length:
            model["max_context_length"] = self.limits.max_context_length
        return json_reply({"supported_models": [model]})

    def get_info(self, call: Call) -> Reply:
        body = wire.decode(call.body, wire.ModelRef)
        record = self.records.model(call.tenant, body.model_id, live=False)
        base = self.limits.base_model
        return json_reply(
            {
                "type": "get_info",
                "model_id": record.client_id,
                "model_data": {"model_name": base, "tokenizer_id": self.limits.tokenizer_id},
                "is_lora": True,
                "lora_rank": record.rank,
                "model_name": base,
            }
        )

    def weights_info(self, call: Call) -> Reply:
        body = wire.decode(call.body, wire.WeightsInfo)
        path = self.records.path(call.tenant, body.tinker_path, field="tinker_path")
        record = self.records.model(call.tenant, path.model, live=False)
        return json_reply(
            {"base_model": self.limits.base_model, "is_lora": True, "lora_rank": record.rank}
        )

    # ---- training -----------------------------------------------------------------------------

    def retrieve_future(self, call: Call) -> Reply:
        body = wire.decode(call.body, wire.RetrieveFuture)
        proto = PROTOBUF in call.headers.get("accept", "")
        return self.futures.retrieve(call.tenant, body.request_id, proto=proto)
