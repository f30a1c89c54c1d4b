"""Pure pieces of a rollout group: per-row seeds, served adapter names, samples, failed prompts.

The rollout worker (:mod:`rollout.worker`) turns one ``rollout.task`` into ONE batch of rows,
``group_size`` rows per prompt, and the completions back into one ``rollout.group``. What does
not depend on the worker's state lives here, unit tested alone:

- :func:`tokenize_prompt` — one prompt's token ids, or why it cannot run;
- :func:`task_rows` — the batch: ``group_size`` rows per runnable prompt, each with its own
  seed (:func:`row_seed`), so the same task gives the same samples on any worker with the same
  weights;
- :func:`prompt_groups` — completions and scores back into prompt groups, in task order, with
  failed samples (:func:`failed_prompt`) standing for prompts that could not run;
- :func:`served_name` — the engine-side adapter name of one registration.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from events.schema import PromptGroup, RolloutTask, Sample
from rollout.adapter_slots import AdapterRef
from rollout.backend import Completion, GenerationRow
from rollout.data import DataSource, PromptItem
from rollout.rewards import RewardResult
from rollout.sampling import SamplingParams

Prompt = tuple[PromptItem, tuple[int, ...]] | str
"""A prompt of a task: its item and token ids, or the reason it cannot run."""


def row_seed(task_seed: int, prompt_index: int, sample_index: int, occurrence: int = 0) -> int:
    """The sampling seed of one row: a hash of the task seed, prompt index and sample index.

    ``occurrence`` counts earlier copies of the same prompt index in the task (0 normally), so
    a prompt listed twice gets different samples. Result in ``[0, 2**63)``.
    """
    key = f"{task_seed}:{prompt_index}:{sample_index}:{occurrence}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") >> 1


def served_name(adapter: str, registration_id: str) -> str:
    """The engine-side adapter name of one registration (``math.<registration_id>``).

    Versions are immutable in the engines, so a name registered again after it retired must not
    reuse the old registration's ``name@version`` entries: the registration id makes it unique.
    """
    return f"{adapter}.{registration_id}" if registration_id else adapter


def tokenize_prompt(
    source: DataSource, index: int, tokenizer: Any, *, chat_template: bool, max_tokens: int
) -> Prompt:
    """Item ``index`` of ``source`` and its token ids, or the reason this prompt cannot run.

    Chat-templated text already carries the model's special tokens, so the tokenizer adds
    none then; plain text gets them (e.g. a BOS token) as the model expects. Prompts are never
    truncated: a cut prompt is a different question than the one the reward checks.
    """
    try:
        item = source[index]
    except IndexError as err:
        return f"prompt index: {err}"
    encoded = tokenizer(item.prompt, add_special_tokens=not chat_template)
    ids = tuple(int(t) for t in encoded["input_ids"])
    if not ids:
        return f"prompt {index} is empty after tokenization"
    if len(ids) > max_tokens:
        return (
            f"prompt {index} has {len(ids)} tokens, over max_prompt_tokens="
            f"{max_tokens}; shorten the dataset's prompts or raise the limit"
        )
    return item, ids


def task_rows(
    task: RolloutTask, prompts: Sequence[Prompt], adapter: AdapterRef
) -> tuple[list[GenerationRow], list[PromptItem]]:
    """The rows of ``task`` (``group_size`` per runnable prompt, in task order) and their items.

    ``B`` = ``group_size`` times the number of runnable prompts. A prompt index listed twice gets
    different seeds (its ``occurrence``).
    """
    rows_B: list[GenerationRow] = []
    items_B: list[PromptItem] = []
    seen: dict[int, int] = {}
    for index, prompt in zip(task.prompt_indices, prompts, strict=True):
        occurrence = seen.get(index, 0)
        seen[index] = occurrence + 1
        if isinstance(prompt, str):
            continue
        item, ids = prompt
        for g in range(task.group_size):
            seed = row_seed(task.seed, index, g, occurrence)
            sampling = SamplingParams.from_spec(task.sampling, seed=seed)
            rows_B.append(GenerationRow(prompt_ids=ids, adapter=adapter, sampling=sampling))
            items_B.append(item)
    return rows_B, items_B


def prompt_groups(
    task: RolloutTask,
    prompts: Sequence[Prompt],
    completions_B: Sequence[Completion],
    scores_B: Sequence[RewardResult],
) -> list[PromptGroup]:
    """One prompt group per prompt of ``task``, in task order (rows as :func:`task_rows` made)."""
    done = iter(zip(completions_B, scores_B, strict=True))
    groups = []
    for index, prompt in zip(task.prompt_indices, prompts, strict=True):
        if isinstance(prompt, str):
            groups.append(failed_prompt(index, task.group_size, prompt))
            continue
        samples_G = tuple(to_sample(*next(done)) for _ in range(task.group_size))
        groups.append(PromptGroup(prompt_index=index, prompt_ids=prompt[1], samples=samples_G))
    return groups


def to_sample(completion: Completion, score: RewardResult) -> Sample:
    """A generated sample; a failed reward marks it failed (reward 0.0, not to be trained on)."""
    return Sample(
        completion_ids=completion.completion_ids,
        logprobs=completion.logprobs,
        text=completion.text,
        reward=score.total,
        reward_terms=score.terms,
        finish_reason=completion.finish_reason,
        failed=score.failed,
        reason=score.reason,
    )


def failed_prompt(index: int, group_size: int, reason: str) -> PromptGroup:
    """``group_size`` failed samples, no tokens, for a prompt that could not run."""
    failed = Sample(
        completion_ids=(),
        logprobs=(),
        text="",
        reward=0.0,
        finish_reason="error",
        failed=True,
        reason=reason,
    )
    return PromptGroup(prompt_index=index, prompt_ids=(), samples=(failed,) * group_size)


def failed_groups(task: RolloutTask, reason: str) -> list[PromptGroup]:
    """Every prompt of ``task`` failed for one reason (a task-level failure)."""
    return [failed_prompt(i, task.group_size, reason) for i in task.prompt_indices]
