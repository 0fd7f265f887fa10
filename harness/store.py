"""The results store: one SQLite row per finished cell (model x method x bits x task x settings x seed).

A row is written the moment its cell finishes, in its own transaction, so a run killed at any point keeps every
finished cell; the runner skips cells whose `cell_id` is already stored. Per-sample outputs live beside the
database as JSONL (see `SampleLog`) so an interrupted cell also resumes sample by sample.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    cell_id TEXT PRIMARY KEY,
    run_id TEXT NOT NULL,
    created TEXT NOT NULL,
    model TEXT NOT NULL,
    model_fingerprint TEXT,
    method TEXT NOT NULL,
    bits TEXT NOT NULL,
    task TEXT NOT NULL,
    split TEXT NOT NULL,
    shots INTEGER NOT NULL DEFAULT 0,
    seed INTEGER NOT NULL,
    n_samples INTEGER NOT NULL,
    sample_limit INTEGER,
    scoring TEXT,
    execution TEXT NOT NULL,
    metrics TEXT NOT NULL,
    measurements TEXT NOT NULL,
    search_cost TEXT NOT NULL,
    settings TEXT NOT NULL,
    describe TEXT,
    environment TEXT NOT NULL,
    data_fingerprint TEXT
);
CREATE INDEX IF NOT EXISTS results_by_run ON results(run_id);
CREATE INDEX IF NOT EXISTS results_by_cell ON results(model, method, bits, task);
"""
JSON_FIELDS = ("metrics", "measurements", "search_cost", "settings", "environment")


@dataclass
class ResultRow:
    cell_id: str
    run_id: str
    model: str
    method: str
    bits: str
    task: str
    split: str
    seed: int
    n_samples: int
    execution: str
    metrics: dict[str, float]
    measurements: dict[str, Any] = field(default_factory=dict)
    search_cost: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    shots: int = 0
    sample_limit: int | None = None
    scoring: str | None = None
    describe: str | None = None
    model_fingerprint: str | None = None
    data_fingerprint: str | None = None
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S"))


def _dumps(obj: Any) -> str:
    """JSON with NaN written as null (SQLite/JSON readers elsewhere choke on NaN)."""

    def clean(x: Any) -> Any:
        if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(obj), sort_keys=True, default=str)


class Store:
    """A SQLite results store (created on first use)."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as con:
            con.executescript(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=30)
        con.row_factory = sqlite3.Row
        return con

    def has(self, cell_id: str) -> bool:
        with self._connect() as con:
            return con.execute("SELECT 1 FROM results WHERE cell_id = ?", (cell_id,)).fetchone() is not None

    def put(self, row: ResultRow) -> None:
        data = asdict(row)
        for key in JSON_FIELDS:
            data[key] = _dumps(data[key])
        cols = ", ".join(data)
        marks = ", ".join("?" for _ in data)
        with self._connect() as con:
            con.execute(f"INSERT OR REPLACE INTO results ({cols}) VALUES ({marks})", tuple(data.values()))

    def get(self, cell_id: str) -> ResultRow | None:
        rows = list(self.rows(cell_ids=[cell_id]))
        return rows[0] if rows else None

    def rows(self, *, run_id: str | None = None, cell_ids: Iterable[str] | None = None,
             **equals: Any) -> Iterator[ResultRow]:
        where, args = [], []
        if run_id is not None:
            where.append("run_id = ?")
            args.append(run_id)
        if cell_ids is not None:
            ids = list(cell_ids)
            where.append(f"cell_id IN ({', '.join('?' for _ in ids)})")
            args += ids
        for key, value in equals.items():
            where.append(f"{key} = ?")
            args.append(value)
        sql = "SELECT * FROM results" + (f" WHERE {' AND '.join(where)}" if where else "") + " ORDER BY created"
        with self._connect() as con:
            for rec in con.execute(sql, args).fetchall():
                data = dict(rec)
                for key in JSON_FIELDS:
                    data[key] = json.loads(data[key]) if data[key] else {}
                data["metrics"] = {k: (math.nan if v is None else v) for k, v in data["metrics"].items()}
                yield ResultRow(**data)

    def runs(self) -> list[tuple[str, str, int]]:
        """(run_id, first created, number of rows), newest first."""
        with self._connect() as con:
            return [tuple(r) for r in con.execute(
                "SELECT run_id, MIN(created), COUNT(*) FROM results GROUP BY run_id ORDER BY MIN(created) DESC")]


class SampleLog:
    """Per-sample outputs of one cell as JSONL (prompt, raw output, parsed answer, score, timing).

    Lines are appended and flushed batch by batch; on restart, `done()` tells which samples are finished so an
    interrupted cell continues where it stopped. A torn last line (killed mid-write) is ignored.
    """

    def __init__(self, path: Path):
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line torn by a kill; that sample is simply redone
        return out

    def done(self) -> set[str]:
        return {rec["key"] for rec in self.read()}

    def append(self, records: Iterable[dict]) -> None:
        torn = self.path.exists() and self.path.stat().st_size > 0 and not self.path.read_bytes().endswith(b"\n")
        with self.path.open("a", encoding="utf-8") as f:
            if torn:  # never glue a new record onto a line torn by a kill
                f.write("\n")
            for rec in records:
                f.write(_dumps(rec) + "\n")
            f.flush()
