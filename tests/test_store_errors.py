"""Opening a database in-process: one clear message per SQLite failure, the retry loop that waits
out another writer, and files that are not databases (store/writes.py: open_db, storage_error)."""

import sqlite3
import time

import pytest

from sat_cli.errors import SatError
from sat_cli.store import writes
from sat_cli.store.writes import StorageError, open_db, storage_error


DIAGNOSES = {"full": "free some space and run the same command again", "lock": "is locked by another program",
             "read-only": "is read-only", "open": "its folder may be missing or read-only", "damaged": ".recover",
             "other": "Database error on"}


@pytest.mark.parametrize("sqlite_text, diagnosis", [
    ("database or disk is full", "full"),
    ("disk I/O error", "full"),
    ("database is locked", "lock"),
    ("database table is busy", "lock"),
    ("attempt to write a readonly database", "read-only"),
    ("unable to open database file", "open"),
    ("database disk image is malformed", "damaged"),
    ("file is not a database", "damaged"),
    ("no such table: runs", "other"),
])
def test_each_sqlite_failure_gets_its_own_message(sqlite_text, diagnosis, tmp_path):
    path = tmp_path / "out.db"
    err = storage_error(sqlite3.OperationalError(sqlite_text), path, timeout=2.5)
    assert isinstance(err, StorageError)
    text = str(err)
    assert str(path) in text and sqlite_text in text
    assert [d for d, hint in DIAGNOSES.items() if hint in text] == [diagnosis], text  # one diagnosis
    if diagnosis == "lock":
        assert "waited 2.5 s" in text


@pytest.fixture
def flaky_connect(monkeypatch):
    """sqlite3.connect failing its first ``n`` calls with ``text``, recording open_db's sleeps."""
    real = sqlite3.connect
    state = {"n": 0, "text": "", "calls": 0, "sleeps": []}

    def connect(*args, **kwargs):
        state["calls"] += 1
        if state["calls"] <= state["n"]:
            raise sqlite3.OperationalError(state["text"])
        return real(*args, **kwargs)

    def sleep(seconds):
        state["sleeps"].append(seconds)

    monkeypatch.setattr(sqlite3, "connect", connect)
    monkeypatch.setattr(time, "sleep", sleep)
    return state


@pytest.mark.parametrize("text", ["database is locked", "database is busy"])
def test_open_db_retries_while_another_writer_holds_the_database(flaky_connect, text, tmp_path):
    """SQLite does not always wait on busy_timeout (a new database switching to WAL): open_db tries
    again, waiting longer each time up to half a second, then opens a working database."""
    flaky_connect.update(n=8, text=text)
    db = open_db(tmp_path / "out.db", timeout=30)
    try:
        assert flaky_connect["calls"] == 9
        assert db.journal_mode == "wal" and "runs" in db.table_names()
        assert db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    finally:
        db.close()
    sleeps = flaky_connect["sleeps"]
    assert len(sleeps) == 8 and sleeps[0] > 0
    assert all(b >= a for a, b in zip(sleeps, sleeps[1:])) and sleeps[1] > sleeps[0]  # backing off
    assert max(sleeps) == 0.5  # capped


def test_open_db_gives_up_at_its_timeout_with_the_lock_message(monkeypatch, tmp_path):
    """Another writer that never lets go: open_db keeps trying for its timeout, then says so."""
    real = sqlite3.connect

    def locked(*args, **kwargs):
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(sqlite3, "connect", locked)
    started = time.monotonic()
    with pytest.raises(StorageError) as err:
        open_db(tmp_path / "out.db", timeout=0.4)
    assert time.monotonic() - started >= 0.4
    text = str(err.value)
    assert f"{tmp_path / 'out.db'} is locked by another program: waited 0.4 s for it (database is locked)" in text
    monkeypatch.setattr(sqlite3, "connect", real)


def test_a_damaged_database_is_named_as_damaged_at_once(tmp_path):
    """SQLite's header but damaged pages: not retried, the damage message with the file's name."""
    path = tmp_path / "out.db"
    db = open_db(path)
    db.close()
    data = bytearray(path.read_bytes())
    data[100:4096] = b"\xff" * (4096 - 100)  # the first page's b-tree header and cells
    path.write_bytes(bytes(data))
    with pytest.raises(StorageError) as err:
        open_db(path, timeout=30)
    assert f"{path} is damaged" in str(err.value)


def test_files_that_are_not_databases(tmp_path):
    text = tmp_path / "notes.db"
    text.write_text("these are my notes, not a database\n")
    with pytest.raises(SatError) as err:
        open_db(text)
    assert str(err.value) == f"{text} is not an SQLite database"
    assert text.read_text() == "these are my notes, not a database\n"  # untouched
    with pytest.raises(SatError) as err:
        open_db(tmp_path)
    assert str(err.value) == f"{tmp_path} is a folder, not a database file"
    with pytest.raises(SatError) as err:
        open_db(tmp_path / "missing.db", must_exist=True)
    assert str(err.value) == f"Database not found: {tmp_path / 'missing.db'}"
    assert not (tmp_path / "missing.db").exists()
    empty = tmp_path / "empty.db"  # an empty file is a new database (SQLite's own rule)
    empty.touch()
    db = open_db(empty)
    assert "runs" in db.table_names()
    db.close()


def test_a_lock_file_that_cannot_be_taken_is_a_clear_error(monkeypatch, tmp_path):
    """The lock that orders migrations cannot be taken (a temporary folder that cannot be written):
    a StorageError naming the lock, and the database connection is closed."""
    class Unlockable:
        lock_file = "/nowhere/sat-db.lock"

        def acquire(self):
            raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(writes, "migration_lock", lambda path, timeout: Unlockable())
    with pytest.raises(StorageError) as err:
        open_db(tmp_path / "out.db")
    text = str(err.value)
    assert "Cannot take the lock that orders migrations of" in text
    assert "/nowhere/sat-db.lock: Permission denied" in text and "Run again; nothing was lost." in text
