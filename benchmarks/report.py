"""Writing a benchmark's result: printed as JSON, and written to ``--json`` when given."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def emit(out: dict[str, Any], path: Path | None, echo: bool = True) -> None:
    if echo:
        print(json.dumps(out, indent=2))
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2) + "\n")
