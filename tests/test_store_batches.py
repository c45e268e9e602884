"""Storing a batch (issue 22): a few statements per batch and a writer thread beside the caption
loop store exactly the rows the one-image-at-a-time writer stored."""

import json

import numpy as np
import pytest

from sat_cli.records import Caption, Result
from sat_cli.store import writes
from sat_cli.store.writes import Store, open_db


def reference_write(store, run_id, records, fingerprint, key, stamp):
    """The writer as it was before batches were bulk-inserted: every row on its own."""
    from sat_cli.inputs.paths import display, to_bytes

    db = store.db
    with store.write():
        for rec in records:
            db.execute(writes._UPSERT_IMAGE, [display(rec.path), to_bytes(rec.path), rec.sha256, rec.size, rec.width,
                                              rec.height, "failed" if rec.error else "ok", rec.error, run_id, stamp])
            if not rec.captions:
                continue
            old = db.execute("SELECT id FROM results WHERE sha256 = ? AND model_fingerprint = ? AND settings_key = ?",
                             [rec.sha256, fingerprint, key]).fetchone()
            if old:
                db.execute("DELETE FROM attention_maps WHERE caption_id IN (SELECT id FROM captions WHERE result_id = ?)",
                           [old[0]])
                db.execute("DELETE FROM captions WHERE result_id = ?", [old[0]])
                db.execute("DELETE FROM results WHERE id = ?", [old[0]])
            result_id = db.execute("INSERT INTO results (sha256, model_fingerprint, settings_key, run_id, created_at) "
                                   "VALUES (?, ?, ?, ?, ?)", [rec.sha256, fingerprint, key, run_id, stamp]).lastrowid
            for cap in rec.captions:
                caption_id = db.execute(
                    "INSERT INTO captions (result_id, rank, text, tokens, logprob, score, finished) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [result_id, cap.rank, cap.text, json.dumps(cap.words), cap.logprob, cap.score, int(cap.finished)],
                ).lastrowid
                if cap.attention is not None:
                    a = cap.attention
                    db.execute("INSERT INTO attention_maps (caption_id, words, grid_h, grid_w, dtype, data) "
                               "VALUES (?, ?, ?, ?, ?, ?)",
                               [caption_id, *a.shape, "float16", a.astype("<f2").tobytes()])


def dump(db) -> list:
    rows = []
    for sql in ("SELECT * FROM images ORDER BY id", "SELECT * FROM results ORDER BY id",
                "SELECT * FROM captions ORDER BY id", "SELECT * FROM attention_maps ORDER BY caption_id",
                "SELECT rowid, text FROM captions_fts ORDER BY rowid"):
        rows.append(db.execute(sql).fetchall())
    # the full-text index itself, not only the rows it reads from: what a search finds, and
    # FTS5's own check that the index agrees with the captions
    rows.append(db.execute("SELECT rowid FROM captions_fts WHERE captions_fts MATCH 'dog OR grass OR cafe' "
                           "ORDER BY rowid").fetchall())
    db.execute("INSERT INTO captions_fts(captions_fts) VALUES ('integrity-check')")
    return rows


def batch(seed: int, n: int, shas=None) -> list[Result]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        sha = shas[i] if shas else f"{seed:02d}{i:062x}"
        if i % 5 == 4:
            out.append(Result(f"/photos/{seed}/bad{i}.jpg", sha256=sha, size=10, error="not an image"))
            continue
        if i % 7 == 6:
            out.append(Result(f"/photos/{seed}/known{i}.jpg", sha256=sha, size=10, skipped=True))
            continue
        caps = []
        for rank in (1, 2, 3):
            words = ["a", "dog", "on", "the", "grass"][: 2 + rank] if rank < 3 else \
                ["a", 'say "hi"', "café", "back\\slash", "", "<unk>"]  # imported vocabularies: any string
            att = rng.random((len(words), 3, 4), dtype=np.float32)
            att = att.astype("float16") if rank != 2 else att  # float32 maps are stored as float16 too
            caps.append(Caption(rank, " ".join(words), words, -1.5 * rank, -0.5 * rank, rank != 3,
                                att if i % 3 else None))
        out.append(Result(f"/photos/{seed}/p\udcff{i}.jpg", sha256=sha, size=100 + i, width=64, height=48,
                          captions=caps))
    return out


def test_bulk_batches_store_the_rows_the_row_by_row_writer_stored(tmp_path, monkeypatch):
    monkeypatch.setattr(writes, "now", lambda: "2026-12-05T00:00:00+00:00")
    dbs = {}
    for name in ("bulk", "rows"):
        db = open_db(tmp_path / f"{name}.db")
        store = Store(db)
        run_id = store.start_run(model_fingerprint="f" * 64, settings_key="k")
        batches = [
            batch(1, 20),
            batch(2, 12),
            batch(3, 6, shas=[f"{1:02d}{i:062x}" for i in (0, 1, 2, 3, 5, 7)]),  # --force: replaces stored results
            batch(4, 4, shas=["ab" * 32] * 4),  # one content twice in a batch
            batch(5, 9),
        ]
        for records in batches:
            if name == "bulk":
                store.write_batch(run_id, records, "f" * 64, "k")
            else:
                reference_write(store, run_id, records, "f" * 64, "k", writes.now())
        dbs[name] = dump(db)
        db.execute("UPDATE runs SET uid = '', started_at = ''")
    assert sum(len(t) for t in dbs["bulk"]) > 150
    assert dbs["bulk"] == dbs["rows"]


def test_a_storage_error_in_the_writer_thread_stops_the_run(tmp_path, photos, tiny_model, monkeypatch):
    import sqlite_utils

    from sat_cli.api import load
    from sat_cli.store.writes import StorageError

    calls = []
    original = Store.write_batch

    def failing(self, run_id, records, *args, **kwargs):
        if any(r.captions for r in records):
            calls.append(len(records))
            if len(calls) == 2:
                raise StorageError("disk full (test)")
        return original(self, run_id, records, *args, **kwargs)

    monkeypatch.setattr(Store, "write_batch", failing)
    seen = []
    cap = load(str(tiny_model), device="cpu")
    with pytest.raises(StorageError, match="disk full"):
        cap.to_db(tmp_path / "x.db", [photos], batch_size=1, workers=0, on_result=seen.append)
    db = sqlite_utils.Database(tmp_path / "x.db")
    assert db["results"].count == 1 and [r.path for r in seen] == [db["images"].get(1)["path"]]
    assert db["runs"].get(1)["status"] == "failed"
