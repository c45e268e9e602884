"""A run killed at any moment loses at most the batch in flight; the database stays consistent
and a rerun finishes the job."""

import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import sqlite_utils
from PIL import Image

from conftest import EXAMPLES
from sat_cli.store.queries import stored_results


@pytest.fixture
def many_photos(tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    base = Image.open(EXAMPLES / "chelsea.png").convert("RGB")
    for i in range(60):  # distinct content: each its own hash
        base.rotate(i * 6).save(folder / f"img{i:03d}.jpg", quality=80)
    return folder


def start(folder, db, model, *extra):
    return subprocess.Popen([sys.executable, "-m", "sat_cli", "caption", str(folder), "--db", str(db), "--model",
                             str(model), "--batch-size", "4", "--workers", "1", "-q", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for(db, n, proc, timeout=90):
    deadline = time.time() + timeout
    while stored_results(db, timeout=5) < n:
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline
        time.sleep(0.02)


def check_consistent(db_path, n_best=3):
    con = sqlite3.connect(db_path)
    assert con.execute("pragma integrity_check").fetchone()[0] == "ok"
    con.close()
    db = sqlite_utils.Database(db_path)
    for result in db["results"].rows:
        caps = list(db["captions"].rows_where("result_id = ?", [result["id"]]))
        assert sorted(c["rank"] for c in caps) == list(range(1, n_best + 1))
        assert all(db["attention_maps"].count_where("caption_id = ?", [c["id"]]) == 1 for c in caps)
        assert db["images"].count_where("sha256 = ? and status = 'ok'", [result["sha256"]]) >= 1
    # every image row marked ok has its result
    orphans = db.execute("select count(*) from images where status = 'ok' and sha256 not in "
                         "(select sha256 from results)").fetchone()[0]
    assert orphans == 0
    assert db.execute("select count(*) from captions_fts").fetchone()[0] == db["captions"].count
    return db


def test_sigkill_loses_at_most_the_batch_in_flight_and_rerun_completes(many_photos, tmp_path, tiny_model):
    db_path = tmp_path / "k.db"
    proc = start(many_photos, db_path, tiny_model)
    wait_for(db_path, 12, proc)
    proc.kill()  # SIGKILL: no cleanup at all
    proc.wait()
    db = check_consistent(db_path)
    done = db["results"].count
    assert 12 <= done < 60 and done % 4 == 0  # whole batches only
    assert db["runs"].get(1)["status"] == "running"  # it never got to say otherwise
    rerun = start(many_photos, db_path, tiny_model)
    out, err = rerun.communicate(timeout=180)
    assert rerun.returncode == 0, err.decode()
    db = check_consistent(db_path)
    assert db["results"].count == 60
    assert db["runs"].get(2)["skipped"] == done and db["runs"].get(2)["captioned"] == 60 - done


def test_sigterm_stops_cleanly(many_photos, tmp_path, tiny_model):
    db_path = tmp_path / "t.db"
    proc = start(many_photos, db_path, tiny_model)
    wait_for(db_path, 8, proc)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode == 130
    db = check_consistent(db_path)
    run = db["runs"].get(1)
    assert run["status"] == "interrupted" and run["captioned"] == db["results"].count < 60


def test_processes_creating_one_database_at_once_all_succeed(tmp_path):
    """torchrun ranks open (and so create and migrate) the same new database at the same moment.
    The processes import everything, say they are ready, wait at a barrier (a file) and are released
    together; the first migration holds its transaction 0.3 s and says when it runs. With the migration
    lock exactly one process migrates; without it the others read the list of applied migrations
    inside that window and run the migration again (each is idempotent, so only the count shows it):
    this test then fails every time."""
    code = ("import os, sys, time\n"
            "from sat_cli.store.writes import open_db\nfrom sat_cli.store import migrations\n"
            "first = migrations.MIGRATIONS[0]\n"
            "def slow(db):\n    print('migrating', flush=True)\n    time.sleep(0.3)\n    first(db)\n"
            "slow.__name__ = first.__name__\nmigrations.MIGRATIONS[0] = slow\n"
            "print('ready', flush=True)\n"
            "while not os.path.exists(sys.argv[2]): time.sleep(0.0005)\n"
            "open_db(sys.argv[1])")
    for attempt in range(3):
        db_path, go = tmp_path / f"race{attempt}.db", tmp_path / f"go{attempt}"
        procs = [subprocess.Popen([sys.executable, "-c", code, str(db_path), str(go)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(6)]
        assert [p.stdout.readline().strip() for p in procs] == ["ready"] * 6
        go.touch()
        outs = [p.communicate(timeout=120) for p in procs]
        assert [p.returncode for p in procs] == [0] * 6, [err for _, err in outs]
        assert sum(out.split().count("migrating") for out, _ in outs) == 1
        db = sqlite_utils.Database(db_path)
        assert db.journal_mode == "wal" and {"runs", "images", "results", "captions"} <= set(db.table_names())


def test_an_interrupt_just_after_a_commit_is_still_counted(many_photos, tmp_path, tiny_model, monkeypatch):
    """A signal can land between a batch's commit and the count after it: the run row must agree
    with what is stored."""
    import torch

    from sat_cli.captioning import CaptionOptions, caption_to_db
    from sat_cli.model.beam import DecodeSettings
    from sat_cli.model.checkpoint import load_checkpoint
    from sat_cli.store.writes import Store

    write_batch, written = Store.write_batch, []

    def write_then_interrupt(self, *args, **kwargs):
        write_batch(self, *args, **kwargs)
        written.append(1)
        if len(written) == 3:
            raise KeyboardInterrupt  # after the commit, before sat counts the batch

    monkeypatch.setattr(Store, "write_batch", write_then_interrupt)
    db_path = tmp_path / "i.db"
    model = load_checkpoint(tiny_model).for_inference(torch.device("cpu"))
    summary = caption_to_db(model, [str(many_photos)], str(db_path), DecodeSettings(),
                            CaptionOptions(batch_size=4, workers=0, quiet=True))
    db = sqlite_utils.Database(db_path)
    assert summary.interrupted and db["results"].count == 12
    assert summary.captioned == db["runs"].get(1)["captioned"] == 12
