"""The built-in rewards and the registry that holds them (:func:`builtin_registry`).

Each built-in follows :class:`rollout.rewards.RewardFn` and checks its parameters in
``validate_params`` (called by :meth:`rollout.rewards.RewardComposite.from_specs` when an
adapter's rewards are resolved, so a typo fails before any sample is generated). Value ranges
and parameters:

=================  ========  =============================================================
``math``           [0, 1]    ``fallback`` (bool, True), ``rel_tol`` (float, 0.0); see
                             :mod:`rollout.reward_math`
``exact``          [0, 1]    ``case_sensitive`` (bool, True); both sides stripped
``regex``          [0, 1]    ``pattern`` (str, required), ``mode`` ("search"|"fullmatch"),
                             ``ignore_case`` (bool, False); ``.`` matches newlines
``format``         [0, 1]    ``style`` ("think_answer"|"answer_tag"|"boxed"|"gsm8k") or
                             ``pattern`` (str, full match of the stripped completion)
``length_penalty`` [-1, 0]   ``max_chars`` (int, required), ``buffer_chars`` (int,
                             max_chars // 4): DAPO's soft overlong penalty, in characters
``reasoning_gym``  [0, 1]    ``extract`` ("auto"|"answer_tag"|"first_line"|"full"); see
                             :class:`ReasoningGymReward`
=================  ========  =============================================================
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import msgspec

from rollout import reward_math
from rollout.data import PromptItem
from rollout.rewards import Params, RewardError, RewardRegistry


def check_params(
    name: str, params: Params, schema: Mapping[str, type], required: Sequence[str] = ()
) -> None:
    """Raise :class:`RewardError` for unknown, missing or mistyped ``params``.

    ``schema`` maps each allowed parameter to its type; ``float`` also accepts ints, and bools
    are never taken for numbers.
    """
    unknown = sorted(set(params) - set(schema))
    if unknown:
        raise RewardError(f"reward {name!r}: unknown params {unknown}; allowed: {sorted(schema)}")
    missing = [k for k in required if k not in params]
    if missing:
        raise RewardError(f"reward {name!r}: missing required params {missing}")
    for key, value in params.items():
        want = schema[key]
        ok = isinstance(value, want) and not (want is not bool and isinstance(value, bool))
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise RewardError(f"reward {name!r}: param {key!r}={value!r} must be {want.__name__}")


def _choice(name: str, key: str, value: object, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise RewardError(f"reward {name!r}: {key}={value!r} must be one of {list(allowed)}")


class MathReward:
    """1.0 if the completion's answer equals the label's (see :mod:`rollout.reward_math`)."""

    def validate_params(self, params: Params) -> None:
        check_params("math", params, {"fallback": bool, "rel_tol": float})
        if float(params.get("rel_tol", 0.0)) < 0:
            raise RewardError(f"reward 'math': rel_tol must be >= 0, got {params['rel_tol']}")

    def __call__(self, completion: str, item: PromptItem, **params: Any) -> float:
        if not item.label.strip():
            raise RewardError(f"math reward: item {item.index} has an empty label")
        predicted = reward_math.extract_answer(completion, fallback=params.get("fallback", True))
        if predicted is None:
            return 0.0
        reference = reward_math.reference_answer(item.label)
        rel_tol = float(params.get("rel_tol", 0.0))
        return float(reward_math.answers_match(predicted, reference, rel_tol=rel_tol))


class ExactReward:
    """1.0 if the stripped completion equals the stripped label."""

    def validate_params(self, params: Params) -> None:
        check_params("exact", params, {"case_sensitive": bool})

    def __call__(self, completion: str, item: PromptItem, **params: Any) -> float:
        a, b = completion.strip(), item.label.strip()
        if not params.get("case_sensitive", True):
            a, b = a.casefold(), b.casefold()
        return float(a == b)


class RegexReward:
    """1.0 if ``pattern`` matches the completion (``re.search`` or ``re.fullmatch``)."""

    def validate_params(self, params: Params) -> None:
        check_params(
            "regex", params, {"pattern": str, "mode": str, "ignore_case": bool}, ["pattern"]
        )
        _choice("regex", "mode", params.get("mode", "search"), ("search", "fullmatch"))
        _compile("regex", str(params["pattern"]), bool(params.get("ignore_case", False)))

    def __call__(self, completion: str, item: PromptItem, **params: Any) -> float:
        rx = _compile("regex", params["pattern"], params.get("ignore_case", False))
        match = rx.fullmatch if params.get("mode", "search") == "fullmatch" else rx.search
        return float(match(completion) is not None)


def _compile(name: str, pattern: str, ignore_case: bool) -> re.Pattern[str]:
    """Compiled with DOTALL (``.`` crosses lines); ``re`` caches compiled patterns itself."""
    try:
        return re.compile(pattern, re.DOTALL | (re.IGNORECASE if ignore_case else 0))
    except re.error as err:
        raise RewardError(f"reward {name!r}: pattern {pattern!r} does not compile: {err}") from err


FORMAT_STYLES: dict[str, str] = {
    "think_answer": r"<think>.*?</think>\s*<answer>\s*\S.*?</answer>",
    "answer_tag": r".*<answer>\s*\S.*?</answer>",
    "boxed": r".*\\boxed\{.*\S.*\}.*",
    "gsm8k": r".*####[ \t]*\S[^\n]*",
}
"""Format presets: each must match the whole stripped completion."""


class FormatReward:
    """1.0 if the stripped completion follows a format: a preset ``style`` or a ``pattern``."""

    def validate_params(self, params: Params) -> None:
        check_params("format", params, {"style": str, "pattern": str})
        if "style" in params and "pattern" in params:
            raise RewardError("reward 'format': give either style or pattern, not both")
        if "pattern" in params:
            _compile("format", str(params["pattern"]), False)
        else:
            _choice("format", "style", params.get("style", "answer_tag"), tuple(FORMAT_STYLES))

    def __call__(self, completion: str, item: PromptItem, **params: Any) -> float:
        pattern = params.get("pattern") or FORMAT_STYLES[params.get("style", "answer_tag")]
        return float(_compile("format", pattern, False).fullmatch(completion.strip()) is not None)


class LengthPenaltyReward:
    """DAPO's soft overlong penalty on the completion length ``L`` in characters.

    With ``start = max_chars - buffer_chars``: 0 for ``L <= start``, ``(start - L) / buffer``
    for ``start < L <= max_chars`` (linear down to -1), -1 beyond ``max_chars``. Characters, not
    tokens: the reward protocol sees text only.
    """

    def validate_params(self, params: Params) -> None:
        check_params(
            "length_penalty", params, {"max_chars": int, "buffer_chars": int}, ["max_chars"]
        )
        max_chars, buffer = self._limits(params)
        if max_chars <= 0 or not 0 < buffer <= max_chars:
            raise RewardError(
                f"reward 'length_penalty': need max_chars > 0 and 0 < buffer_chars <= max_chars, "
                f"got max_chars={max_chars}, buffer_chars={buffer}"
            )

    @staticmethod
    def _limits(params: Params) -> tuple[int, int]:
        max_chars = int(params["max_chars"])
        return max_chars, int(params.get("buffer_chars", max(1, max_chars // 4)))

    def __call__(self, completion: str, item: PromptItem, **params: Any) -> float:
        max_chars, buffer = self._limits(params)
        start, length = max_chars - buffer, len(completion)
        if length <= start:
            return 0.0
        return -1.0 if length > max_chars else (start - length) / buffer


_ANSWER_TAG_RE = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL)
GYM_EXTRACT_MODES = ("auto", "answer_tag", "first_line", "full")


def extract_gym_answer(completion: str, mode: str = "auto") -> str:
    """The answer a completion gives to a reasoning-gym question.

    ``answer_tag``: the last ``<answer>...</answer>`` (reasoning-gym's own prompt convention),
    else "". ``first_line``: the first non-empty line, stripped, minus one trailing period
    ("-4." -> "-4"; a decimal point inside the line is kept). ``full``: the stripped text.
    ``auto`` (default): the answer tag when present, else the first line.
    """
    if mode in ("auto", "answer_tag"):
        tagged = _ANSWER_TAG_RE.findall(completion)
        if tagged:
            return str(tagged[-1])
        if mode == "answer_tag":
            return ""
    if mode == "full":
        return completion.strip()
    line = next((ln.strip() for ln in completion.splitlines() if ln.strip()), "")
    return line[:-1].rstrip() if line.endswith(".") else line


class ReasoningGymReward:
    """The dataset's own verifier: ``dataset.score_answer(answer, entry)`` on the extracted answer.

    Items from a ``reasoning_gym`` data source carry ``metadata["reasoning_gym"]`` (name, size,
    seed, config, index): the dataset is rebuilt with that config and the entry regenerated, so
    the verifier sees the original objects (a JSON round trip changes tuples to lists, which
    breaks e.g. ``arc_agi``'s verifier). Items from files may instead carry a reasoning-gym entry
    under ``metadata["entry"]``; it is scored with the default-config verifier of
    ``entry["metadata"]["source_dataset"]``. Built datasets and regenerated entries are cached in
    this instance (bounded LRU), because a group scores the same item ``group_size`` times.
    """

    def __init__(self, *, max_datasets: int = 16, max_entries: int = 4096) -> None:
        self._dataset = functools.lru_cache(maxsize=max_datasets)(self._build)
        self._entry = functools.lru_cache(maxsize=max_entries)(self._regenerate)

    def validate_params(self, params: Params) -> None:
        check_params("reasoning_gym", params, {"extract": str})
        _choice("reasoning_gym", "extract", params.get("extract", "auto"), GYM_EXTRACT_MODES)

    def __call__(self, completion: str, item: PromptItem, **params: Any) -> float:
        answer = extract_gym_answer(completion, params.get("extract", "auto"))
        spec = item.metadata.get("reasoning_gym")
        if isinstance(spec, dict):
            key = (spec["name"], spec["size"], spec["seed"], msgspec.json.encode(spec["config"]))
            dataset = self._dataset(*key)
            return float(dataset.score_answer(answer, self._entry(key, int(spec["index"]))))
        entry = item.metadata.get("entry")
        if isinstance(entry, dict) and "source_dataset" in entry.get("metadata", {}):
            import reasoning_gym

            verifier = reasoning_gym.get_score_answer_fn(entry["metadata"]["source_dataset"])
            return float(verifier(answer, entry))
        raise RewardError(
            f"reasoning_gym reward: item {item.index} has no 'reasoning_gym' spec or reasoning-gym "
            "'entry' in its metadata; use a reasoning_gym dataset or a metadata_key holding entries"
        )

    @staticmethod
    def _build(name: str, size: int, seed: int, config_json: bytes) -> Any:
        from rollout.data import create_reasoning_gym

        return create_reasoning_gym(
            name, size=size, seed=seed, config=msgspec.json.decode(config_json)
        )

    def _regenerate(self, key: tuple[str, int, int, bytes], index: int) -> Any:
        return self._dataset(*key)[index]


def builtin_registry(*, remote: Sequence[str] = ()) -> RewardRegistry:
    """A fresh registry holding the built-in rewards (see the module doc).

    ``remote`` names built-ins the operator wants scored on RQ workers (e.g. ``reasoning_gym``
    for slow verifiers).
    """
    builtins: dict[str, tuple[Callable[..., float], tuple[float, float]]] = {
        "math": (MathReward(), (0.0, 1.0)),
        "exact": (ExactReward(), (0.0, 1.0)),
        "regex": (RegexReward(), (0.0, 1.0)),
        "format": (FormatReward(), (0.0, 1.0)),
        "length_penalty": (LengthPenaltyReward(), (-1.0, 0.0)),
        "reasoning_gym": (ReasoningGymReward(), (0.0, 1.0)),
    }
    unknown = sorted(set(remote) - set(builtins))
    if unknown:
        raise RewardError(f"remote= names unknown built-ins {unknown}; known: {sorted(builtins)}")
    registry = RewardRegistry()
    for name, (fn, value_range) in builtins.items():
        registry.register(name, fn, value_range=value_range, remote=name in remote)
    return registry
