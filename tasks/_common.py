"""Helpers shared by the task plugins: locating data folders and reading JSON with one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qvlm_harness.errors import DataError

EMBEDDED = Path(__file__).resolve().parent / "data"


def data_folder(task: str, data_dir: Path | None, layout: str) -> Path:
    """The task's data folder: `data_dir` if given (must exist), else the embedded sample set."""
    folder = Path(data_dir) if data_dir is not None else EMBEDDED / task
    if not folder.is_dir():
        raise DataError(f"{task}: data folder {folder} does not exist; pass --data-dir pointing at {layout}")
    return folder


def read_json(path: Path, task: str, layout: str) -> Any:
    if not path.is_file():
        raise DataError(f"{task}: missing {path.name} in {path.parent}; expected {layout}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{task}: {path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from exc


def read_jsonl(path: Path, task: str, layout: str, required: tuple[str, ...]) -> list[dict]:
    if not path.is_file():
        raise DataError(f"{task}: missing {path.name} in {path.parent}; expected {layout}")
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{task}: {path}:{lineno} is not a JSON object ({exc.msg}); fix or delete that line"
                            ) from exc
        missing = [k for k in required if k not in row]
        if not isinstance(row, dict) or missing:
            raise DataError(f"{task}: {path}:{lineno} lacks field(s) {', '.join(missing) or '(not an object)'}; "
                            f"each line needs {', '.join(required)}")
        rows.append(row)
    return rows
