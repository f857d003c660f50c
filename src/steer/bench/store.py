"""The results store: one SQLite database (WAL) with a row per finished cell, written in one transaction, and the
sample arrays in a content-addressed folder beside it (``DB.samples/<sha256>.npy``), written before the row that
names them. A run killed at any moment leaves only whole rows and, at worst, an unreferenced array."""

from __future__ import annotations

import hashlib
import io
import json
import os
import sqlite3
import tempfile
import time
from pathlib import Path

import numpy as np

__all__ = ["Store"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS cells (key TEXT PRIMARY KEY, config TEXT NOT NULL, result TEXT NOT NULL,
                                  samples TEXT NOT NULL, finished REAL NOT NULL);
CREATE TABLE IF NOT EXISTS sweeps (name TEXT PRIMARY KEY, keys TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS claims (id TEXT PRIMARY KEY, claim TEXT NOT NULL);
"""


class Store:
    def __init__(self, path: "str | Path"):
        self.path = Path(path)
        self.samples_dir = self.path.with_name(self.path.name + ".samples")
        self.db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        for attempt in range(600):  # switching to WAL takes an exclusive lock and does not wait for it: retry
            try:
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.executescript(SCHEMA)
                break
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or attempt == 599:
                    raise
                time.sleep(0.1)

    def done(self) -> set[str]:
        return {k for (k,) in self.db.execute("SELECT key FROM cells")}

    def register_sweep(self, name: str, keys: list[str]) -> None:
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO sweeps VALUES (?, ?)", (name, json.dumps(keys)))

    def register_claims(self, claims: list[dict]) -> None:
        """Each claim's statement, expectations and the keys of its method and baseline cells (by ``id``)."""
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO claims VALUES (?, ?)",
                                [(c["id"], json.dumps(c, sort_keys=True)) for c in claims])

    def claims(self) -> list[dict]:
        return [json.loads(c) for (c,) in self.db.execute("SELECT claim FROM claims ORDER BY rowid")]

    def put(self, key: str, config: dict, result: dict, samples: np.ndarray) -> None:
        """Write the samples (atomically, content-addressed), then the cell's row in one transaction; a cell that
        another process finished first is kept as it is."""
        buf = io.BytesIO()
        np.save(buf, samples, allow_pickle=False)
        data = buf.getvalue()
        digest = hashlib.sha256(data).hexdigest()
        self.samples_dir.mkdir(parents=True, exist_ok=True)
        target = self.samples_dir / f"{digest}.npy"
        if not target.exists():
            fd, tmp = tempfile.mkstemp(dir=self.samples_dir, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.execute("INSERT OR IGNORE INTO cells VALUES (?, ?, ?, ?, ?)",
                            (key, json.dumps(config, sort_keys=True), json.dumps(result, sort_keys=True), digest,
                             time.time()))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def rows(self) -> list[dict]:
        return [{"key": k, "config": json.loads(c), "result": json.loads(r), "samples": s}
                for k, c, r, s in self.db.execute("SELECT key, config, result, samples FROM cells ORDER BY finished")]

    def samples(self, digest: str) -> np.ndarray:
        return np.load(self.samples_dir / f"{digest}.npy", allow_pickle=False)

    def status(self) -> dict:
        done = self.done()
        sweeps = {name: json.loads(keys) for name, keys in self.db.execute("SELECT name, keys FROM sweeps")}
        total = set().union(*sweeps.values()) if sweeps else set()
        return {"done": len(done & total) if sweeps else len(done), "total": len(total) if sweeps else len(done),
                "sweeps": {name: {"done": len(done & set(keys)), "total": len(keys)} for name, keys in sweeps.items()}}

    def close(self) -> None:
        self.db.close()
