"""The results store: one SQLite row per finished cell, keyed by the cell's id (a hash of what it was computed
from, see `qvlm_harness.identity`).

A row is written the moment its cell finishes, in its own transaction, so a run killed at any point keeps every
finished cell; the runner skips cells whose `cell_id` is already stored. A row computed from other contents of the
same cell (same `cell_key`: the model or data changed) marks the older rows `superseded_by` the new one: they
stay in the store, but reports and reuse only see current rows. Per-sample outputs live beside the database as
JSONL (see `SampleLog`) so an interrupted cell also resumes sample by sample.

The store refuses to be corrupted: a row without samples or with a non-finite primary metric is never written;
a row that cannot be read back (edited by hand, another program's table) is reported by cell id and skipped, never
crashes a report. The schema is versioned (`PRAGMA user_version`) and older stores are migrated in place.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from qvlm_harness.errors import HarnessError

SCHEMA_VERSION = 2
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
    data_fingerprint TEXT,
    cell_key TEXT,
    identity TEXT,
    superseded_by TEXT
);
CREATE INDEX IF NOT EXISTS results_by_run ON results(run_id);
CREATE INDEX IF NOT EXISTS results_by_cell ON results(model, method, bits, task);
CREATE INDEX IF NOT EXISTS results_by_key ON results(cell_key);
"""
# schema version -> the statements that bring a store of the previous version to it
MIGRATIONS: dict[int, tuple[str, ...]] = {
    2: ("ALTER TABLE results ADD COLUMN cell_key TEXT", "ALTER TABLE results ADD COLUMN identity TEXT",
        "ALTER TABLE results ADD COLUMN superseded_by TEXT",
        "CREATE INDEX IF NOT EXISTS results_by_key ON results(cell_key)"),
}
JSON_FIELDS = ("metrics", "measurements", "search_cost", "settings", "environment", "identity")


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
    cell_key: str | None = None  # the cell without its contents (see Plan.cell_key)
    identity: dict[str, Any] = field(default_factory=dict)  # what the cell id hashes
    superseded_by: str | None = None

    @property
    def method_label(self) -> str:
        """The method with the rotation it quantized after (``rtn+hadamard``; `harness run --rotate`): what tables,
        `harness compare` and the regression suite tell rows apart by."""
        rotate = (self.settings or {}).get("rotate") or "none"
        return self.method if rotate == "none" else f"{self.method}+{rotate}"


ROW_FIELDS = frozenset(f.name for f in fields(ResultRow))


def clean_json(x: Any) -> Any:
    """`x` with NaN/inf written as None: strict JSON (readers elsewhere choke on a bare NaN)."""
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    if isinstance(x, dict):
        return {k: clean_json(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [clean_json(v) for v in x]
    return x


def _dumps(obj: Any) -> str:
    """JSON with NaN written as null."""
    return json.dumps(clean_json(obj), sort_keys=True, default=str, allow_nan=False)


def row_problem(row: ResultRow) -> str | None:
    """Why `row` must not be stored (no samples, a non-finite primary metric), or None."""
    if row.n_samples <= 0:
        return "it has no samples"
    primary = (row.settings or {}).get("primary_metric")
    value = row.metrics.get(primary) if primary else None
    if primary and (not isinstance(value, int | float) or not math.isfinite(value)):
        return f"its primary metric {primary} is {value!r}"
    return None


SQLITE_MAGIC = b"SQLite format 3\x00"


def check_store_path(path: Path | str) -> None:
    """Before any work (the planner calls this): the store is a file path, an existing file is a harness results
    store of a schema this release reads, and both the file and its folder can be written (SQLite writes a
    journal beside the file), so a computed cell is never lost at `put`. Nothing is created or changed."""
    from qvlm_harness.writable import check_output_folder

    path = Path(path).expanduser()
    if path.is_dir():
        raise HarnessError(f"--store {path} is a folder; pass a file path (e.g. {path / 'harness.db'})")
    check_output_folder(path.parent, f"--store {path}: its folder")
    if not path.exists():
        return
    with open(path, "rb") as f:
        head = f.read(len(SQLITE_MAGIC))
    if not head:
        return  # an empty file: SQLite makes it a new store
    if head != SQLITE_MAGIC:
        raise HarnessError(f"--store {path} is not a SQLite file (so not a harness results store); pass another "
                           "path or move the file away")
    if not os.access(path, os.W_OK):
        raise HarnessError(f"--store {path} is read-only; make it writable or pass another --store")
    try:
        con = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=60)
        try:
            tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
            version = con.execute("PRAGMA user_version").fetchone()[0]
            con.execute("BEGIN IMMEDIATE")  # takes the write lock: fails on a file SQLite can only read
            con.rollback()
        finally:
            con.close()
    except sqlite3.DatabaseError as exc:
        raise HarnessError(f"--store {path} cannot be used ({exc}); pass another path or move the file away") from None
    if tables and "results" not in tables:
        raise HarnessError(f"--store {path} is not a harness results store (it holds other tables: "
                           f"{', '.join(tables[:3])}); pass another path or move the file away")
    if version > SCHEMA_VERSION:
        raise HarnessError(f"--store {path} was written by a newer qvlm-harness (schema {version}, this one reads "
                           f"{SCHEMA_VERSION}); upgrade qvlm-harness")


class Store:
    """A SQLite results store (created on first use, migrated when older)."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.bad_rows: dict[str, str] = {}
        if self.path.is_dir():
            raise HarnessError(f"--store {self.path} is a folder; pass a file path (e.g. {self.path / 'harness.db'})")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise HarnessError(f"cannot create the store's folder {self.path.parent} ({exc.strerror})") from None
        try:
            with self._connect() as con:
                self._migrate(con)
        except sqlite3.DatabaseError as exc:
            raise HarnessError(f"--store {self.path} is not a harness results store ({exc}); pass another path "
                               "or move the file away") from None

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=60)
        con.row_factory = sqlite3.Row
        return con

    def _migrate(self, con: sqlite3.Connection) -> None:
        version = con.execute("PRAGMA user_version").fetchone()[0]
        exists = con.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='results'").fetchone()
        if not exists:
            others = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
            if others:
                raise sqlite3.DatabaseError(f"it holds other tables ({', '.join(others[:3])}) and no results table")
            con.executescript(SCHEMA)
            con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            return
        if version > SCHEMA_VERSION:
            raise HarnessError(f"--store {self.path} was written by a newer qvlm-harness (schema {version}, this one "
                               f"reads {SCHEMA_VERSION}); upgrade qvlm-harness")
        columns = {r[1] for r in con.execute("PRAGMA table_info(results)")}
        for v in range(max(version, 1) + 1, SCHEMA_VERSION + 1):
            for stmt in MIGRATIONS.get(v, ()):
                added = stmt.split("ADD COLUMN ")[1].split()[0] if "ADD COLUMN" in stmt else None
                if added is None or added not in columns:
                    con.execute(stmt)
        if version != SCHEMA_VERSION:  # a current store is opened without a write (a report changes no byte)
            con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def has(self, cell_id: str) -> bool:
        """Whether a current (not superseded), readable row of this id exists: a superseded or unreadable one is
        recomputed (from its sample log, so cheaply) and becomes current again."""
        with self._connect() as con:
            rec = con.execute("SELECT * FROM results WHERE cell_id = ? AND superseded_by IS NULL",
                              (cell_id,)).fetchone()
        if rec is None:
            return False
        try:
            _row_from_record(dict(rec))
        except (ValueError, TypeError, KeyError, AttributeError):
            return False  # unreadable (edited by hand): recomputed from its sample log and replaced by `put`
        return True

    def put(self, row: ResultRow) -> None:
        """Write `row` (replacing a row of the same id) and supersede older rows of the same cell key."""
        problem = row_problem(row)
        if problem is not None:
            raise HarnessError(f"refusing to store cell {row.cell_id}: {problem}; its per-sample log is kept")
        data = asdict(row)
        data["superseded_by"] = None
        for key in JSON_FIELDS:
            data[key] = _dumps(data[key])
        cols = ", ".join(data)
        marks = ", ".join("?" for _ in data)
        with self._connect() as con:
            con.execute(f"INSERT OR REPLACE INTO results ({cols}) VALUES ({marks})", tuple(data.values()))
            if row.cell_key:
                con.execute("UPDATE results SET superseded_by = ? WHERE cell_key = ? AND cell_id != ? AND "
                            "superseded_by IS NULL", (row.cell_id, row.cell_key, row.cell_id))

    def get(self, cell_id: str) -> ResultRow | None:
        rows = list(self.rows(cell_ids=[cell_id], include_superseded=True))
        return rows[0] if rows else None

    def rows(self, *, run_id: str | None = None, cell_ids: Iterable[str] | None = None,
             include_superseded: bool = False, **equals: Any) -> Iterator[ResultRow]:
        """Rows matching the filters, oldest first; superseded rows only when asked. A row that cannot be read
        is reported once (by cell id, on stderr and in `bad_rows`) and skipped."""
        where, args = [], []
        if run_id is not None:
            where.append("run_id = ?")
            args.append(run_id)
        if cell_ids is not None:
            ids = list(cell_ids)
            where.append(f"cell_id IN ({', '.join('?' for _ in ids)})")
            args += ids
        if not include_superseded:
            where.append("superseded_by IS NULL")
        for key, value in equals.items():
            where.append(f"{key} = ?")
            args.append(value)
        sql = "SELECT * FROM results" + (f" WHERE {' AND '.join(where)}" if where else "") + " ORDER BY created"
        with self._connect() as con:
            records = con.execute(sql, args).fetchall()
        for rec in records:
            try:
                yield _row_from_record(dict(rec))
            except (ValueError, TypeError, KeyError, AttributeError) as exc:
                cid = str(dict(rec).get("cell_id"))
                if cid not in self.bad_rows:
                    self.bad_rows[cid] = f"{type(exc).__name__}: {exc}"
                    print(f"warning: store {self.path}: row {cid} cannot be read ({self.bad_rows[cid]}); "
                          "skipped", file=sys.stderr)

    def runs(self) -> list[tuple[str, str, int]]:
        """(run_id, first created, number of rows), newest first."""
        with self._connect() as con:
            return [tuple(r) for r in con.execute(
                "SELECT run_id, MIN(created), COUNT(*) FROM results GROUP BY run_id ORDER BY MIN(created) DESC")]


def _row_from_record(data: dict[str, Any]) -> ResultRow:
    for key in JSON_FIELDS:
        raw = data.get(key)
        value = json.loads(raw) if raw else {}
        if not isinstance(value, dict):
            raise TypeError(f"{key} is a JSON {type(value).__name__}, not an object")
        data[key] = value
    data["metrics"] = {k: (math.nan if v is None else v) for k, v in data["metrics"].items()}
    row = ResultRow(**{k: v for k, v in data.items() if k in ROW_FIELDS})
    if not isinstance(row.n_samples, int) or not row.cell_id:
        raise TypeError("n_samples or cell_id is malformed")
    return row


class SampleLog:
    """Per-sample outputs of one cell as JSONL (prompt, raw output, parsed answer, score, timing).

    Lines are appended and flushed batch by batch; on restart, `done()` tells which samples are finished so an
    interrupted cell continues where it stopped. A torn last line (killed mid-write) is ignored, and a sample key
    written twice (two processes on one cell before `lock()` existed) counts once: the first record wins. One
    writer per cell: `lock()` holds an exclusive lock beside the log while a cell is answered.
    """

    def __init__(self, path: Path):
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        out, seen = [], set()
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a kill; that sample is simply redone
            if not isinstance(rec, dict) or "key" not in rec or rec["key"] in seen:
                continue
            seen.add(rec["key"])
            out.append(rec)
        return out

    def done(self) -> set[str]:
        return {rec["key"] for rec in self.read()}

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive lock of this cell's log (blocks while another process answers the same cell)."""
        import fcntl

        with open(self.path.with_name(self.path.name + ".lock"), "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def append(self, records: Iterable[dict]) -> None:
        torn = self.path.exists() and self.path.stat().st_size > 0 and not self.path.read_bytes().endswith(b"\n")
        with self.path.open("a", encoding="utf-8") as f:
            if torn:  # never glue a new record onto a line torn by a kill
                f.write("\n")
            for rec in records:
                f.write(_dumps(rec) + "\n")
            f.flush()
