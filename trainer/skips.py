"""Why an adapter's step did not count: the reason strings of a skip, and its status record.

One adapter's failure must stay its own: the mixed step trains the others and reports, per
slot, a :class:`~trainer.mixed_step.SlotOutcome`; a step that is *skipped* is issued again with
new prompts, and ``max_failures`` skips in a row fail the adapter (:mod:`trainer.process`). The
reason a user reads in ``adapter.failed`` and in ``multilora status`` must name the cause, not
its symptom (``"no usable sample group"``), so the pieces that build it live here, pure:

- :func:`sample_too_long` — a sample dropped because it does not fit the trainer's token budget;
- :func:`every_sample_failed` — the step's samples all failed (a reward that raises, hangs or
  returns NaN on every call; a dataset that cannot be read; samples too long): the most common
  of the samples' own reasons, with its count;
- :func:`failed_after` — the ``adapter.failed`` reason once the skips in a row reach the limit;
- :func:`skip_status_fields` — the ``skips`` count and the ``last_skip`` JSON
  (:class:`~orchestrator.status.SkipNote`, which names its registration) of the status hash.

Which outcome is a skip (and which is an "empty" step that is simply redone, like groups all
dropped by ``filter_zero_variance``) is :class:`~trainer.mixed_step.SlotOutcome`'s decision.
"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec

from orchestrator.status import SKIP_FIELD, SKIPS_FIELD, SkipNote

MAX_REASON_CHARS = 300
"""Longest sample reason quoted in a skip reason (a reward's message may be a whole traceback)."""


def sample_too_long(tokens: int, budget: int) -> str:
    """The reason of a sample of ``tokens`` tokens (prompt + completion) over ``budget``."""
    return (
        f"sample of {tokens} tokens exceeds the trainer's budget of {budget} (the base model's "
        "max_position_embeddings); lower the adapter's sampling.max_new_tokens or shorten its "
        f"prompts so that prompt length + max_new_tokens <= {budget}"
    )


def most_common(failures: Mapping[str, int]) -> tuple[str, int]:
    """The most frequent reason of ``failures`` (reason -> samples) and its count; ties go to
    the reason seen first. ``("", 0)`` when there is none."""
    best, count = "", 0
    for reason, n in failures.items():
        if n > count:
            best, count = reason, n
    return best, count


def every_sample_failed(failures: Mapping[str, int], samples: int) -> str:
    """``"every sample failed: <most common reason> (k of n samples)"``, the reason of a step
    whose ``samples`` samples all failed, ``failures`` counting them by their own reason."""
    reason, count = most_common(failures)
    if not reason:
        return f"every sample failed ({samples} samples, no reason given)"
    if len(reason) > MAX_REASON_CHARS:
        reason = reason[: MAX_REASON_CHARS - 3] + "..."
    others = len(failures) - 1
    more = f"; {others} other reason{'s' if others > 1 else ''}" if others else ""
    return f"every sample failed: {reason} ({count} of {samples} samples{more})"


def failed_after(reason: str, skips: int) -> str:
    """The ``adapter.failed`` reason after ``skips`` skipped steps in a row, the last for
    ``reason``: ``"3 steps in a row skipped: every sample failed: ..."``."""
    return f"{skips} steps in a row skipped: {reason}"


def skip_status_fields(note: SkipNote, skips: int) -> dict[str, str]:
    """The trainer's status fields of a skip: ``skips`` (the registration's skipped steps in
    all, a counter that never resets) and ``last_skip`` (``note`` as JSON)."""
    if skips < note.in_a_row:
        raise ValueError(f"skips={skips} is fewer than the {note.in_a_row} skips in a row")
    return {SKIPS_FIELD: str(skips), SKIP_FIELD: msgspec.json.encode(note).decode()}
