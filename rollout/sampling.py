"""Pure sampling math of the embedded engine: parameters, temperature, top-k, top-p, draws, stops.

Everything here is a pure function of its inputs (no model, no tokenizer), so it is unit tested
on hand-written logits.

**Which log-probability is returned.** SGLang's sampler, by default, reports for each sampled token
``log softmax(logits / temperature)`` — the temperature-scaled distribution *before* top-k / top-p
truncation (``SGLANG_RETURN_ORIGINAL_LOGPROB=1`` switches it to the raw ``log softmax(logits)``);
for greedy requests (temperature 0) it reports ``log softmax(logits)``. We return exactly that, so
the embedded engine and an SGLang server produce the same numbers and the trainer can recompute
the behaviour-policy log-prob from the same logits with one formula::

    logprob_t = log_softmax(logits_t / T)[token_t]      (T := 1 when greedy, T < 1e-6)

The greedy rule (``T < GREEDY_TEMPERATURE``, log-probs at ``T := 1``) has one home,
:data:`events.specs.GREEDY_TEMPERATURE` / :attr:`events.specs.SamplingSpec.logprob_temperature`,
which the trainer uses too; the tensor functions here apply that rule row-wise.

The truncated sampling distribution differs from it only when ``top_k`` / ``top_p`` actually
remove tokens; RL recipes that train on these log-probs run with ``top_k=-1, top_p=1``.

**Draws.** Each row owns a ``torch.Generator`` seeded from its request seed and draws exactly one
uniform number per decoding step (even greedy rows draw, so the stream never depends on the
parameters of other rows). A token is the inverse-CDF pick of that uniform, in vocabulary order,
under the row's filtered, renormalised distribution, so a row's tokens depend only on its own
logits and seed — never on which other rows share its batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
import torch

from events.errors import ConfigError
from events.specs import GREEDY_TEMPERATURE, SamplingSpec


class SamplingParamError(ConfigError):
    """One sampling parameter is invalid; ``field`` names it (the HTTP layer reports it)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"sampling_params.{field}: {message}")
        self.field = field


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Per-row sampling parameters (SGLang's ``sampling_params`` subset, same defaults).

    ``temperature=0`` is greedy. ``top_k=-1`` keeps the whole vocabulary. ``stop`` strings end a
    row when its decoded text contains one (the text is cut before it; the tokens are kept).
    ``stop_token_ids`` end a row like EOS does; EOS ends it unless ``ignore_eos``. ``seed`` fixes
    the row's draws (``None``: the engine picks one). Validated on construction.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 128
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (self.temperature >= 0.0 and self.temperature < float("inf")):
            raise SamplingParamError(
                "temperature", f"must be finite and >= 0, got {self.temperature}"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingParamError("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k != -1 and self.top_k < 1:
            raise SamplingParamError("top_k", f"must be -1 (off) or >= 1, got {self.top_k}")
        if self.max_new_tokens < 0:  # 0: no new token, the prompt only (scoring), as SGLang
            raise SamplingParamError("max_new_tokens", f"must be >= 0, got {self.max_new_tokens}")
        if any(not s for s in self.stop):
            raise SamplingParamError("stop", f"stop strings must be non-empty, got {self.stop!r}")
        if any(t < 0 for t in self.stop_token_ids):
            raise SamplingParamError(
                "stop_token_ids", f"token ids must be >= 0, got {self.stop_token_ids!r}"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @classmethod
    def from_spec(cls, spec: SamplingSpec, *, seed: int | None = None) -> SamplingParams:
        """The parameters an adapter registration asked for, with this row's seed."""
        return cls(
            temperature=spec.temperature,
            top_p=spec.top_p,
            top_k=spec.top_k,
            max_new_tokens=spec.max_new_tokens,
            stop=tuple(spec.stop),
            seed=seed,
        )

    def to_sglang(self) -> dict[str, Any]:
        """SGLang's wire form (``seed`` travels as ``sampling_seed``; unset fields are left out)."""
        body: dict[str, Any] = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "max_new_tokens": self.max_new_tokens,
        }
        if self.stop:
            body["stop"] = list(self.stop)
        if self.stop_token_ids:
            body["stop_token_ids"] = list(self.stop_token_ids)
        if self.ignore_eos:
            body["ignore_eos"] = True
        if not self.skip_special_tokens:
            body["skip_special_tokens"] = False
        if self.seed is not None:
            body["sampling_seed"] = self.seed
        return body


def effective_temperature_B(temperature_B: torch.Tensor) -> torch.Tensor:
    """Temperatures with greedy rows (T < 1e-6) set to 1, the divisor used for their log-probs."""
    return torch.where(
        temperature_B < GREEDY_TEMPERATURE, torch.ones_like(temperature_B), temperature_B
    )


def policy_logprobs_B_V(logits_B_V: torch.Tensor, temperature_B: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits / T)`` per row in float32 (T := 1 for greedy rows); see module doc."""
    scaled = logits_B_V.float() / effective_temperature_B(temperature_B.float())[:, None]
    return torch.log_softmax(scaled, dim=-1)


def keep_mask_B_V(
    logprobs_B_V: torch.Tensor, top_k_B: torch.Tensor, top_p_B: torch.Tensor
) -> torch.Tensor:
    """Which tokens survive top-k and top-p, in vocabulary order.

    A token is kept when its rank (by descending probability) is below ``top_k`` (``-1``: no
    limit) and the probability mass ranked before it is below ``top_p``; the most likely token
    is always kept. Rows with ``top_k=-1, top_p=1`` keep everything.
    """
    sorted_B_V, order_B_V = torch.sort(logprobs_B_V, dim=-1, descending=True)
    probs_B_V = sorted_B_V.exp()
    vocab = probs_B_V.shape[-1]
    rank_V = torch.arange(vocab, device=probs_B_V.device)
    k_B = torch.where(top_k_B < 1, torch.full_like(top_k_B, vocab), top_k_B)
    mass_before_B_V = probs_B_V.cumsum(dim=-1) - probs_B_V
    keep_sorted_B_V = (rank_V[None, :] < k_B[:, None]) & (mass_before_B_V < top_p_B[:, None])
    keep_sorted_B_V[:, 0] = True
    return torch.zeros_like(keep_sorted_B_V).scatter(-1, order_B_V, keep_sorted_B_V)


def sample_tokens_B(
    logits_B_V: torch.Tensor,
    temperature_B: torch.Tensor,
    top_k_B: torch.Tensor,
    top_p_B: torch.Tensor,
    uniform_B: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row; return ``(tokens_B, logprobs_B)``.

    Greedy rows take ``argmax(logits)`` (first index on ties, as HF ``generate``). Other rows take
    the inverse-CDF pick of ``uniform_B`` (in [0, 1)), in vocabulary order, under
    ``softmax(logits / T)`` restricted to :func:`keep_mask_B_V`. Vocabulary order (not sorted
    order) keeps a row's draw independent of whether its batch-mates filter. ``logprobs_B`` are
    the policy log-probs of the chosen tokens (:func:`policy_logprobs_B_V`).
    """
    device = logits_B_V.device
    temperature_B, top_k_B, top_p_B = (t.to(device) for t in (temperature_B, top_k_B, top_p_B))
    logprobs_B_V = policy_logprobs_B_V(logits_B_V, temperature_B)
    greedy_B = temperature_B < GREEDY_TEMPERATURE
    tokens_B = logits_B_V.argmax(dim=-1)
    if not bool(greedy_B.all()):
        filtered = bool(((top_k_B > 0) | (top_p_B < 1.0)).any())
        drawn_B = _drawn_tokens_B(logprobs_B_V, top_k_B, top_p_B, uniform_B, filtered=filtered)
        tokens_B = torch.where(greedy_B, tokens_B, drawn_B)
    return tokens_B, logprobs_B_V.gather(-1, tokens_B[:, None]).squeeze(-1)


def _drawn_tokens_B(
    logprobs_B_V: torch.Tensor,
    top_k_B: torch.Tensor,
    top_p_B: torch.Tensor,
    uniform_B: torch.Tensor,
    *,
    filtered: bool,
) -> torch.Tensor:
    """Each row's inverse-CDF pick of ``uniform_B`` in vocabulary order (``filtered``: under
    :func:`keep_mask_B_V`); the draw of :func:`sample_tokens_B` and its static twin."""
    probs_B_V = logprobs_B_V.exp()
    if filtered:
        probs_B_V = probs_B_V * keep_mask_B_V(logprobs_B_V, top_k_B, top_p_B)
    cdf_B_V = probs_B_V.cumsum(dim=-1)
    target_B = uniform_B.to(cdf_B_V)[:, None] * cdf_B_V[:, -1:]
    vocab = probs_B_V.shape[-1]
    last_kept_B = vocab - 1 - (probs_B_V > 0).flip(-1).int().argmax(dim=-1, keepdim=True)
    pos_B = torch.searchsorted(cdf_B_V, target_B, right=True).clamp(max=last_kept_B)
    return pos_B.squeeze(-1)


def sample_tokens_static_B(
    logits_B_V: torch.Tensor,
    temperature_B: torch.Tensor,
    top_k_B: torch.Tensor,
    top_p_B: torch.Tensor,
    uniform_B: torch.Tensor,
    *,
    filtered: bool,
    greedy_only: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sample_tokens_B` without a host synchronisation (CUDA-graph safe): every row's
    greedy and drawn tokens are both computed and the row's rule picks one. ``filtered``: some
    row uses top-k / top-p (decided by the caller, once per batch); rows that do not filter keep
    every token either way, so the tokens equal :func:`sample_tokens_B`'s exactly.
    ``greedy_only``: every row is greedy (the caller knows), so no draw is computed.
    """
    logprobs_B_V = policy_logprobs_B_V(logits_B_V, temperature_B)
    tokens_B = logits_B_V.argmax(dim=-1)
    if not greedy_only:
        greedy_B = temperature_B < GREEDY_TEMPERATURE
        drawn_B = _drawn_tokens_B(logprobs_B_V, top_k_B, top_p_B, uniform_B, filtered=filtered)
        tokens_B = torch.where(greedy_B, tokens_B, drawn_B)
    return tokens_B, logprobs_B_V.gather(-1, tokens_B[:, None]).squeeze(-1)


def find_stop(text: str, stops: Sequence[str], search_from: int = 0) -> tuple[int, str] | None:
    """The earliest stop string occurring in ``text`` at or after ``search_from``.

    Returns ``(index, stop)`` (the longest stop wins a tie at the same index), or ``None``.
    """
    best: tuple[int, str] | None = None
    for stop in stops:
        idx = text.find(stop, max(0, search_from))
        if idx >= 0 and (
            best is None or idx < best[0] or (idx == best[0] and len(stop) > len(best[1]))
        ):
            best = (idx, stop)
    return best


def trim_at_stop(text: str, stop: str) -> str:
    """``text`` cut before the first occurrence of ``stop`` (unchanged when absent)."""
    idx = text.find(stop)
    return text if idx < 0 else text[:idx]
