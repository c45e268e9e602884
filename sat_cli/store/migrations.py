"""Numbered schema migrations, applied in order whenever a database is opened.

Each migration runs in a transaction and is idempotent (``if_not_exists``), so one cut short by
a crash leaves nothing half done and runs again on the next open. A released migration is never
edited: a change to the schema is a new function.
"""

from __future__ import annotations

from datetime import datetime, timezone

MIGRATIONS = []


def migration(fn):
    MIGRATIONS.append(fn)
    return fn


@migration
def m001_initial(db):
    db["runs"].create(
        {
            "id": int,
            "started_at": str,
            "finished_at": str,
            "status": str,  # running | done | interrupted | failed
            "model_path": str,
            "model_fingerprint": str,
            "encoder": str,
            "settings": str,  # JSON: beam_size, n_best, max_len, length_penalty, no_repeat_ngram
            "settings_key": str,
            "device": str,
            "precision": str,
            "batch_size": int,
            "sat_version": str,
            "torch_version": str,
            "python_version": str,
            "command": str,
            "captioned": int,
            "skipped": int,
            "failed": int,
        },
        pk="id",
        if_not_exists=True,
    )
    db["images"].create(
        {
            "id": int,
            "path": str,
            "sha256": str,
            "bytes": int,
            "width": int,
            "height": int,
            "status": str,  # ok | failed
            "error": str,
            "run_id": int,  # the last run that looked at this file
            "updated_at": str,
        },
        pk="id",
        foreign_keys=[("run_id", "runs", "id")],
        if_not_exists=True,
    )
    db["images"].create_index(["path"], unique=True, if_not_exists=True)
    db["images"].create_index(["sha256"], if_not_exists=True)
    # one result per image content x model x decode settings: what makes a rerun skip work
    db["results"].create(
        {
            "id": int,
            "sha256": str,
            "model_fingerprint": str,
            "settings_key": str,
            "run_id": int,
            "created_at": str,
        },
        pk="id",
        foreign_keys=[("run_id", "runs", "id")],
        if_not_exists=True,
    )
    db["results"].create_index(["sha256", "model_fingerprint", "settings_key"], unique=True, if_not_exists=True)
    db["captions"].create(
        {
            "id": int,
            "result_id": int,
            "rank": int,  # 1 = best of the n-best list
            "text": str,
            "tokens": str,  # JSON list of words
            "logprob": float,  # summed log-probability
            "score": float,  # logprob / length ** length_penalty
            "finished": int,  # 1 when the caption reached <end> before --max-len
        },
        pk="id",
        foreign_keys=[("result_id", "results", "id")],
        if_not_exists=True,
    )
    db["captions"].create_index(["result_id", "rank"], unique=True, if_not_exists=True)
    db["attention_maps"].create(
        {
            "caption_id": int,
            "words": int,  # number of maps: one per word of the caption
            "grid_h": int,
            "grid_w": int,
            "dtype": str,  # float16
            "data": bytes,  # words x grid_h x grid_w values, C order
        },
        pk="caption_id",
        foreign_keys=[("caption_id", "captions", "id")],
        if_not_exists=True,
    )
    db["captions"].enable_fts(["text"], create_triggers=True, tokenize="porter", replace=True)


@migration
def m002_metadata_writes(db):
    """metadata_writes: each description sat wrote into a photo (embed) or its XMP sidecar: where,
    when, which caption, what it replaced, so `sat metadata --remove`, --dry-run and reruns are exact."""
    db["metadata_writes"].create(
        {
            "id": int,
            "image_id": int,
            "target": str,  # the file written: the sidecar, or the photo itself (text form)
            "target_bytes": bytes,  # its exact name (the key)
            "kind": str,  # sidecar | embed
            "status": str,  # written | removed
            "caption": str,  # the description sat wrote
            "result_id": int,
            "run_id": int,  # the run whose caption it is
            "model_fingerprint": str,
            "settings_key": str,
            "score": float,
            "sat_version": str,
            "written_at": str,
            "removed_at": str,
            "created_file": int,  # 1: sat created this sidecar (--remove deletes it when nothing else is left)
            "previous": str,  # JSON {field: value} of what sat replaced (restored by --remove)
            "backup": str,  # the copy --backup kept, if any
            "file_sha256": str,  # the target's content right after sat wrote it
        },
        pk="id",
        foreign_keys=[("image_id", "images", "id")],
        if_not_exists=True,
    )
    db["metadata_writes"].create_index(["target_bytes"], unique=True, if_not_exists=True)
    db["metadata_writes"].create_index(["image_id"], if_not_exists=True)


@migration
def m003_path_bytes(db):
    """images.path_bytes: the exact bytes of each file name, the images key (a Linux name need not
    be UTF-8); images.path keeps a readable text form (each byte that is not UTF-8 as \\xNN)."""
    if "path_bytes" not in db["images"].columns_dict:
        db.execute("ALTER TABLE images ADD COLUMN path_bytes BLOB")
    db.execute("UPDATE images SET path_bytes = CAST(path AS BLOB) WHERE path_bytes IS NULL")
    db.execute("DROP INDEX IF EXISTS idx_images_path")
    db.execute("CREATE UNIQUE INDEX IF NOT EXISTS idx_images_path_bytes ON images (path_bytes)")
    db.execute("CREATE INDEX IF NOT EXISTS idx_images_path ON images (path)")


@migration
def m004_run_provenance(db):
    """runs.uid: a run's identity across databases (a random UUID); runs.merged_from: for a run
    copied by `sat merge`, the database and run id it came from."""
    columns = db["runs"].columns_dict
    if "uid" not in columns:
        db.execute("ALTER TABLE runs ADD COLUMN uid TEXT")
    if "merged_from" not in columns:
        db.execute("ALTER TABLE runs ADD COLUMN merged_from TEXT")
    db.execute("CREATE INDEX IF NOT EXISTS idx_runs_uid ON runs (uid)")


@migration
def m005_file_index(db):
    """file_index: for each path (exact bytes), the stat it had when it was hashed and that sha256,
    so a rerun can skip reading files that have not changed (see file_index.py)."""
    db.execute("""CREATE TABLE IF NOT EXISTS file_index (
        path_bytes BLOB PRIMARY KEY, dev INTEGER, ino INTEGER, size INTEGER, mtime_ns INTEGER,
        ctime_ns INTEGER, sha256 TEXT, recorded_ns INTEGER)""")


def apply_migrations(db) -> list[str]:
    """Apply the migrations this database lacks; returns their names."""
    table = db["_sat_migrations"]
    table.create({"name": str, "applied_at": str}, pk="name", if_not_exists=True)
    done = {row["name"] for row in table.rows}
    applied = []
    for fn in MIGRATIONS:
        if fn.__name__ not in done:
            # One transaction per migration where SQLite allows it (DDL is transactional): a process
            # killed in the middle leaves the database as it was, and the next open runs it again.
            conn = db.conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                fn(db)
                db.execute("INSERT OR IGNORE INTO _sat_migrations (name, applied_at) VALUES (?, ?)",
                           [fn.__name__, datetime.now(timezone.utc).isoformat(timespec="seconds")])
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            if conn.in_transaction:
                conn.execute("COMMIT")
            applied.append(fn.__name__)
    return applied
