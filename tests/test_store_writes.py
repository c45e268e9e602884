"""What the store writer puts in the database, read back with sqlite3 (store/writes.py: Store,
_tokens, _map_row): the run's provenance, one stamp per batch, error text of names that are not
UTF-8, --force rewrites, large batches, the tokens column, attention maps as float16 and the
messages of a Store that meets a locked database."""

import importlib.metadata
import inspect
import json
import platform
import re
import sqlite3
import sys

import numpy as np
import pytest
import sqlite_utils

import sat_cli
from conftest import rows
from sat_cli.records import Caption, Result
from sat_cli.store import writes
from sat_cli.store.writes import StorageError, Store, open_db

FP, KEY = "f" * 64, "k"


@pytest.fixture
def store(tmp_path):
    db = open_db(tmp_path / "out.db")
    yield Store(db)
    db.close()


def read(store, sql, params=()) -> list[dict]:
    """Rows as another program sees them: a fresh sqlite3 connection to the store's file."""
    file = dict((name, file) for _, name, file in store.db.conn.execute("PRAGMA database_list"))["main"]
    return rows(file, sql, *params)


def sha(i: int) -> str:
    return f"{i:064x}"


def photo(i: int, captions=None, content=None, words=("a", "dog")) -> Result:
    """A captioned photo: ``captions`` as given, else one caption of ``words`` without maps."""
    if captions is None:
        captions = [Caption(1, " ".join(words), list(words), -1.0, -0.5, True)]
    return Result(f"/photos/p{i}.jpg", sha256=sha(i if content is None else content), size=100 + i, width=64,
                  height=48, captions=captions)


def captions_of(store, content: int) -> list[dict]:
    return read(store, "SELECT c.* FROM captions c JOIN results r ON r.id = c.result_id "
                       "WHERE r.sha256 = ? ORDER BY c.rank", [sha(content)])


# -- the Store and its database ---------------------------------------------------------------

@pytest.fixture
def held(tmp_path):
    """The path of a sat database whose write lock another program holds."""
    path = tmp_path / "held.db"
    open_db(path).close()
    other = sqlite3.connect(path)
    other.execute("BEGIN IMMEDIATE")
    yield path
    other.execute("ROLLBACK")
    other.close()


def locked_write_message(db) -> str:
    """The StorageError a Store on ``db`` raises when it starts a write (the database is held)."""
    try:
        with pytest.raises(StorageError) as info:
            with Store(db).write():
                pass
    finally:
        db.close()
    return str(info.value)


def test_a_store_names_its_database_and_timeout_when_the_database_is_locked(held):
    """A Store on a database opened by open_db says which file is locked and how long it waited
    (open_db's --db-timeout), not a generic name and default."""
    text = locked_write_message(open_db(held, timeout=0.05))
    assert text.startswith(f"{held} is locked by another program")
    assert "waited 0.05 s" in text


def test_a_store_on_a_database_not_opened_by_open_db_still_gives_a_clear_message(held):
    """A Store given any sqlite_utils Database (no path or timeout known) says "the database" and
    open_db's default timeout, instead of failing on the missing attributes."""
    default = inspect.signature(open_db).parameters["timeout"].default
    text = locked_write_message(sqlite_utils.Database(sqlite3.connect(held, timeout=0)))
    assert text.startswith("the database is locked by another program")
    assert f"waited {default:g} s" in text


def test_a_run_is_recorded_as_running_with_its_command_and_versions(store, monkeypatch):
    """start_run stores status "running" until finish_run, the command line as a JSON list (any
    characters), the installed torch, Python and sat versions and the given fields."""
    argv = ["sat", "caption", "phötos/a b", "--db", 'say "x".db']
    monkeypatch.setattr(sys, "argv", argv)
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = None
    run_id = store.start_run(model_fingerprint=FP, settings_key=KEY, device="cpu")
    [run] = read(store, "SELECT * FROM runs WHERE id = ?", [run_id])
    assert run["status"] == "running" and run["finished_at"] is None
    assert json.loads(run["command"]) == argv
    assert run["torch_version"] == torch_version
    assert run["python_version"] == platform.python_version()
    assert run["sat_version"] == sat_cli.__version__
    assert (run["model_fingerprint"], run["settings_key"], run["device"]) == (FP, KEY, "cpu")
    assert re.fullmatch(r"[0-9a-f]{32}", run["uid"])
    store.finish_run(run_id, "done", 2, 1, 0)
    [run] = read(store, "SELECT * FROM runs WHERE id = ?", [run_id])
    assert (run["status"], run["captioned"], run["skipped"], run["failed"]) == ("done", 2, 1, 0)


def test_a_run_without_torch_installed_stores_no_torch_version(store, monkeypatch):
    """Without an installed torch the version is NULL (unknown), not an empty string."""
    real = importlib.metadata.version

    def version(name):
        if name == "torch":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    run_id = store.start_run()
    [run] = read(store, "SELECT torch_version FROM runs WHERE id = ?", [run_id])
    assert run["torch_version"] is None


# -- write_batch -----------------------------------------------------------------------------

def test_every_row_of_a_batch_carries_that_batch_stamp(store, monkeypatch):
    """images.updated_at and results.created_at are the time of the batch that wrote them, for
    new content (bulk) as for a --force rewrite and a content met twice (one at a time)."""
    run_id = store.start_run()
    stamps = iter(["2026-01-01T00:00:00+00:00", "2026-01-02T00:00:00+00:00"])
    monkeypatch.setattr(writes, "now", lambda: next(stamps))
    store.write_batch(run_id, [photo(1), photo(2), Result("/photos/bad.jpg", sha256=sha(9), error="broken")],
                      FP, KEY)
    store.write_batch(run_id, [photo(3, content=1), photo(4, content=4), photo(5, content=4)], FP, KEY)
    images = {r["path"]: r["updated_at"] for r in read(store, "SELECT path, updated_at FROM images")}
    assert images == {"/photos/p1.jpg": "2026-01-01T00:00:00+00:00", "/photos/p2.jpg": "2026-01-01T00:00:00+00:00",
                      "/photos/bad.jpg": "2026-01-01T00:00:00+00:00", "/photos/p3.jpg": "2026-01-02T00:00:00+00:00",
                      "/photos/p4.jpg": "2026-01-02T00:00:00+00:00", "/photos/p5.jpg": "2026-01-02T00:00:00+00:00"}
    results = {r["sha256"]: r["created_at"] for r in read(store, "SELECT sha256, created_at FROM results")}
    assert results == {sha(1): "2026-01-02T00:00:00+00:00", sha(2): "2026-01-01T00:00:00+00:00",
                       sha(4): "2026-01-02T00:00:00+00:00"}


def test_an_error_naming_a_file_that_is_not_utf8_is_stored_readable(store):
    """A failed image's error text may hold a name that is not UTF-8 (surrogate escapes): it is
    stored with each such byte as \\xNN, like images.path; a captioned image has no error."""
    run_id = store.start_run()
    bad = "/photos/caf\udce9.jpg"
    store.write_batch(run_id, [Result(bad, sha256=sha(1), error=f"cannot identify image file {bad!s}"),
                               Result("/photos/plain.jpg", sha256=sha(2), error="truncated: 3 bytes"),
                               photo(3)], FP, KEY)
    rows = {r["path"]: (r["status"], r["error"]) for r in read(store, "SELECT path, status, error FROM images")}
    assert rows == {"/photos/caf\\xe9.jpg": ("failed", "cannot identify image file /photos/caf\\xe9.jpg"),
                    "/photos/plain.jpg": ("failed", "truncated: 3 bytes"), "/photos/p3.jpg": ("ok", None)}


def test_after_runs_once_inside_the_batch_transaction(store):
    """``after(records)`` sees the batch's rows inside the open transaction; when it fails, the
    whole batch is rolled back and its exception goes on."""
    run_id = store.start_run()
    seen = []

    def after(records):
        conn = store.db.conn
        seen.append((records, conn.in_transaction, conn.execute("SELECT count(*) FROM results").fetchone()[0]))

    records = [photo(1), photo(2)]
    store.write_batch(run_id, records, FP, KEY, after=after)
    assert len(seen) == 1 and seen[0][0] is records and seen[0][1:] == (True, 2)

    def failing(records):
        raise RuntimeError("file index failed")

    with pytest.raises(RuntimeError, match="file index failed"):
        store.write_batch(run_id, [photo(3), photo(4, content=1)], FP, KEY, after=failing)
    assert [r["path"] for r in read(store, "SELECT path FROM images ORDER BY id")] == ["/photos/p1.jpg",
                                                                                      "/photos/p2.jpg"]
    assert [r["sha256"] for r in read(store, "SELECT sha256 FROM results ORDER BY id")] == [sha(1), sha(2)]


def test_a_batch_of_new_photos_inserts_its_captions_with_one_statement(store):
    """New content takes the bulk path: all captions of the batch reach `captions` (and its
    full-text trigger) through one statement, not one per caption (a third of the writer's CPU,
    issue 22). The rows are the same either way (test_store_batches); this is what differs."""
    run_id = store.start_run()
    records = [photo(i, captions=[Caption(r, f"a dog {r}", ["a", "dog", str(r)], -r, -r / 3, True)
                                  for r in (1, 2, 3)]) for i in range(4)]
    statements = []
    store.db.conn.set_trace_callback(statements.append)
    try:
        store.write_batch(run_id, records, FP, KEY)
    finally:
        store.db.conn.set_trace_callback(None)
    inserts = {s for s in statements if re.match(r"(?i)\s*insert\s+into\s+(main\.)?captions\b", s)}
    assert len(inserts) == 1, inserts
    assert len(read(store, "SELECT id FROM captions")) == 12


@pytest.mark.parametrize("position", [0, 499, 500, 1000])
def test_a_large_batch_replaces_a_stored_result_wherever_it_sits(store, position):
    """A batch of 1001 photos (more than one query's worth of parameters) with one content that
    is stored already, at any position: that result is replaced (--force), the others added."""
    run_id = store.start_run()
    store.write_batch(run_id, [photo(position, words=("old",))], FP, KEY)
    store.write_batch(run_id, [photo(i, words=("new",)) for i in range(1001)], FP, KEY)
    assert [c["text"] for c in captions_of(store, position)] == ["new"]
    assert len(read(store, "SELECT id FROM results")) == 1001
    assert read(store, "SELECT count(*) AS n, count(DISTINCT result_id) AS r, min(text) AS lo, max(text) AS hi "
                       "FROM captions") == [{"n": 1001, "r": 1001, "lo": "new", "hi": "new"}]


def test_a_force_rewrite_points_each_new_map_at_its_own_caption(store):
    """Rewriting a stored result (one image at a time) deletes its old captions and maps and
    stores each new map under the id of the caption it belongs to."""
    rng = np.random.default_rng(0)
    run_id = store.start_run()
    plain = [Caption(r, "a dog", ["a", "dog"], -1.0, -0.5, True) for r in (1, 2, 3)]
    store.write_batch(run_id, [photo(1, captions=plain), photo(2, captions=plain)], FP, KEY)  # captions 1-6
    words = [["a"], ["a", "red", "dog"], ["a", "dog"]]
    maps = [rng.random((len(w), 2, 3), dtype=np.float32).astype(np.float16) for w in words]
    new = [Caption(r, " ".join(w), w, -1.0 * r, -0.4 * r, True, m) for r, (w, m) in enumerate(zip(words, maps), 1)]
    store.write_batch(run_id, [photo(3, captions=new, content=1)], FP, KEY)
    caps = captions_of(store, 1)
    assert [json.loads(c["tokens"]) for c in caps] == words
    stored = read(store, "SELECT * FROM attention_maps ORDER BY caption_id")
    assert [m["caption_id"] for m in stored] == [c["id"] for c in caps]
    for cap, row, want in zip(caps, stored, maps):
        assert (row["words"], row["grid_h"], row["grid_w"]) == want.shape == (len(json.loads(cap["tokens"])), 2, 3)
        assert np.array_equal(np.frombuffer(row["data"], "<f2").reshape(want.shape), want)
    assert len(read(store, "SELECT id FROM captions")) == 6  # the old three of content 1 are gone


# -- the tokens column and the maps ----------------------------------------------------------

WORD_LISTS = [
    [], [""], ["a", ""], ["", ""], ["a", "dog", "on", "the", "grass"], ["a b"], ["12", "3"],
    ['say "hi"'], ["back\\slash"], ["café"], ["Dog"], ["tab\tand", "new\nline"], ["<unk>"], ["a", "dog."],
]


@pytest.mark.parametrize("force", [False, True], ids=["bulk", "one-at-a-time"])
def test_tokens_are_the_json_of_the_words(store, force):
    """captions.tokens is json.dumps(words) and reads back as the same words, for any strings an
    imported vocabulary may hold: empty, quotes, backslashes, non-ASCII, control characters."""
    run_id = store.start_run()
    records = [photo(i, words=w) for i, w in enumerate(WORD_LISTS)]
    if force:  # all stored already: the batch replaces them one image at a time
        store.write_batch(run_id, [photo(i, words=("old",)) for i in range(len(WORD_LISTS))], FP, KEY)
    store.write_batch(run_id, records, FP, KEY)
    for i, words in enumerate(WORD_LISTS):
        [cap] = captions_of(store, i)
        assert json.loads(cap["tokens"]) == words
        assert cap["tokens"] == json.dumps(words)


def maps_to_store():
    rng = np.random.default_rng(1)
    base = rng.random((4, 5, 3))
    return {
        "float16": base.astype("<f2"),  # the pipeline's own: stored as it is
        "float32": base.astype(np.float32),
        "float64": base,
        "big-endian float16": base.astype(">f2"),
        "non-contiguous float16": base.astype("<f2").transpose(0, 2, 1),  # (4, 3, 5), strided
        "non-contiguous float32": base.astype(np.float32)[:, ::2, :],  # (4, 3, 3)
    }


@pytest.mark.parametrize("force", [False, True], ids=["bulk", "one-at-a-time"])
def test_attention_maps_are_stored_as_little_endian_float16_in_c_order(store, force):
    """Any float map, contiguous or not, of either byte order, is stored as its (words, grid_h,
    grid_w) shape, dtype "float16" and the little-endian float16 bytes in C order of its values."""
    maps = maps_to_store()
    run_id = store.start_run()
    records = [photo(i, captions=[Caption(1, "w w w w", ["w"] * 4, -1.0, -0.5, True, a)])
               for i, a in enumerate(maps.values())]
    if force:
        store.write_batch(run_id, [photo(i) for i in range(len(maps))], FP, KEY)
    store.write_batch(run_id, records, FP, KEY)
    for i, (name, a) in enumerate(maps.items()):
        [cap] = captions_of(store, i)
        [row] = read(store, "SELECT * FROM attention_maps WHERE caption_id = ?", [cap["id"]])
        assert row["dtype"] == "float16", name
        assert (row["words"], row["grid_h"], row["grid_w"]) == a.shape, name
        assert isinstance(row["data"], bytes) and len(row["data"]) == 2 * a.size, name
        values = np.frombuffer(row["data"], "<f2").reshape(a.shape)
        assert np.array_equal(values, a.astype(np.float16)), name
