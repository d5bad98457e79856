"""Reading the JSONL files of a published artifact.

An artifact's files were validated when it was written, so a line that is not JSON means the
artifact is damaged or foreign: the reading stage fails, naming the file and line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunepipe.tasks.core.stage import StageFailed


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a JSONL file (none when it is absent); blank lines are skipped."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise StageFailed(f"{path}:{number}: not JSON ({exc.msg})") from exc
    return records
