"""Persistent answer cache: SQLite (WAL mode), shared across runs and safe under concurrent runs.

A row maps ``sha256(model id, prompt, options, settings)`` to the option probabilities the
backend returned. Only successful answers are stored, so a failed or interrupted run loses no
completed answer and a rerun resumes where it stopped; a fully cached rerun makes no LLM call.
Several processes may read and write the same file at once: each write is one short transaction
(``INSERT OR IGNORE``; answers are deterministic, so the first writer wins).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from agenttensor.errors import ConfigError

DEFAULT_CACHE_ENV = "AGENTTENSOR_LLM_CACHE"


def default_cache_path() -> Path:
    """$AGENTTENSOR_LLM_CACHE, else ~/.cache/agenttensor/llm_cache.sqlite."""
    env = os.environ.get(DEFAULT_CACHE_ENV)
    if env:
        return Path(env)
    return Path.home() / ".cache" / "agenttensor" / "llm_cache.sqlite"


def cache_key(model_id: str, prompt: str, options: Sequence[str], settings: Mapping[str, object]) -> str:
    """sha256 hex digest of a canonical JSON of everything that determines the answer."""
    payload = json.dumps(
        {"model": model_id, "prompt": prompt, "options": list(options), "settings": dict(settings)},
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class AnswerCache:
    """SQLite-backed map from cache key to option probabilities [K] float64.

    Parameters
    ----------
    path: the database file (created with its folder if missing); ``":memory:"`` for a
        process-local cache (tests).
    timeout_s: how long a writer waits for another process's lock before failing.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, timeout_s: float = 60.0):
        self.path = str(default_cache_path() if path is None else path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._conn = sqlite3.connect(self.path, timeout=timeout_s, check_same_thread=False)
            if self.path != ":memory:":
                self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute(f"PRAGMA busy_timeout={int(timeout_s * 1000)}")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            with self._conn:
                self._conn.execute(
                    "CREATE TABLE IF NOT EXISTS answers ("
                    " key TEXT PRIMARY KEY, model_id TEXT NOT NULL, prompt TEXT NOT NULL,"
                    " options TEXT NOT NULL, settings TEXT NOT NULL, probabilities TEXT NOT NULL,"
                    " created REAL NOT NULL)"
                )
        except sqlite3.Error as exc:
            raise ConfigError(f"cannot open the LLM answer cache at {self.path!r}: {exc}") from exc

    def get_many(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """Cached probabilities for those keys that are present."""
        found: dict[str, np.ndarray] = {}
        unique = list(dict.fromkeys(keys))
        with self._lock:
            for start in range(0, len(unique), 500):
                chunk = unique[start : start + 500]
                marks = ",".join("?" * len(chunk))
                rows = self._conn.execute(
                    f"SELECT key, probabilities FROM answers WHERE key IN ({marks})", chunk
                ).fetchall()
                for key, probs in rows:
                    found[key] = np.asarray(json.loads(probs), dtype=np.float64)
        return found

    def put_many(
        self,
        entries: Sequence[tuple[str, str, str, Sequence[str], Mapping[str, object], np.ndarray]],
    ) -> None:
        """Store (key, model_id, prompt, options, settings, probabilities) rows in one transaction."""
        rows = []
        now = time.time()
        for key, model_id, prompt, options, settings, probs in entries:
            probs = np.asarray(probs, dtype=np.float64)
            if not np.all(np.isfinite(probs)):
                raise ValueError(f"refusing to cache non-finite probabilities {probs.tolist()} for key {key}")
            rows.append(
                (key, model_id, prompt, json.dumps(list(options)), json.dumps(dict(settings), sort_keys=True),
                 json.dumps(probs.tolist()), now)
            )
        if not rows:
            return
        with self._lock, self._conn:
            self._conn.executemany("INSERT OR IGNORE INTO answers VALUES (?, ?, ?, ?, ?, ?, ?)", rows)

    def __len__(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM answers").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._conn.close()
