"""Storage faults: a full disk, a database locked by another program, read-only files and folders,
a damaged database, kill -9 at any moment. Each gives one clear message and exit status 2, the
database stays as consistent as before, and the next run resumes."""

import os
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import sqlite_utils
from PIL import Image

from conftest import EXAMPLES, as_nobody


def make_photos(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    base = Image.open(EXAMPLES / "rocket.jpg").convert("RGB").resize((96, 64))
    for i in range(n):
        im = base.copy()
        im.putpixel((i % 96, (i // 96) % 64), (i % 256, 255 - i % 256, 0))  # distinct content
        im.save(folder / f"p{i:03d}.jpg", quality=90)
    return folder


def sat(*args, timeout=180, **kwargs):
    return subprocess.run([sys.executable, "-m", "sat_cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def consistent(db_path) -> sqlite_utils.Database:
    """The database opens, passes SQLite's integrity check, and every result is whole."""
    conn = sqlite3.connect(db_path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    db = sqlite_utils.Database(db_path)
    if "results" not in db.table_names():  # killed while creating it: the first migration is all or nothing
        assert db.table_names() == [], db.table_names()
        return db
    orphans = db.execute("SELECT COUNT(*) FROM results WHERE id NOT IN (SELECT result_id FROM captions)").fetchone()[0]
    assert orphans == 0
    return db


def test_a_full_disk_stops_cleanly_and_the_next_run_resumes(tmp_path, tiny_model):
    photos = make_photos(tmp_path / "photos", 24)
    db = tmp_path / "full.db"
    first = sat("caption", photos / "p000.jpg", "--db", db, "--model", tiny_model, "--workers", "0", "--beam", "3", "-q")
    assert first.returncode == 0, first.stderr
    limit = db.stat().st_size + 16 * 1024  # room for a batch or two, not for 24 images with their maps

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    full = sat("caption", photos, "--db", db, "--model", tiny_model, "--workers", "0", "--batch-size", "4",
               "--beam", "3", preexec_fn=small_disk)
    assert full.returncode == 2, full.stderr
    assert "full" in full.stderr and "run the same command again" in full.stderr and "Traceback" not in full.stderr
    stored = consistent(db)["results"].count
    assert 1 <= stored < 24
    again = sat("caption", photos, "--db", db, "--model", tiny_model, "--workers", "0", "--beam", "3", "-q")
    assert again.returncode == 0, again.stderr
    assert consistent(db)["results"].count == 24


def test_a_database_locked_by_another_program(tmp_path, tiny_model):
    photos = make_photos(tmp_path / "photos", 3)
    db = tmp_path / "locked.db"
    assert sat("caption", photos / "p000.jpg", "--db", db, "--model", tiny_model, "--workers", "0", "-q").returncode == 0
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sqlite3, sys, time; c = sqlite3.connect(sys.argv[1], isolation_level=None); "
        "c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); time.sleep(60)"), str(db)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = sat("caption", photos, "--db", db, "--model", tiny_model, "--workers", "0", "--db-timeout", "1")
        assert r.returncode == 2 and "locked by another program" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert "waited 1 s" in r.stderr  # --db-timeout reached the store (no wall-clock bound: busy machines)
    finally:
        holder.kill()
        holder.wait()
    assert consistent(db)["results"].count == 1
    r = sat("caption", photos, "--db", db, "--model", tiny_model, "--workers", "0", "-q")
    assert r.returncode == 0 and consistent(db)["results"].count == 3


def test_a_held_migration_lock_and_a_database_name_that_is_not_utf8(tmp_path, tiny_model):
    """Another sat process holding the lock that orders migrations: one clear message within
    --db-timeout, exit 2; a database whose file name is not UTF-8 opens like any other."""
    from sat_cli.store.writes import migration_lock

    photos = make_photos(tmp_path / "photos", 2)
    db = tmp_path / "held.db"
    lock = migration_lock(db)
    lock.acquire()
    try:
        r = sat("caption", photos, "--db", db, "--model", tiny_model, "--workers", "0", "--db-timeout", "1")
        assert r.returncode == 2 and "lock that orders migrations" in r.stderr and "Traceback" not in r.stderr, r.stderr
    finally:
        lock.release()
    odd = os.path.join(os.fsencode(tmp_path), b"caf\xe9.db")
    r = subprocess.run([sys.executable, "-m", "sat_cli", "caption", str(photos), "--db", odd, "--model", str(tiny_model),
                        "--workers", "0", "-q"], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    assert consistent(os.fsdecode(odd))["results"].count == 2


def test_read_only_database_and_folder(tiny_model):
    base = Path(tempfile.mkdtemp(prefix="sat-ro-"))
    try:
        photos = make_photos(base / "photos", 2)
        model = base / "model"
        shutil.copytree(tiny_model, model)
        db = base / "ro" / "r.db"
        db.parent.mkdir()
        assert sat("caption", photos, "--db", db, "--model", model, "--workers", "0", "-q").returncode == 0
        for p in [base, photos, model, *model.iterdir(), *photos.iterdir()]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        os.chmod(db.parent, 0o755)  # the folder and the database: readable, not writable, for others
        os.chmod(db, 0o644)
        env = {**os.environ, "HOME": str(base), "TORCH_HOME": str(base / "t"), "HF_HOME": str(base / "h")}
        cmd = [*as_nobody(), sys.executable, "-m", "sat_cli"]
        before = db.read_bytes()
        r = subprocess.run([*cmd, "caption", str(photos), "--db", str(db), "--model", str(model), "--workers", "0",
                            "--force"], capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert "read-only" in r.stderr or "cannot be written" in r.stderr or "Cannot open or create" in r.stderr
        assert db.read_bytes() == before
        new = base / "ro" / "new.db"
        r = subprocess.run([*cmd, "caption", str(photos), "--db", str(new), "--model", str(model), "--workers", "0"],
                           capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 2 and "Traceback" not in r.stderr and not new.exists(), r.stderr
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_a_damaged_database_gives_one_clear_message(tmp_path, tiny_model):
    photos = make_photos(tmp_path / "photos", 6)
    db = tmp_path / "d.db"
    assert sat("caption", photos, "--db", db, "--model", tiny_model, "--workers", "0", "-q").returncode == 0
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    data = bytearray(db.read_bytes())
    page = 4096
    for start in range(2 * page, len(data) - page, page):  # every page after the schema: garbage
        data[start + 8 : start + 64] = os.urandom(56)
    db.write_bytes(bytes(data))
    for args in (["caption", photos, "--db", db, "--model", tiny_model, "--workers", "0", "--force"],
                 ["export", db, "--format", "csv"], ["search", db, "rocket"]):
        r = sat(*args)
        assert r.returncode == 2 and "damaged" in r.stderr and "Traceback" not in r.stderr, (args[0], r.stderr)


KILL_AFTER_BATCHES = """import os, runpy, signal, sys
from sat_cli.store.writes import Store
n, write = int(sys.argv.pop(1)), Store.write_batch
def write_batch(self, run_id, records, *args, **kwargs):
    write(self, run_id, records, *args, **kwargs)
    write_batch.done += any(r.captions for r in records)
    if write_batch.done == n:
        os.kill(os.getpid(), signal.SIGKILL)
write_batch.done = 0
Store.write_batch = write_batch
sys.argv[0] = "sat"
runpy.run_module("sat_cli", run_name="__main__")
"""


def test_kill_9_at_any_moment_leaves_a_database_that_opens_and_resumes(tmp_path, tiny_model):
    """SIGKILL at early moments (creating the database and migrating it, wherever they land) and then
    right after a batch was committed (the process kills itself after its 2nd batch of captions, so each of
    those kills lands mid-run on any machine): every time the database passes the integrity check,
    each mid-run kill keeps exactly the two committed batches, and the last run completes with each
    photo captioned once."""
    photos = make_photos(tmp_path / "photos", 40)
    db = tmp_path / "k.db"
    args = ["caption", str(photos), "--db", str(db), "--model", str(tiny_model), "--workers", "0", "--batch-size", "4",
            "-q"]
    for delay in (0.3, 0.6, 0.9, 1.2):
        proc = subprocess.Popen([sys.executable, "-m", "sat_cli", *args], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if db.exists():
            consistent(db)
    for _ in range(3):
        before = consistent(db)["results"].count if db.exists() and "results" in consistent(db).table_names() else 0
        proc = subprocess.run([sys.executable, "-c", KILL_AFTER_BATCHES, "2", *args], capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        after = consistent(db)["results"].count
        assert after == before + 8 < 40  # some stored, not all: the kill landed mid-run, after two commits
    r = sat("caption", photos, "--db", db, "--model", tiny_model, "--workers", "0", "-q")
    assert r.returncode == 0, r.stderr
    final = consistent(db)
    assert final["results"].count == 40 and final["images"].count == 40
