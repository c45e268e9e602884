"""``sat search``: full-text search (SQLite FTS5, porter stemming) over stored captions."""

from __future__ import annotations

import sqlite3

from .errors import SatError

QUERY_HELP = (
    'FTS5 syntax: plain words (all must match), "an exact phrase", AND / OR / NOT in capitals, '
    "prefix* and NEAR(a b, 5). Put words with punctuation in double quotes."
)


def search(db, query: str, limit: int = 20, run: int | None = None, rank: int | None = None) -> list[dict]:
    """Best-matching captions first (bm25), one row per stored caption."""
    if not query.strip():
        raise SatError("Empty search query. " + QUERY_HELP)
    where = ["captions_fts MATCH :q"]
    if run is not None:
        where.append("results.run_id = :run")
    if rank is not None:
        where.append("captions.rank = :rank")
    sql = f"""
        SELECT images.id AS image_id, images.path, captions.rank, captions.text AS caption, captions.score,
               results.run_id AS run, bm25(captions_fts) AS relevance
        FROM captions_fts
        JOIN captions ON captions.id = captions_fts.rowid
        JOIN results ON results.id = captions.result_id
        JOIN images ON images.sha256 = results.sha256 AND images.status = 'ok'
        WHERE {" AND ".join(where)}
        ORDER BY relevance, images.path, captions.rank
        LIMIT :limit
    """
    try:
        return list(db.query(sql, {"q": query, "run": run, "rank": rank, "limit": limit}))
    except sqlite3.OperationalError as exc:  # the SQL is fixed: what fails is the user's MATCH query
        raise SatError(f"Bad search query {query!r} ({exc}). {QUERY_HELP}") from None
