"""Every read of a sat database: export rows, search, the images of `sat show`, stored captions
for `sat eval`, what a rerun skips. Writes live in writes.py."""

from __future__ import annotations

import os
import re
import sqlite3
from pathlib import Path

from ..errors import SatError

SEARCH_HELP = (
    'FTS5 syntax: plain words (all must match), "an exact phrase", AND / OR / NOT in capitals, '
    "prefix* and NEAR(a b, 5). Put words with punctuation in double quotes."
)


def fs_path(row: dict) -> str:
    """The path that opens an images row's file again (its exact stored bytes)."""
    from ..inputs.paths import from_bytes

    raw = row.get("path_bytes")
    return from_bytes(raw) if raw is not None else row["path"]


def decode_attention(row: dict):
    """An attention_maps row -> (words, grid_h, grid_w) float32 numpy array."""
    import numpy as np

    arr = np.frombuffer(row["data"], dtype="<f2").astype(np.float32)
    return arr.reshape(row["words"], row["grid_h"], row["grid_w"])


def check_run(db, run: int | None):
    """A clear error for a run id that the database does not hold."""
    if run is not None and not db["runs"].count_where("id = ?", [run]):
        raise SatError(f"No run {run} in this database (see the runs table)")


def one_result_set(db, run: int | None, what: str):
    """Refuse to mix captions of several models or decode settings unless a run is picked."""
    if run is None:
        sets = db.execute("SELECT COUNT(DISTINCT model_fingerprint || settings_key) FROM results").fetchone()[0]
        if sets > 1:
            raise SatError(f"This database holds captions of {sets} different models or decode settings: "
                           f"pick one run with --run N for {what}")


def done_hashes(db, fingerprint: str, settings_key: str) -> frozenset[str]:
    """Content already captioned with this model and these settings: what a rerun skips."""
    rows = db.execute("SELECT sha256 FROM results WHERE model_fingerprint = ? AND settings_key = ?",
                      [fingerprint, settings_key])
    return frozenset(r[0] for r in rows)


def results_of_run(db, run_id: int) -> int:
    return db.execute("SELECT COUNT(*) FROM results WHERE run_id = ?", [run_id]).fetchone()[0]


def read_only_uri(path) -> str:
    """An SQLite URI that opens ``path`` read-only and never creates it: the name percent-encoded,
    so ``#``, ``?`` and ``%`` in it are part of the name."""
    return Path(os.fsdecode(path)).absolute().as_uri() + "?mode=ro"


def stored_results(db_path, timeout: float = 1.0) -> int:
    """Results in a database that another process may be creating or writing right now, read
    without taking part in it (read-only, no migration); 0 until it can be read."""
    try:
        conn = sqlite3.connect(read_only_uri(db_path), uri=True, timeout=timeout)
        try:
            return conn.execute("SELECT COUNT(*) FROM results").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error:
        return 0


def caption_rows(db, run: int | None = None, best: bool = False, failed: bool = True, attention: bool = False):
    """One row per stored caption (and per failed image), in path order: the rows of `sat export`
    and the gallery. Streamed."""
    join_run = " AND results.run_id = :run" if run is not None else ""
    join_rank = " AND captions.rank = 1" if best else ""
    keep = ["results.id IS NOT NULL"]
    if failed:
        keep.append("(images.status = 'failed'" + (" AND images.run_id = :run)" if run is not None else ")"))
    sql = f"""
        SELECT images.id AS image_id, images.path, images.path_bytes, images.sha256, images.width, images.height,
               images.status, images.error, results.id AS result_id, results.run_id,
               results.model_fingerprint, results.settings_key,
               captions.id AS caption_id, captions.rank, captions.text, captions.tokens,
               captions.logprob, captions.score, captions.finished
               {", attention_maps.words, attention_maps.grid_h, attention_maps.grid_w, attention_maps.data" if attention else ""}
        FROM images
        LEFT JOIN results ON results.sha256 = images.sha256 AND images.status = 'ok'{join_run}
        LEFT JOIN captions ON captions.result_id = results.id{join_rank}
        {"LEFT JOIN attention_maps ON attention_maps.caption_id = captions.id" if attention else ""}
        WHERE {" OR ".join(keep)}
        ORDER BY images.path, results.id, captions.rank
    """
    return db.query(sql, {"run": run})


def best_captions(db, run: int | None = None) -> dict[str, str]:
    """Best stored caption per image path (one model and settings: pick it with run)."""
    one_result_set(db, run, "scoring")
    where = "AND results.run_id = :run" if run is not None else ""
    rows = db.query(f"""SELECT images.path, images.path_bytes, captions.text FROM images
                        JOIN results ON results.sha256 = images.sha256 {where}
                        JOIN captions ON captions.result_id = results.id AND captions.rank = 1""", {"run": run})
    return {fs_path(r): r["text"] for r in rows}


def search(db, query: str, limit: int = 20, run: int | None = None, rank: int | None = None) -> list[dict]:
    """Best-matching captions first (FTS5 bm25, porter stemming), one row per stored caption."""
    if not query.strip():
        raise SatError("Empty search query. " + SEARCH_HELP)
    where = ["captions_fts MATCH :q"]
    if run is not None:
        where.append("results.run_id = :run")
    if rank is not None:
        where.append("captions.rank = :rank")
    sql = f"""
        SELECT images.id AS image_id, images.path, images.path_bytes, captions.rank, captions.text AS caption,
               captions.score,
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
        raise SatError(f"Bad search query {query!r} ({exc}). {SEARCH_HELP}") from None


SELECTOR_RULE = ("a stored path (full, relative or a unique tail such as photos/dog.jpg), a sha256 prefix of "
                 "4+ hex digits, or an image row id; id:N and sha:PREFIX say which one is meant")


def find_image(db, selector: str) -> dict:
    """An images row by path (full, relative or unique tail), sha256 prefix (4+ hex digits) or row
    id; ``id:N`` and ``sha:PREFIX`` pick one reading. An argument that more than one reading
    matches, with different images, is an error that lists the candidates."""
    from ..inputs.paths import to_bytes

    p = Path(selector).expanduser()
    exact = [r for candidate in {str(p.resolve()), str(p.absolute())}
             for r in db["images"].rows_where("path_bytes = ?", [to_bytes(candidate)])]
    if exact:
        return exact[0]
    kind, _, value = selector.partition(":")
    if kind in ("id", "sha") and value:
        readings = [(kind, value)]
    else:
        readings = [("id", selector), ("sha", selector), ("path", selector)]
    rows: dict[int, dict] = {}
    for kind, value in readings:
        if kind == "id" and value.isdigit():
            found = db["images"].rows_where("id = ?", [int(value)])
        elif kind == "sha" and re.fullmatch(r"[0-9a-fA-F]{4,64}", value):
            found = db["images"].rows_where("sha256 LIKE ?", [value.lower() + "%"])
        elif kind == "path":
            found = db["images"].rows_where("path LIKE ? ESCAPE '\\'", ["%" + _like("/" + value.lstrip("./"))])
        elif len(readings) == 1:
            raise SatError(f"{selector!r}: {'id: takes a number' if kind == 'id' else 'sha: takes 4+ hex digits'}")
        else:
            continue
        rows.update((r["id"], r) for r in found)
    if not rows:
        raise SatError(f"No image matches {selector!r} (give {SELECTOR_RULE})")
    if len({r["sha256"] for r in rows.values()}) > 1:
        listing = "\n  ".join(f"id:{r['id']}  sha:{r['sha256'][:10]}  {r['path']}" for r in list(rows.values())[:10])
        raise SatError(f"{selector!r} matches {len(rows)} images; pick one (id:N, sha:PREFIX or a full path):\n  "
                       + listing)
    return next(iter(rows.values()))


def _like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def caption_with_attention(db, image: dict, rank: int = 1, run: int | None = None) -> tuple[dict, object]:
    """The caption of rank ``rank`` for an image, with its attention maps (words, gh, gw)."""
    if image["status"] != "ok":
        raise SatError(f"{image['path']} was not captioned: {image['error']}")
    where = "AND results.run_id = :run" if run is not None else ""
    rows = list(db.query(f"""
        SELECT captions.*, results.run_id, attention_maps.words, attention_maps.grid_h, attention_maps.grid_w,
               attention_maps.data
        FROM results JOIN captions ON captions.result_id = results.id AND captions.rank = :rank
        LEFT JOIN attention_maps ON attention_maps.caption_id = captions.id
        WHERE results.sha256 = :sha {where}
        ORDER BY results.id DESC""", {"sha": image["sha256"], "rank": rank, "run": run}))
    if not rows:
        ranks = [r[0] for r in db.execute(
            "SELECT DISTINCT rank FROM captions JOIN results ON results.id = captions.result_id WHERE sha256 = ?",
            [image["sha256"]])]
        raise SatError(f"No caption of rank {rank} for {image['path']}" + (f" (ranks stored: {sorted(ranks)})" if ranks else ""))
    row = rows[0]
    if row["data"] is None:
        raise SatError(f"No attention maps stored for {image['path']} (it was captioned with --no-attention)")
    return row, decode_attention(row)
