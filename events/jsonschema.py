"""The published JSON Schema of ingress events, for producers in any language.

``python -m events.jsonschema`` rewrites ``events/schema/ingress.schema.json`` from the msgspec
types; a test fails when the committed file is out of date. ``--check`` exits 1 if it differs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import msgspec

from events.schema import IngressEvent

SCHEMA_PATH = Path(__file__).parent / "schema" / "ingress.schema.json"


def ingress_schema() -> dict[str, object]:
    """JSON Schema (2020-12) of the ingress union, with a title and an id."""
    schema = msgspec.json.schema(IngressEvent)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://multilora.dev/schema/ingress.schema.json",
        "title": "multilora ingress event",
        "description": "XADD <namespace>:ingress * event '<this JSON>'",
        **schema,
    }


def render() -> str:
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
