"""The published JSON Schema of ingress events, for producers in any language.

``python -m events.jsonschema`` rewrites ``events/schema/ingress.schema.json`` from the msgspec
types; a test fails when the committed file is out of date. ``--check`` exits 1 if it differs.

Every ``description`` is normalised (:func:`normalise_description`) so the file depends only on
our docstrings, not on how a msgspec version renders them (0.22 kept the docstring indentation,
0.23 dedents it).
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
from pathlib import Path
from typing import Any

import msgspec

from events.schema import IngressEvent

SCHEMA_PATH = Path(__file__).parent / "schema" / "ingress.schema.json"


_VALUE_KEYS = frozenset({"default", "const", "enum", "examples"})
"""Keywords whose values are instance data, not schema: left exactly as they are."""
_NAME_MAPS = frozenset({"properties", "patternProperties", "$defs", "dependentSchemas"})
"""Keywords whose values map names (a property named ``description``, say) to schemas."""


def normalise_description(text: str) -> str:
    """``text`` dedented (:func:`inspect.cleandoc`), each paragraph joined onto one line.

    Paragraphs are separated by one blank line; runs of whitespace inside one become a single
    space, so neither the source indentation nor where a docstring wraps reaches the schema.
    """
    paragraphs = re.split(r"\n\s*\n", inspect.cleandoc(text))
    return "\n\n".join(" ".join(p.split()) for p in paragraphs if p.strip())


def normalise_descriptions(node: Any, *, names: bool = False) -> Any:
    """A copy of the schema ``node`` with every ``description`` normalised, at any depth
    (``names``: ``node`` is a name -> schema map, whose keys are not keywords)."""
    if isinstance(node, list):
        return [normalise_descriptions(item) for item in node]
    if not isinstance(node, dict):
        return node
    if names:
        return {name: normalise_descriptions(schema) for name, schema in node.items()}
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "description" and isinstance(value, str):
            out[key] = normalise_description(value)
        elif key in _VALUE_KEYS:
            out[key] = value
        else:
            out[key] = normalise_descriptions(value, names=key in _NAME_MAPS)
    return out


def ingress_schema() -> dict[str, object]:
    """JSON Schema (2020-12) of the ingress union, with a title and an id."""
    schema = normalise_descriptions(msgspec.json.schema(IngressEvent))
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://multilora.dev/schema/ingress.schema.json",
        "title": "multilora ingress event",
        "description": "XADD <namespace>:ingress * event '<this JSON>'",
        **schema,
    }


def render() -> str:
    """The committed file's text: sorted keys, two-space indent, a final newline."""
    return json.dumps(ingress_schema(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m events.jsonschema", description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is out of date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = SCHEMA_PATH.read_text() if SCHEMA_PATH.exists() else ""
        if current != text:
            print(f"{SCHEMA_PATH} is out of date: run python -m events.jsonschema", file=sys.stderr)
            return 1
        return 0
    SCHEMA_PATH.write_text(text)
    print(SCHEMA_PATH)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
