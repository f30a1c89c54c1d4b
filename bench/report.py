"""What every benchmark does with its result: write it as indented JSON, folders made."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_json(path: str | Path, result: dict[str, Any]) -> Path:
    """Write ``result`` to ``path`` (its folder created), one trailing newline; return the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return out
