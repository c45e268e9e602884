"""Numbered schema migrations, applied in order whenever a database is opened.

Each migration is idempotent (``if_not_exists``), so one cut short by a crash completes on the
next open. A released migration is never edited: a change to the schema is a new function.
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


def apply_migrations(db) -> list[str]:
    """Apply the migrations this database lacks; returns their names."""
    table = db["_sat_migrations"]
    table.create({"name": str, "applied_at": str}, pk="name", if_not_exists=True)
    done = {row["name"] for row in table.rows}
    applied = []
    for fn in MIGRATIONS:
        if fn.__name__ not in done:
            fn(db)
            table.insert({"name": fn.__name__, "applied_at": datetime.now(timezone.utc).isoformat(timespec="seconds")},
                         ignore=True)  # another process may have applied it at the same moment
            applied.append(fn.__name__)
    return applied
