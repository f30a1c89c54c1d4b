"""The gateway process's one frozen config: the shared bus config plus the gateway's own fields.

Loaded like every process's (:func:`events.config.load`: defaults < ``--config`` file <
``MULTILORA_GATEWAY_<FIELD>`` / ``MULTILORA_<FIELD>`` < flags), so ``MULTILORA_BASE_MODEL`` and
``MULTILORA_MAX_RANK`` set once for a deployment reach the trainer and the gateway alike. Only
:func:`orchestrator.gateway.server.main` reads it; components get flat parameters.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated

import msgspec

from events.config import BusConfig, Port, Positive, load

NonNegativeFloat = Annotated[float, msgspec.Meta(ge=0)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]


def _doc(text: str, *flags: str) -> msgspec.Meta:
    return msgspec.Meta(description=text, extra={"flags": flags} if flags else {})


class GatewayConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything ``multilora gateway`` needs.

    ``base_model`` is the trainer's base model name (what ``create_model`` must ask for and
    ``get_server_capabilities`` lists); ``max_rank`` the trainer's slot rank. Every client model is
    registered with ``alpha = lora_alpha`` (fixed, like Tinker's, so a rank change does not rescale
    the learning rate) and a budget of ``max_steps`` optimizer steps. API keys map to tenants:
    ``--api-key KEY=TENANT`` (repeatable) and/or ``api_keys_file`` (a JSON/YAML/TOML mapping
    ``KEY: TENANT``); with none, every request is refused with 401. A session not heard from for
    ``session_lease_s`` releases its models. Per tenant at most ``max_inflight`` futures are pending
    (429 beyond) and one request body is at most ``max_request_bytes`` (413 beyond).
    ``long_poll_s`` bounds how long ``retrieve_future`` holds a request for a pending future before
    answering "try again". ``fwdbwd_chunk_bytes`` is the SDK's chunk size for ``forward_backward``
    (sent in the client config) so one chunk's event stays under the bus's 1 MiB event limit.
    """

    bus: BusConfig = BusConfig()
    host: Annotated[str, _doc("address to listen on")] = "127.0.0.1"
    port: Annotated[Port, _doc("port to listen on (0: an ephemeral one)")] = 8100
    base_model: Annotated[str, _doc("the trainer's base model name (its --base-model)")] = ""
    tokenizer_id: Annotated[str, _doc("tokenizer the SDK loads (empty: base_model)")] = ""
    max_context_length: Annotated[int, msgspec.Meta(ge=0, description="0: not reported")] = 0
    max_rank: Annotated[Positive, _doc("largest LoRA rank (the trainer's --max-rank)")] = 64
    lora_alpha: Annotated[PositiveFloat, _doc("LoRA alpha of every client model")] = 32.0
    max_steps: Annotated[Positive, _doc("optimizer-step budget of a client model")] = 100_000
    api_keys: Annotated[dict[str, str], _doc("KEY=TENANT (repeatable)", "--api-key")] = (
        msgspec.field(default_factory=dict)
    )
    api_keys_file: Annotated[str, _doc("JSON/YAML/TOML mapping of API key to tenant")] = ""
    session_lease_s: Annotated[
        PositiveFloat, _doc("a session silent this long releases its models, s")
    ] = 300.0
    sweep_interval_s: Annotated[PositiveFloat, _doc("how often expired sessions are swept, s")] = (
        10.0
    )
    max_inflight: Annotated[Positive, _doc("pending futures per tenant (429 beyond)")] = 256
    max_request_bytes: Annotated[Positive, _doc("largest request body (413 beyond)")] = 4 << 20
    long_poll_s: Annotated[
        NonNegativeFloat, _doc("longest hold of retrieve_future on a pending future, s")
    ] = 5.0
    default_max_tokens: Annotated[Positive, _doc("max_tokens of a sample that sets none")] = 256
    fwdbwd_chunk_bytes: Annotated[
        Positive, _doc("the SDK's forward_backward chunk size (estimated proto bytes)")
    ] = 200_000

    def __post_init__(self) -> None:
        if not self.base_model:
            raise ValueError(
                "base_model is empty; pass --base-model with the trainer's base model name "
                "(the trainer's --base-model, default its model folder's name)"
            )


def load_config(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> GatewayConfig:
    """Defaults < file < env < flags into a validated :class:`GatewayConfig`."""
    return load(
        GatewayConfig,
        role="gateway",
        argv=argv,
        environ=environ,
        prog="multilora gateway",
        description="A Tinker-compatible HTTP gateway: SDK calls become events on the bus.",
    )
