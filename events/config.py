"""One config shape for every process: the shared bus config plus the process's own fields.

Every process config is a frozen msgspec Struct (``forbid_unknown_fields``) whose fields carry
their default, their value constraints and their help text in one place::

    class CheckpointConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
        bus: BusConfig = BusConfig()
        artifacts: Annotated[str, msgspec.Meta(description="version store")] = "runs/artifacts"

:func:`load` builds one from, lowest to highest precedence,

1. the field defaults,
2. a config file (``--config FILE``: JSON, YAML or TOML by suffix; a flat mapping of field
   names, bus fields included — ``redis_url = "..."`` next to ``num_slots = 4``),
3. the environment: ``MULTILORA_<ROLE>_<FIELD>``, else ``MULTILORA_<FIELD>`` (a deployment-wide
   value, e.g. ``MULTILORA_NAMESPACE`` or ``MULTILORA_ARTIFACTS``); ``redis_url`` finally falls
   back to the conventional ``REDIS_URL``. Tuples are comma-separated, maps
   ``k=v,k2=v2``, booleans ``1/true/yes``,
4. command-line flags: ``--field-name`` for every field (bus fields included), plus the aliases a
   field lists in ``Meta(extra={"flags": (...)})``; a tuple field's flag repeats or takes several
   values. Unset flags are absent, not defaults.

A bad value raises :class:`~events.errors.ConfigError` naming the field and the value (msgspec's
message ``Expected `int` >= 1, got 0 - at `$.num_slots```); an unknown key in a file names the
key. Only a process's ``main()`` sees its config; components get flat parameters.
"""

from __future__ import annotations

import argparse
import os
import re
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import msgspec

from events.errors import ConfigError

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_NAMESPACE = "multilora"
DEFAULT_ARTIFACTS = "runs/artifacts"
"""Where the trainer publishes versions and rollout workers and the checkpointer read them."""
DEFAULT_CHECKPOINTS = "runs/checkpoints"
"""Where the checkpointer writes durable checkpoints and PEFT exports (the trainer resumes)."""
ENV_PREFIX = "MULTILORA_"

Positive = Annotated[int, msgspec.Meta(ge=1)]
NonNegative = Annotated[float, msgspec.Meta(ge=0)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
Namespace = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
ConsumerName = Annotated[str, msgspec.Meta(pattern=r"^([A-Za-z0-9][A-Za-z0-9_.:-]{0,127})?$")]


def _doc(text: str, *flags: str) -> msgspec.Meta:
    return msgspec.Meta(description=text, extra={"flags": flags} if flags else {})


class BusConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How a process reaches the bus and runs its consumer (the same for every process)."""

    redis_url: Annotated[str, _doc("Redis URL (redis:// or rediss://)")] = DEFAULT_REDIS_URL
    namespace: Annotated[Namespace, _doc("key prefix of the deployment")] = DEFAULT_NAMESPACE
    name: Annotated[ConsumerName, _doc("consumer name (empty: the process's default)")] = ""
    block_ms: Annotated[Positive, _doc("longest blocking read, ms")] = 2_000
    claim_idle_ms: Annotated[
        Positive, _doc("an entry idle this long in a silent consumer is reclaimed, ms")
    ] = 30_000
    max_deliveries: Annotated[Positive, _doc("failed deliveries before dead-lettering")] = 5
    lease_ttl_ms: Annotated[Positive, _doc("TTL of the consumer name's lease, ms")] = 15_000
    lease_wait_s: Annotated[
        NonNegative, _doc("wait this long for a dead predecessor's lease, s")
    ] = 0.0
    unsafe_redis: Annotated[
        bool, _doc("run against a Redis that can lose acknowledged events (throwaway use)")
    ] = False
    metrics_port: Annotated[Port, _doc("serve Prometheus /metrics on this port (0: none)")] = 0
    log_level: Annotated[Literal["DEBUG", "INFO", "WARNING", "ERROR"], _doc("log level")] = "INFO"
    burst: Annotated[bool, _doc("drain the streams, then exit (tests, catch-up)")] = False


BUS_FIELDS = frozenset(BusConfig.__struct_fields__)
C = TypeVar("C", bound=msgspec.Struct)


# --- field introspection ----------------------------------------------------------------------


class _Field(msgspec.Struct, frozen=True):
    name: str
    kind: Literal["scalar", "bool", "tuple", "map"]
    py: Any  # int, float or str for scalars
    choices: tuple[str, ...] | None
    help: str
    flags: tuple[str, ...]


def _fields(cls: type) -> list[_Field]:
    hints = typing.get_type_hints(cls, include_extras=True)
    out = []
    for name in cls.__struct_fields__:  # type: ignore[attr-defined]
        hint, metas = hints[name], []
        while typing.get_origin(hint) is Annotated:
            hint, *extra = typing.get_args(hint)
            metas += [m for m in extra if isinstance(m, msgspec.Meta)]
        help_text = next((m.description for m in metas if m.description), "")
        aliases = tuple(f for m in metas for f in (m.extra or {}).get("flags", ()))
        flags = ("--" + name.replace("_", "-"), *aliases)
        origin, choices, py = typing.get_origin(hint), None, str
        if hint is bool:
            kind: Literal["scalar", "bool", "tuple", "map"] = "bool"
        elif origin is tuple:
            kind = "tuple"
        elif origin is dict:
            kind = "map"
        else:
            kind = "scalar"
            if origin is Literal:
                choices = tuple(str(a) for a in typing.get_args(hint))
            elif hint in (int, float):
                py = hint
        out.append(_Field(name, kind, py, choices, help_text, flags))
    return out


def _struct_type(cls: type, field: str) -> type | None:
    hint = typing.get_type_hints(cls).get(field)
    return hint if isinstance(hint, type) and issubclass(hint, msgspec.Struct) else None


# --- sources ----------------------------------------------------------------------------------


def _pairs(items: Sequence[str], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ConfigError(f"{what} entry {item!r} must look like NAME=VALUE")
        out[key.strip()] = value.strip()
    return out


def _from_env(fields: list[_Field], role: str, environ: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields:
        names = [f"{ENV_PREFIX}{role.upper()}_{f.name.upper()}", f"{ENV_PREFIX}{f.name.upper()}"]
        if f.name == "redis_url":
            names.append("REDIS_URL")
        var = next((n for n in names if n in environ), None)
        if var is None:
            continue
        raw = environ[var]
        if f.kind == "tuple":
            out[f.name] = [x.strip() for x in raw.split(",") if x.strip()]
        elif f.kind == "map":
            out[f.name] = _pairs([x for x in raw.split(",") if x.strip()], f"${var}")
        elif f.kind == "bool":
            out[f.name] = raw.strip().lower() in ("1", "true", "yes", "on")
        else:
            out[f.name] = raw
    return out


def read_file(path: str) -> dict[str, Any]:
    """A mapping from a JSON, YAML or TOML file (by suffix); ConfigError naming the problem."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {path!r} not found")
    decoders = {
        ".json": msgspec.json.decode,
        ".yaml": msgspec.yaml.decode,
        ".yml": msgspec.yaml.decode,
        ".toml": msgspec.toml.decode,
    }
    decode = decoders.get(file.suffix.lower())
    if decode is None:
        raise ConfigError(f"config file {path!r}: use a .json, .yaml/.yml or .toml file")
    try:
        data = decode(file.read_bytes())
    except msgspec.DecodeError as err:
        raise ConfigError(f"config file {path!r} does not parse: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of configuration fields")
    return data


def add_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    only: Sequence[str] = (),
) -> None:
    """Declare ``cls``'s fields (``only`` these, if given) as flags on ``parser``."""
    for f in _fields(cls):
        if only and f.name not in only:
            continue
        kwargs: dict[str, Any] = {"dest": f.name, "help": f.help or None}
        if f.kind == "bool":  # --x sets it, --no-x clears it (a field whose default is true)
            kwargs["action"] = argparse.BooleanOptionalAction
        elif f.kind == "tuple":  # --root a --root b, or --root a b (SGLang's style)
            kwargs.update(action="extend", nargs="+")
        elif f.kind == "map":
            kwargs["action"] = "append"
        else:
            kwargs["type"] = f.py
            if f.choices:
                kwargs["choices"] = f.choices
        parser.add_argument(*f.flags, **kwargs)


def parser_for(cls: type, *, prog: str, description: str = "") -> argparse.ArgumentParser:
    """The command line of a process config: ``--config`` plus every field as a flag."""
    p = argparse.ArgumentParser(
        prog=prog,
        description=description,
        argument_default=argparse.SUPPRESS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="JSON, YAML or TOML file of configuration fields")
    nested = _struct_type(cls, "bus")
    if nested is not None:
        add_flags(p.add_argument_group("bus"), nested)
    own = p.add_argument_group("process")
    for f in _fields(cls):
        if f.name != "bus":
            add_flags(own, cls, only=(f.name,))
    return p


def load(
    cls: type[C],
    *,
    role: str,
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    prog: str = "",
    description: str = "",
    overrides: Mapping[str, Any] | None = None,
) -> C:
    """Merge defaults < file < environment < flags into a validated ``cls`` (see module doc).

    ``overrides`` are values a caller parsed itself (a command's own parser), applied as flags.
    """
    environ = os.environ if environ is None else environ
    bus_cls = _struct_type(cls, "bus")
    own_fields = [f for f in _fields(cls) if f.name != "bus"]
    all_fields = own_fields + (_fields(bus_cls) if bus_cls is not None else [])
    flags = vars(parser_for(cls, prog=prog or role, description=description).parse_args(argv))
    file_path = flags.pop("config", None)
    merged: dict[str, Any] = read_file(file_path) if file_path else {}
    merged.update(_from_env(all_fields, role, environ))
    for f in all_fields:
        if f.kind == "map" and f.name in flags:
            flags[f.name] = _pairs(flags[f.name], f.flags[-1])
    merged.update(flags)
    merged.update(overrides or {})
    if bus_cls is not None:
        nested = merged.pop("bus", {})
        if not isinstance(nested, dict):
            raise ConfigError(f"{role} configuration: `bus` must be a mapping of bus fields")
        bus = {k: merged.pop(k) for k in list(merged) if k in BUS_FIELDS}
        merged["bus"] = {**nested, **bus}
    try:
        return msgspec.convert(merged, cls, strict=False)
    except msgspec.ValidationError as err:
        raise ConfigError(f"invalid {role} configuration: {err}{_given(err, merged)}") from None


def _given(err: msgspec.ValidationError, merged: Mapping[str, Any]) -> str:
    """``" (given: 0)"``: the offending value, found by the JSON path msgspec names."""
    match = re.search(r"at `\$((?:\.\w+)+)`", str(err))
    value: Any = merged
    for part in match.group(1).split(".")[1:] if match else ():
        if not isinstance(value, Mapping) or part not in value:
            return ""
        value = value[part]
    return f" (given: {value!r})" if match else ""
