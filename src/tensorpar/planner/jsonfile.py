"""Reading the planner's JSON inputs (model configs, device files, bench results) with one clear error."""

from __future__ import annotations

import json
from pathlib import Path


def read_json_object(path: str | Path, what: str) -> dict:
    """The JSON object in ``path``; ``ValueError`` naming ``what`` the file was meant to be otherwise."""
    try:
        data = json.loads(Path(path).expanduser().read_text())
    except OSError as e:
        raise ValueError(f"cannot read {what} {str(path)!r}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {str(path)!r} is not JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} {str(path)!r} is not a JSON object")
    return data
