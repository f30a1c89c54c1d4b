"""The SDK's JSON request bodies, decoded once at the edge, and the settings they map to.

Field names and defaults follow ``tinker==0.38.0``'s ``tinker/types`` (the protobuf
``forward_backward`` body is :mod:`orchestrator.gateway.protowire`). Unknown fields are ignored,
so a newer SDK that adds one keeps working; a field this gateway knows but cannot honour at a
non-neutral value (top-k log-probs, stop token ids, a non-Adam optimizer, ...) is refused with a
400 naming it — silently sampling or training differently from what was asked is worse than an
error. A malformed body is a 400 whose message names the JSON path (msgspec's
``Expected `int`, got `str` - at `$.lora_config.rank```).
"""

from __future__ import annotations

import math
import random
import re
from typing import Any, TypeVar

import msgspec

from events.specs import MAX_GROUP_SIZE, MAX_NEW_TOKENS, SamplingSpec
from orchestrator.gateway.errors import HttpError, bad_request

T = TypeVar("T")


def decode(body: bytes, kind: type[T]) -> T:
    """``body`` (JSON) as ``kind``; a 400 naming the field on anything malformed."""
    try:
        return msgspec.json.decode(body or b"{}", type=kind)
    except msgspec.ValidationError as err:
        match = re.search(r"at `\$\.?([^`]*)`", str(err))
        field = match.group(1) if match else ""
        raise HttpError(400, f"invalid body: {err}", field=field) from None
    except msgspec.DecodeError as err:
        raise HttpError(400, f"body is not valid JSON: {err}", field="body") from None


class _Body(msgspec.Struct, frozen=True, kw_only=True):
    pass


# --- sessions -----------------------------------------------------------------------------------


class CreateSession(_Body, frozen=True, kw_only=True):
    tags: list[str] = msgspec.field(default_factory=list)
    sdk_version: str = ""


class SessionRef(_Body, frozen=True, kw_only=True):
    session_id: str


# --- models -------------------------------------------------------------------------------------


class LoraConfig(_Body, frozen=True, kw_only=True):
    rank: int
    seed: int | None = None
    train_unembed: bool = True
    train_mlp: bool = True
    train_attn: bool = True


class OptimizerConfig(_Body, frozen=True, kw_only=True):
    type: str = "adamw"


class CreateModel(_Body, frozen=True, kw_only=True):
    session_id: str
    model_seq_id: int
    base_model: str
    lora_config: LoraConfig | None = None
    optimizer_config: OptimizerConfig = OptimizerConfig()


class ModelRef(_Body, frozen=True, kw_only=True):
    model_id: str


class AdamParams(_Body, frozen=True, kw_only=True):
    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0


class OptimStep(_Body, frozen=True, kw_only=True):
    model_id: str
    seq_id: int | None = None
    adam_params: AdamParams | None = None
    optim_params: AdamParams | None = None
    optimizer_params: dict[str, Any] | None = None

    def adam(self) -> AdamParams:
        if self.optimizer_params is not None:
            kind = self.optimizer_params.get("type", "?")
            raise bad_request("optimizer_params", f"optimizer {kind!r} is not supported; use Adam")
        return self.adam_params or self.optim_params or AdamParams()


class SaveWeights(_Body, frozen=True, kw_only=True):
    """``save_weights`` (``save_state``) and ``save_weights_for_sampler``: ``path`` is the
    client's *name* for the checkpoint; without one (``save_weights_and_get_sampling_client``)
    the answer is a sampling session instead."""

    model_id: str
    path: str | None = None
    seq_id: int | None = None
    sampling_session_seq_id: int | None = None
    kind: str = "snapshot"


class LoadWeights(_Body, frozen=True, kw_only=True):
    """``load_state*`` (``model_id``, ``seq_id``) or ``create_training_client_from_state*``
    (``session_id``, ``model_seq_id``: the model to create; no ``model_id``)."""

    model_id: str | None = None
    path: str
    optimizer: bool = False
    seq_id: int | None = None
    session_id: str | None = None
    model_seq_id: int | None = None
    base_model: str | None = None
    optimizer_config: OptimizerConfig | None = None
    weights_access_token: str | None = None


class CreateSamplingSession(_Body, frozen=True, kw_only=True):
    session_id: str
    sampling_session_seq_id: int
    base_model: str | None = None
    model_path: str | None = None


# --- sampling -----------------------------------------------------------------------------------


class Chunk(_Body, frozen=True, kw_only=True):
    type: str = "encoded_text"
    tokens: list[int] = msgspec.field(default_factory=list)


class ModelInput(_Body, frozen=True, kw_only=True):
    chunks: list[Chunk]

    def token_ids(self, field: str) -> tuple[int, ...]:
        kinds = [c.type for c in self.chunks if c.type != "encoded_text"]
        if kinds:
            raise bad_request(field, f"{kinds[0]} chunks are not supported; send token chunks")
        tokens = tuple(t for c in self.chunks for t in c.tokens)
        if not tokens:
            raise bad_request(field, "is empty; give at least one token")
        return tokens


class SamplingParams(_Body, frozen=True, kw_only=True):
    max_tokens: int | None = None
    seed: int | None = None
    stop: str | list[str | int] | None = None
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0


class Sample(_Body, frozen=True, kw_only=True):
    num_samples: int = 1
    prompt: ModelInput
    sampling_params: SamplingParams
    base_model: str | None = None
    model_path: str | None = None
    sampling_session_id: str | None = None
    seq_id: int | None = None
    prompt_logprobs: bool | None = None
    topk_prompt_logprobs: int = 0
    topk_sample_logprobs: int = 0
    target_prompt_logprobs: dict[str, Any] | None = None
    prompt_alt_tokens_k: int = 0
    prompt_logprobs_last_n: int | None = None
    record_stability_info: bool | None = None

    def check_supported(self) -> None:
        """400 for the SDK's sampling features this gateway does not implement."""
        unsupported = {
            "topk_prompt_logprobs": self.topk_prompt_logprobs != 0,
            "topk_sample_logprobs": self.topk_sample_logprobs != 0,
            "target_prompt_logprobs": self.target_prompt_logprobs is not None,
            "prompt_alt_tokens_k": self.prompt_alt_tokens_k != 0,
            "prompt_logprobs_last_n": self.prompt_logprobs_last_n is not None,
            "record_stability_info": bool(self.record_stability_info),
        }
        for field, asked in unsupported.items():
            if asked:
                raise bad_request(field, "is not supported by this gateway; leave it unset")
        if not 1 <= self.num_samples <= MAX_GROUP_SIZE:
            raise bad_request("num_samples", f"{self.num_samples}; use 1..{MAX_GROUP_SIZE}")


def sampling_spec(params: SamplingParams, default_max_tokens: int) -> tuple[SamplingSpec, int]:
    """Tinker's ``SamplingParams`` as the bus's :class:`SamplingSpec`, plus the seed (a random
    one when the client gives none). ``stop`` strings map one to one; stop *token ids* cannot be
    carried (400). ``stop=[]`` (Tinker: "no stop tokens, not even EOS") gives no stop strings,
    but the end-of-sequence token still ends a completion."""
    stop = [params.stop] if isinstance(params.stop, str) else list(params.stop or [])
    if any(not isinstance(s, str) for s in stop):
        raise bad_request(
            "sampling_params.stop", "stop token ids are not supported; give stop strings"
        )
    if any(not s for s in stop):
        raise bad_request("sampling_params.stop", "a stop string is empty")
    max_tokens = default_max_tokens if params.max_tokens is None else params.max_tokens
    checks = [
        ("max_tokens", max_tokens, 1 <= max_tokens <= MAX_NEW_TOKENS, f"use 1..{MAX_NEW_TOKENS}"),
        ("temperature", params.temperature, params.temperature >= 0, "use >= 0 (0: greedy)"),
        ("top_p", params.top_p, 0 < params.top_p <= 1, "use 0 < top_p <= 1"),
        ("top_k", params.top_k, params.top_k == -1 or params.top_k >= 1, "use -1 or >= 1"),
    ]
    for field, value, ok, fix in checks:
        if not ok or (isinstance(value, float) and not math.isfinite(value)):
            raise bad_request(f"sampling_params.{field}", f"{value!r} is invalid; {fix}")
    spec = SamplingSpec(
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        max_new_tokens=max_tokens,
        stop=tuple(str(s) for s in stop),
    )
    seed = params.seed if params.seed is not None else random.getrandbits(31)
    return spec, seed


# --- futures and weights --------------------------------------------------------------------------


class RetrieveFuture(_Body, frozen=True, kw_only=True):
    request_id: str
    allow_metadata_only: bool = False


class WeightsInfo(_Body, frozen=True, kw_only=True):
    tinker_path: str
