"""What every route gets: the authenticated request (:class:`Call`) and the operator's settings
(:class:`Limits`, flat values the process builds from its config)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from orchestrator.gateway.render import Reply


@dataclass(frozen=True)
class Call:
    """One authenticated request: its tenant, headers (lower-case names), body, path parameter."""

    tenant: str
    headers: Mapping[str, str]
    body: bytes
    param: str = ""


Route = Callable[[Call], Reply]


@dataclass(frozen=True)
class Limits:
    """The operator's settings the routes apply (flat values from the gateway config)."""

    base_model: str
    tokenizer_id: str
    max_context_length: int
    max_rank: int
    lora_alpha: float
    max_steps: int
    max_request_bytes: int
    default_max_tokens: int
    fwdbwd_chunk_bytes: int
    max_inflight: int
