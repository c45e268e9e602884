"""Databases written by earlier versions of sat (tests/fixtures/db, one per schema step; README.md
there says how each was made): today's code migrates each on its first open and keeps every row,
exports it, searches it and appends a rerun to it."""

import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from sat_cli.cli.main import cli
from sat_cli.store.migrations import MIGRATIONS

FIXTURES = Path(__file__).parent / "fixtures" / "db"
NAMES = sorted(p.stem for p in FIXTURES.glob("m*.db"))

# What each table held in the first schema, compared column by column after the migrations.
TABLES = {
    "runs": "SELECT * FROM runs ORDER BY id",
    "images": "SELECT id, path, sha256, bytes, width, height, status, error, run_id, updated_at FROM images ORDER BY id",
    "results": "SELECT * FROM results ORDER BY id",
    "captions": "SELECT * FROM captions ORDER BY id",
    "attention_maps": "SELECT * FROM attention_maps ORDER BY caption_id",
    "metadata_writes": "SELECT * FROM metadata_writes ORDER BY id",
}


def read(db_path: Path, columns_of: dict | None = None) -> dict:
    """Every row of the first-schema columns (``columns_of``: the columns each table had before)."""
    conn = sqlite3.connect(db_path)
    try:
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        out = {}
        for table, sql in TABLES.items():
            if table not in names or (columns_of is not None and table not in columns_of):
                continue
            cur = conn.execute(sql)
            cols = [d[0] for d in cur.description]
            keep = columns_of[table] if columns_of else cols
            out[table] = (keep, [tuple(row[cols.index(c)] for c in keep) for row in cur.fetchall()])
        return out
    finally:
        conn.close()


@pytest.fixture(params=NAMES)
def old_db(request, tmp_path):
    """A copy of one fixture (the fixture itself is never opened by sat) and its rows before."""
    copy = tmp_path / f"{request.param}.db"
    shutil.copyfile(FIXTURES / f"{request.param}.db", copy)
    return request.param, copy, read(copy)


def sat(*args, code=0):
    r = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == code, r.output
    return r.output


# The migrations each fixture's version had applied, and whether it wrote metadata (sat caption --xmp).
WROTE = {
    "m001": (["m001_initial"], False),
    "m004_runs_merged_from": (["m001_initial", "m002_metadata_writes", "m003_path_bytes", "m004_runs_merged_from"],
                              True),
    "m004": (["m001_initial", "m002_metadata_writes", "m003_path_bytes", "m004_run_provenance"], True),
    "m005": (["m001_initial", "m002_metadata_writes", "m003_path_bytes", "m004_run_provenance",
              "m005_file_index"], True),
}


def test_the_fixtures_are_what_their_versions_wrote():
    """One fixture per schema step a runnable version ever stopped at (m002 and m003 never were,
    see make.py), each holding only its own migrations, captions, maps, a failure and (from m004) metadata writes."""
    assert set(NAMES) == set(WROTE)
    newest = {fn.__name__ for fn in MIGRATIONS}
    assert newest <= {m for applied, _ in WROTE.values() for m in applied}, \
        "every migration adds its own fixture (DEVELOPERS.md, tests/fixtures/db/README.md)"
    for name in NAMES:
        conn = sqlite3.connect(FIXTURES / f"{name}.db")
        applied = [r[0] for r in conn.execute("SELECT name FROM _sat_migrations ORDER BY name")]
        assert applied == WROTE[name][0]
        assert conn.execute("SELECT count(*) FROM images WHERE status = 'failed'").fetchone()[0] == 1
        assert conn.execute("SELECT count(*) FROM captions").fetchone()[0] >= 4
        assert conn.execute("SELECT count(*) FROM attention_maps").fetchone()[0] >= 4
        if WROTE[name][1]:
            assert conn.execute("SELECT count(*) FROM metadata_writes").fetchone()[0] >= 3
        conn.close()


def test_first_open_migrates_and_keeps_every_row_and_export_shows_them(old_db):
    name, db, before = old_db
    out = json.loads(sat("export", db, "--format", "json", "--attention", "--metadata"))

    after = read(db, {t: cols for t, (cols, _) in before.items()})
    assert after == before  # every old column of every row, byte for byte (attention data included)
    conn = sqlite3.connect(db)
    assert {r[0] for r in conn.execute("SELECT name FROM _sat_migrations")} == \
        set(WROTE[name][0]) | {fn.__name__ for fn in MIGRATIONS}
    # m003 filled the exact-bytes key from the text path; m004 and m005 added their columns and table
    for path, path_bytes in conn.execute("SELECT path, path_bytes FROM images"):
        assert path_bytes == path.encode()
    assert {"uid", "merged_from"} <= {r[1] for r in conn.execute("PRAGMA table_info(runs)")}
    assert "file_index" in {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    conn.close()

    # the export shows each stored caption with its score and attention maps, and the failure
    captions = {c[0]: c for c in before["captions"][1]}
    cap_cols = before["captions"][0]
    maps = {m[0]: m for m in before["attention_maps"][1]}
    images = {row[1]: row for row in before["images"][1]}
    by_path = {rec["path"]: rec for rec in out}
    assert set(by_path) == set(images)
    failed = [rec for rec in out if rec["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["path"].endswith("broken.jpg") and failed[0]["error"]
    exported = [(rec["path"], c) for rec in out if rec["status"] == "ok" for c in rec["captions"]]
    assert len(exported) == len(captions)
    result_of = {row[1]: row[0] for row in before["results"][1]}  # sha256 -> result id
    stored = {(row[cap_cols.index("result_id")], row[cap_cols.index("rank")]): row for row in captions.values()}
    for path, c in exported:
        row = stored[(result_of[images[path][2]], c["rank"])]
        assert c["text"] == row[cap_cols.index("text")]
        assert c["score"] == pytest.approx(row[cap_cols.index("score")])
        assert c["words"] == json.loads(row[cap_cols.index("tokens")])
        _, words, h, w, dtype, data = maps[row[0]]
        expected = np.frombuffer(data, dtype=dtype).reshape(words, h, w)
        assert np.allclose(c["attention"]["maps"], expected, atol=1e-4)
    if WROTE[name][1]:
        cols, writes = before["metadata_writes"]
        listed = sorted((m["target"], m["caption"], m["status"]) for rec in out for m in rec["metadata"])
        assert listed == sorted((w[cols.index("target")], w[cols.index("caption")], w[cols.index("status")])
                                for w in writes)
        assert len(listed) == len(images) - 1  # a sidecar for each photo that was read


def test_search_finds_a_stored_caption_word(old_db):
    name, db, before = old_db
    cols, rows = before["captions"]
    text = rows[0][cols.index("text")]
    word = max(text.split(), key=len)
    found = json.loads(sat("search", db, word, "--json"))
    assert found and all(word in hit["caption"] for hit in found)
    assert text in {hit["caption"] for hit in found}
    with_word = sum(word in r[cols.index("text")].split() for r in rows)
    assert len(found) == with_word


def test_a_rerun_over_new_photos_appends(old_db, tmp_path, tiny_model):
    name, db, before = old_db
    new = tmp_path / "new"
    new.mkdir()
    Image.fromarray(np.full((40, 56, 3), (200, 30, 30), np.uint8)).save(new / "red.png")
    Image.fromarray(np.full((40, 56, 3), (30, 30, 200), np.uint8)).save(new / "blue.png")
    sat("caption", new, "--db", db, "--model", tiny_model, "--workers", "0", "-q", "--beam", "2")

    after = read(db, {t: cols for t, (cols, _) in before.items()})
    for table, (cols, rows) in before.items():
        assert after[table][1][: len(rows)] == rows, table  # the old rows, unchanged and first
    old_runs = len(before["runs"][1])
    assert len(after["runs"][1]) == old_runs + 1
    assert len(after["images"][1]) == len(before["images"][1]) + 2
    assert len(after["results"][1]) == len(before["results"][1]) + 2
    new_run = after["runs"][1][-1][0]
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT count(*) FROM results WHERE run_id = ?", [new_run]).fetchone()[0] == 2
    assert conn.execute("SELECT status FROM runs WHERE id = ?", [new_run]).fetchone()[0] == "done"
    assert conn.execute("SELECT uid FROM runs WHERE id = ?", [new_run]).fetchone()[0]
    conn.close()
    # both runs export together; the old one alone still has all its captions
    first_run = before["runs"][1][0][0]
    old_only = json.loads(sat("export", db, "--format", "json", "--run", first_run))
    assert sum(len(rec.get("captions", [])) for rec in old_only) == len(before["captions"][1])


def schema(db_path: Path) -> dict:
    """Tables with their columns (name, type, pk) and foreign keys, the definition of virtual (full-text)
    tables, indexes with their columns and uniqueness, triggers."""
    conn = sqlite3.connect(db_path)
    try:
        out = {}
        for kind, name, table in conn.execute("SELECT type, name, tbl_name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'"):
            if kind == "table":
                out[("table", name)] = sorted((r[1], r[2], r[5]) for r in conn.execute(f"PRAGMA table_info('{name}')"))
                out[("foreign keys", name)] = sorted((r[3], r[2], r[4]) for r in
                                                     conn.execute(f"PRAGMA foreign_key_list('{name}')"))
                sql = conn.execute("SELECT sql FROM sqlite_master WHERE name = ?", [name]).fetchone()[0] or ""
                if sql.upper().startswith("CREATE VIRTUAL TABLE"):  # the full-text index: its tokenizer
                    out[("virtual", name)] = " ".join(sql.replace("[", "").replace("]", "").split())
            elif kind == "index":
                unique = [r[2] for r in conn.execute(f"PRAGMA index_list('{table}')") if r[1] == name]
                out[("index", name)] = (table, unique, [r[2] for r in conn.execute(f"PRAGMA index_info('{name}')")])
            else:
                out[(kind, name)] = table
        return out
    finally:
        conn.close()


@pytest.mark.parametrize("name", NAMES)
def test_a_migrated_database_has_the_schema_of_a_new_one(name, tmp_path):
    """Whatever version wrote it, a migrated database ends with the tables, columns, indexes and
    triggers a new database gets (column order aside: m004_runs_merged_from added merged_from first)."""
    from sat_cli.store.writes import open_db

    open_db(tmp_path / "new.db").close()
    shutil.copyfile(FIXTURES / f"{name}.db", tmp_path / "old.db")
    open_db(tmp_path / "old.db").close()
    new = schema(tmp_path / "new.db")
    assert schema(tmp_path / "old.db") == new
    assert {"images", "runs", "results", "captions", "attention_maps", "metadata_writes", "file_index",
            "captions_fts"} <= {n for kind, n in new if kind == "table"}


@pytest.mark.parametrize("name", NAMES + ["new"])
def test_every_migration_runs_again_on_a_migrated_database_and_changes_nothing(name, tmp_path):
    """The migrations are idempotent, as migrations.py promises for one cut short where SQLite could
    not keep it in one transaction: run again on a database that already has their changes, each
    one leaves the schema and every row as they were."""
    import sqlite_utils

    from sat_cli.store.writes import open_db

    db_path = tmp_path / "db.db"
    if name != "new":
        shutil.copyfile(FIXTURES / f"{name}.db", db_path)
    open_db(db_path).close()
    before_schema, before_rows = schema(db_path), read(db_path)
    db = sqlite_utils.Database(db_path)
    for fn in MIGRATIONS:
        fn(db)
    db.conn.commit()
    db.close()
    assert schema(db_path) == before_schema
    assert read(db_path) == before_rows
