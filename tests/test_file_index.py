"""The file index: a rerun reads only files whose (device, inode, size, mtime, ctime) changed
since they were hashed, or whose entry is too close to their mtime to trust (racy-clean)."""

import os
import shutil
import sqlite3
import time

import pytest
from PIL import Image

import sat_cli
from conftest import EXAMPLES
from sat_cli.inputs import images as images_module
from sat_cli.store.migrations import MIGRATIONS, apply_migrations


@pytest.fixture(scope="module")
def cap(tiny_model):
    return sat_cli.load(tiny_model, device="cpu")


@pytest.fixture
def reads(monkeypatch):
    """The paths a run reads (workers=0: the dataset runs in this process)."""
    seen = []
    real = images_module.read_file

    def counting(path, *args, **kwargs):
        seen.append(os.path.basename(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(images_module, "read_file", counting)
    return seen


def age(folder, seconds=10):
    """Set every file's mtime into the past so its index entry is past the racy window."""
    past = time.time() - seconds
    for p in folder.iterdir():
        os.utime(p, (past, past))


@pytest.fixture
def folder(tmp_path):
    f = tmp_path / "lib"
    f.mkdir()
    for name in ("chelsea.png", "coffee.png", "rocket.jpg"):
        shutil.copy(EXAMPLES / name, f / name)
    age(f)
    return f


def run(cap, folder, db, **kw):
    return cap.to_db(db, [folder], workers=0, **kw)


def test_unchanged_files_are_not_read_again(cap, folder, tmp_path, reads):
    db = tmp_path / "x.db"
    first = run(cap, folder, db)
    assert first.captioned == 3 and len(reads) == 3
    reads.clear()
    again = run(cap, folder, db)
    assert (again.captioned, again.skipped, again.failed) == (0, 3, 0)
    assert reads == []
    con = sqlite3.connect(db)
    assert con.execute("select count(*) from file_index").fetchone()[0] == 3


def test_rewritten_in_place_with_size_and_mtime_put_back_is_captioned_again(cap, folder, tmp_path, reads):
    db = tmp_path / "x.db"
    run(cap, folder, db)
    target = folder / "rocket.jpg"
    st = target.stat()
    data = bytearray(target.read_bytes())
    im = Image.open(EXAMPLES / "coffee.png").convert("RGB").resize(Image.open(target).size)
    im.save(tmp_path / "other.jpg", quality=90)
    other = (tmp_path / "other.jpg").read_bytes()
    new = (other + bytes(len(data)))[: len(data)] if len(other) <= len(data) else None
    if new is None:  # same size: flip bytes in the scan data instead
        data[len(data) // 2] ^= 0xFF
        new = bytes(data)
    time.sleep(0.02)
    with open(target, "r+b") as fh:  # in place: same inode
        fh.write(new)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # size and mtime as before; ctime moved
    after = target.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)
    assert after.st_ctime_ns != st.st_ctime_ns
    reads.clear()
    again = run(cap, folder, db)
    assert reads == ["rocket.jpg"]
    assert again.captioned + again.failed == 1 and again.skipped == 2


def test_renamed_or_moved_photo_is_recognised_by_content(cap, folder, tmp_path, reads):
    db = tmp_path / "x.db"
    run(cap, folder, db)
    (folder / "sub").mkdir()
    os.rename(folder / "coffee.png", folder / "sub" / "moved.png")
    reads.clear()
    again = run(cap, folder, db)
    assert reads == ["moved.png"]  # a new path: read and hashed once
    assert (again.captioned, again.skipped) == (0, 3)
    reads.clear()
    assert run(cap, folder, db).skipped == 3 and reads == []  # and now indexed under its new name


def test_racy_entries_and_future_mtimes_are_hashed_again(cap, folder, tmp_path, reads):
    db = tmp_path / "x.db"
    now = time.time()
    os.utime(folder / "chelsea.png", (now, now))  # written within the second the entry is recorded
    future = now + 3600
    os.utime(folder / "coffee.png", (future, future))  # a clock ahead
    run(cap, folder, db)
    reads.clear()
    again = run(cap, folder, db)
    assert sorted(reads) == ["chelsea.png", "coffee.png"]
    assert (again.captioned, again.skipped) == (0, 3)


def test_rehash_reads_everything(cap, folder, tmp_path, reads):
    db = tmp_path / "x.db"
    run(cap, folder, db)
    reads.clear()
    again = run(cap, folder, db, rehash=True)
    assert sorted(reads) == ["chelsea.png", "coffee.png", "rocket.jpg"] and again.skipped == 3


def test_cli_rehash_flag(folder, tmp_path, tiny_model):
    from click.testing import CliRunner

    from sat_cli.cli import cli

    db = tmp_path / "x.db"
    base = ["caption", str(folder), "--db", str(db), "--model", str(tiny_model), "--workers", "0", "-q"]
    assert CliRunner().invoke(cli, base).exit_code == 0
    result = CliRunner().invoke(cli, [*base, "--rehash"])
    assert result.exit_code == 0, result.output


def test_old_database_migrates_and_gets_an_index(cap, folder, tmp_path, reads):
    import sqlite_utils

    db_path = tmp_path / "old.db"
    db = sqlite_utils.Database(db_path)
    table = db["_sat_migrations"]
    table.create({"name": str, "applied_at": str}, pk="name")
    for fn in MIGRATIONS:
        if fn.__name__ < "m005":
            fn(db)
            table.insert({"name": fn.__name__, "applied_at": "2026-01-01T00:00:00+00:00"})
    db.conn.commit()
    assert "file_index" not in db.table_names()
    db.close()
    run(cap, folder, db_path)  # the old database opens, migrates, and is indexed
    db = sqlite_utils.Database(db_path)
    assert "file_index" in db.table_names() and db["file_index"].count == 3
    assert apply_migrations(db) == []
    reads.clear()
    assert run(cap, folder, db_path).skipped == 3 and reads == []


def test_a_rerun_with_nothing_new_never_builds_the_model(folder, tmp_path, tiny_model):
    import subprocess
    import sys

    db = tmp_path / "x.db"
    run(sat_cli.load(tiny_model, device="cpu"), folder, db)
    lazy = sat_cli.load(tiny_model, device="cpu", lazy=True)
    assert run(lazy, folder, db).skipped == 3 and not lazy.model.built
    shutil.copy(EXAMPLES / "astronaut.png", folder / "new.png")
    age(folder)  # else, on a fast machine, new.png's entry is still racy and the rerun below hashes it again
    assert run(lazy, folder, db).captioned == 1 and lazy.model.built
    # sat caption: a rerun with nothing new never imports torch
    code = ("import sys, runpy; sys.argv = ['sat', 'caption', sys.argv[1], '--db', sys.argv[2], '--model', sys.argv[3], "
            "'-q']\ntry:\n    runpy.run_module('sat_cli', run_name='__main__')\nexcept SystemExit as e:\n"
            "    assert e.code == 0, e.code\nprint('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(folder), str(db), str(tiny_model)], capture_output=True,
                         text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr
