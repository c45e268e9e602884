"""Writes to the SQLite store: runs, images, results, captions and attention maps (schema in
migrations.py; reads in queries.py)."""

from __future__ import annotations

import json
import os
import platform
import re
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from ..errors import SatError
from ..records import Result
from .migrations import apply_migrations

SQLITE_MAGIC = b"SQLite format 3\x00"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def migration_lock(path: Path, timeout: float = 120.0):
    """A lock that makes processes on this machine take turns migrating one database (torchrun
    ranks creating a new database at the same moment would otherwise both create its tables).
    It lives in the temporary folder, keyed by the database's real path, not beside the database;
    SQLite's WAL mode needs every writer on one machine anyway."""
    import hashlib
    import tempfile

    from filelock import FileLock

    key = hashlib.sha256(os.fsencode(path.resolve())).hexdigest()[:24]  # any name, UTF-8 or not
    return FileLock(str(Path(tempfile.gettempdir()) / f"sat-db-{key}.lock"), timeout=timeout)


class StorageError(SatError):
    """The database cannot be written or read: full disk, lock, read-only, damage."""


def storage_error(exc: Exception, path, timeout: float = 60.0) -> StorageError:
    """One clear message for an SQLite failure, saying what happened to the data and what to do."""
    msg = str(exc)
    low = msg.lower()
    if "full" in low or "disk i/o" in low:
        text = (f"Cannot write {path}: the disk or the file-size limit is full ({msg}). Nothing of the batch in "
                "flight was stored and the database is as it was before it; free some space and run the same "
                "command again to resume.")
    elif "locked" in low or "busy" in low:
        text = (f"{path} is locked by another program: waited {timeout:g} s for it ({msg}). Close that program "
                "(or wait longer with --db-timeout) and run again; nothing was lost.")
    elif "readonly" in low or "read-only" in low:
        text = f"{path} cannot be written: the file, its folder or the disk is read-only ({msg}). Use a writable --db."
    elif "unable to open" in low:
        text = (f"Cannot open or create {path} ({msg}): its folder may be missing or read-only (SQLite also needs to "
                "create files beside the database).")
    elif "malformed" in low or "not a database" in low or "corrupt" in low:
        text = (f"{path} is damaged ({msg}). Keep a copy of it, then try `sqlite3 {path} .recover | sqlite3 "
                "repaired.db`, or caption into a new database.")
    else:
        text = f"Database error on {path}: {msg}"
    return StorageError(text)


def open_db(path: str | Path, must_exist: bool = False, timeout: float = 60.0):
    """Open (or create) a sat database: WAL journal, foreign keys, migrations applied. Other
    writers are waited for up to ``timeout`` seconds; any failure is a :class:`StorageError`."""
    import sqlite3
    import time

    from sqlite_utils import Database

    p = Path(path).expanduser()
    if p.exists():
        if p.is_dir():
            raise SatError(f"{p} is a folder, not a database file")
        try:
            with open(p, "rb") as f:
                head = f.read(16)
        except OSError as exc:
            raise StorageError(f"Cannot read {p}: {exc.strerror or exc}") from exc
        if head and head != SQLITE_MAGIC:
            raise SatError(f"{p} is not an SQLite database")
    elif must_exist:
        raise SatError(f"Database not found: {p}")
    # Two processes opening a new database at once (torchrun ranks) can meet SQLITE_BUSY while one
    # switches it to WAL or creates the schema; SQLite does not always wait on busy_timeout there,
    # so retry: the migrations are idempotent.
    deadline, delay = time.monotonic() + timeout, 0.02
    while True:
        db = None
        try:
            # One connection, handed from thread to thread (sat caption stores batches in a writer
            # thread): never used by two threads at once.
            db = Database(sqlite3.connect(str(p), check_same_thread=False))
            db.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")  # other writers wait their turn
            if db.journal_mode != "wal":
                db.enable_wal()
            db.execute("PRAGMA foreign_keys = ON")
            lock = migration_lock(p, max(timeout, 1.0))
            try:
                lock.acquire()
            except OSError as exc:  # filelock.Timeout, or a temporary folder that cannot be written
                db.close()
                raise StorageError(
                    f"Cannot take the lock that orders migrations of {p} ({lock.lock_file}: {exc.strerror or exc}); "
                    "another sat process may be migrating it. Run again; nothing was lost.") from exc
            try:
                apply_migrations(db)
            finally:
                lock.release()
            break
        except sqlite3.OperationalError as exc:
            if db is not None:
                db.close()
            if ("locked" in str(exc) or "busy" in str(exc)) and time.monotonic() < deadline:
                time.sleep(delay)
                delay = min(delay * 2, 0.5)
                continue
            raise storage_error(exc, p, timeout) from exc
        except sqlite3.DatabaseError as exc:
            if db is not None:
                db.close()
            raise storage_error(exc, p, timeout) from exc
    db.sat_path, db.sat_timeout = p, timeout
    return db


class Store:
    def __init__(self, db):
        self.db = db
        self.path = getattr(db, "sat_path", "the database")
        self.timeout = getattr(db, "sat_timeout", 60.0)

    @contextmanager
    def write(self):
        """One write transaction. BEGIN IMMEDIATE takes the write lock up front (waiting on
        busy_timeout for other writers); a deferred BEGIN that reads first would fail at once with
        SQLITE_BUSY in WAL mode when another process (a torchrun rank) commits in between. An
        SQLite failure rolls the transaction back and becomes a :class:`StorageError`."""
        import sqlite3

        conn = self.db.conn
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise storage_error(exc, self.path, self.timeout) from exc
        try:
            yield
        except BaseException as exc:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # SQLite rolled back already (a full disk can end the transaction itself)
            if isinstance(exc, sqlite3.Error):
                raise storage_error(exc, self.path, self.timeout) from exc
            raise
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            raise storage_error(exc, self.path, self.timeout) from exc

    def start_run(self, **fields) -> int:
        import sys
        from importlib.metadata import PackageNotFoundError, version

        from .. import __version__

        try:  # the installed version, without importing torch (a rerun with nothing new never does)
            torch_version = version("torch")
        except PackageNotFoundError:
            torch_version = None

        import uuid

        row = {
            "uid": uuid.uuid4().hex,
            "started_at": now(),
            "status": "running",
            "sat_version": __version__,
            "torch_version": torch_version,
            "python_version": platform.python_version(),
            "command": json.dumps(sys.argv),
            **fields,
        }
        with self.write():
            return self.db["runs"].insert(row).last_pk

    def finish_run(self, run_id: int, status: str, captioned: int, skipped: int, failed: int):
        with self.write():
            self.db["runs"].update(
                run_id,
                {"finished_at": now(), "status": status, "captioned": captioned, "skipped": skipped, "failed": failed},
            )

    def write_batch(self, run_id: int, records: list[Result], fingerprint: str, settings_key: str, after=None):
        """Store one batch in one transaction: a crash loses this batch or nothing. ``after(records)``
        runs inside the same transaction (the file index).

        A few statements per batch (``executemany``), not per image: new results, captions and
        maps get the ids SQLite would give them one by one (max + 1: the write lock is held).
        A batch that replaces stored results (--force) or holds one content twice is written
        one image at a time, as the rows must then be deleted and inserted in order."""
        from ..inputs.paths import display, to_bytes

        stamp = now()
        images = []
        for rec in records:
            error = rec.error.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace") \
                if rec.error else None
            images.append((display(rec.path), to_bytes(rec.path), rec.sha256, rec.size, rec.width, rec.height,
                           "failed" if rec.error else "ok", error, run_id, stamp))
        captioned = [rec for rec in records if rec.captions]
        with self.write():
            conn = self.db.conn
            conn.executemany(_UPSERT_IMAGE, images)
            if captioned and not self._bulk_results(run_id, captioned, fingerprint, settings_key, stamp):
                for rec in captioned:
                    self._replace_result(run_id, rec, fingerprint, settings_key, stamp)
            if after is not None:
                after(records)

    def _bulk_results(self, run_id, records: list[Result], fingerprint, settings_key, stamp) -> bool:
        """Insert the results, captions and maps of ``records`` with one statement each; False
        (nothing written) when one of them replaces a stored result or repeats a content."""
        conn = self.db.conn
        hashes = [rec.sha256 for rec in records]
        if len(set(hashes)) < len(hashes):
            return False
        for i in range(0, len(hashes), 500):  # SQLite's limit on parameters: 999 in old versions
            part = hashes[i : i + 500]
            if conn.execute(f"SELECT 1 FROM results WHERE model_fingerprint = ? AND settings_key = ? AND sha256 IN "
                            f"({', '.join('?' * len(part))}) LIMIT 1", [fingerprint, settings_key, *part]).fetchone():
                return False
        result_id = conn.execute("SELECT coalesce(max(id), 0) FROM results").fetchone()[0]
        caption_id = conn.execute("SELECT coalesce(max(id), 0) FROM captions").fetchone()[0]
        results, captions, maps = [], [], []
        for rec in records:
            result_id += 1
            results.append((result_id, rec.sha256, fingerprint, settings_key, run_id, stamp))
            for cap in rec.captions:
                caption_id += 1
                captions.append((caption_id, result_id, cap.rank, cap.text, _tokens(cap.words), cap.logprob,
                                 cap.score, int(cap.finished)))
                if cap.attention is not None:
                    maps.append(_map_row(caption_id, cap.attention))
        conn.executemany("INSERT INTO results (id, sha256, model_fingerprint, settings_key, run_id, created_at) "
                         "VALUES (?, ?, ?, ?, ?, ?)", results)
        # The captions go through a temporary table and into `captions` with one statement: the
        # full-text index's trigger then runs inside that one statement. Inserted one statement per
        # row, FTS5 flushes its pending terms at each statement's savepoint (an index segment per
        # caption, merged again and again): a third of the writer's CPU (bench/pipeline_bench.py:
        # 0.21 -> 0.14 ms per photo). Same rows, same trigger, same transaction: a crash stores
        # the batch with its index entries, or neither.
        conn.execute(_STAGE_TABLE)
        conn.executemany(_STAGE_CAPTION, captions)
        conn.execute(_FROM_STAGE)
        conn.execute("DELETE FROM temp.sat_stage_captions")
        conn.executemany(_INSERT_MAP, maps)
        return True

    def _replace_result(self, run_id, rec: Result, fingerprint, settings_key, stamp):
        old = self.db.execute(
            "SELECT id FROM results WHERE sha256 = ? AND model_fingerprint = ? AND settings_key = ?",
            [rec.sha256, fingerprint, settings_key],
        ).fetchone()
        if old:  # --force: the new result replaces the old one
            self.db.execute(
                "DELETE FROM attention_maps WHERE caption_id IN (SELECT id FROM captions WHERE result_id = ?)", [old[0]]
            )
            self.db.execute("DELETE FROM captions WHERE result_id = ?", [old[0]])
            self.db.execute("DELETE FROM results WHERE id = ?", [old[0]])
        result_id = self.db.execute(
            "INSERT INTO results (sha256, model_fingerprint, settings_key, run_id, created_at) VALUES (?, ?, ?, ?, ?)",
            [rec.sha256, fingerprint, settings_key, run_id, stamp],
        ).lastrowid
        for cap in rec.captions:
            caption_id = self.db.execute(
                "INSERT INTO captions (result_id, rank, text, tokens, logprob, score, finished) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [result_id, cap.rank, cap.text, _tokens(cap.words), cap.logprob, cap.score, int(cap.finished)],
            ).lastrowid
            if cap.attention is not None:
                self.db.execute(_INSERT_MAP, _map_row(caption_id, cap.attention))


_UPSERT_IMAGE = """INSERT INTO images (path, path_bytes, sha256, bytes, width, height, status, error, run_id, updated_at)
   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
   ON CONFLICT(path_bytes) DO UPDATE SET
     path = excluded.path, sha256 = excluded.sha256, bytes = excluded.bytes,
     width = coalesce(excluded.width, images.width),
     height = coalesce(excluded.height, images.height),
     status = excluded.status, error = excluded.error,
     run_id = excluded.run_id, updated_at = excluded.updated_at"""
_INSERT_CAPTION = ("INSERT INTO captions (id, result_id, rank, text, tokens, logprob, score, finished) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
_CAPTION_COLUMNS = "id, result_id, rank, text, tokens, logprob, score, finished"
_STAGE_TABLE = f"CREATE TEMP TABLE IF NOT EXISTS sat_stage_captions ({_CAPTION_COLUMNS})"  # no types: values kept as bound
_STAGE_CAPTION = f"INSERT INTO temp.sat_stage_captions ({_CAPTION_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
_FROM_STAGE = (f"INSERT INTO main.captions ({_CAPTION_COLUMNS}) SELECT {_CAPTION_COLUMNS} "
               "FROM temp.sat_stage_captions ORDER BY id")
_INSERT_MAP = "INSERT INTO attention_maps (caption_id, words, grid_h, grid_w, dtype, data) VALUES (?, ?, ?, ?, ?, ?)"


_PLAIN = re.compile(r"[a-z0-9 ]*")  # words json.dumps writes as they are, joined by spaces


def _tokens(words: list[str]) -> str:
    """The tokens column: ``json.dumps(words)``, written directly for the usual plain words."""
    if _PLAIN.fullmatch(" ".join(words)) and all(words):
        return '["' + '", "'.join(words) + '"]' if words else "[]"
    return json.dumps(words)


def _map_row(caption_id: int, a) -> tuple:
    """An attention_maps row: (words, grid_h, grid_w) as little-endian float16 bytes. Maps that are
    C-ordered little-endian float16 already (the pipeline's) are bound as they are: sqlite3 stores
    an object's buffer as a BLOB, the same bytes without first copying them into a bytes object."""
    import numpy as np  # here, not at the top: `sat export` and a rerun with nothing new never need it

    words, grid_h, grid_w = a.shape
    if a.dtype != np.dtype("<f2") or not a.flags.c_contiguous:
        a = np.ascontiguousarray(a, dtype="<f2")
    return (caption_id, words, grid_h, grid_w, "float16", a)
