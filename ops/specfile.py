"""Adapter spec files and schedule files (TOML, YAML or JSON), decoded at the edge.

An adapter spec file holds ``name`` plus the fields of :class:`events.specs.AdapterSpec`::

    name = "sums"
    rank = 8
    steps = 12
    dataset = { kind = "reasoning_gym", name = "chain_sum", config = { min_terms = 2 } }
    rewards = [ { name = "reasoning_gym" } ]

A schedule is a list of ``[[step]]`` entries run in order (``multilora run``)::

    [[step]]
    register = "adapters/sums.toml"     # a spec file, relative to the schedule
    [[step]]
    wait = { adapter = "sums", step = 3 }   # or wait = { seconds = 20 }
    [[step]]
    cancel = "sums"

Errors name the file and the field (msgspec's path, e.g. ``$.dataset.kind``).
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import msgspec
import yaml

from events.errors import ConfigError
from events.specs import AdapterSpec


def load_data(path: str | Path) -> Any:
    """Parse a TOML, YAML or JSON file by its suffix; ConfigError naming the file otherwise."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"file {str(p)!r} does not exist")
    text = p.read_text()
    try:
        if p.suffix == ".toml":
            return tomllib.loads(text)
        if p.suffix in (".yaml", ".yml"):
            return yaml.safe_load(text)
        if p.suffix == ".json":
            return json.loads(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{p}: cannot parse: {exc}") from None
    raise ConfigError(f"{p}: unknown format {p.suffix!r}; use .toml, .yaml or .json")


def adapter_from_data(data: Any, origin: str) -> tuple[str, AdapterSpec]:
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        raise ConfigError(f"{origin}: an adapter spec needs a string field 'name'")
    fields = {k: v for k, v in data.items() if k != "name"}
    try:
        return data["name"], msgspec.convert(fields, AdapterSpec)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{origin}: {exc}") from None


def load_adapter(path: str | Path) -> tuple[str, AdapterSpec]:
    """(name, spec) from an adapter spec file."""
    return adapter_from_data(load_data(path), str(path))


class WaitFor(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    seconds: float = 0.0
    adapter: str = ""
    step: int = 0


class ScheduleStep(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    register: str = ""
    cancel: str = ""
    wait: WaitFor | None = None


class Schedule(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    step: tuple[ScheduleStep, ...]


def load_schedule(path: str | Path) -> tuple[list[ScheduleStep], Path]:
    """The schedule's steps and its folder (spec paths are relative to it)."""
    try:
        schedule = msgspec.convert(load_data(path), Schedule)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    for i, step in enumerate(schedule.step):
        if sum(bool(x) for x in (step.register, step.cancel, step.wait)) != 1:
            raise ConfigError(f"{path}: step {i} must have exactly one of register, cancel, wait")
    return list(schedule.step), Path(path).parent
