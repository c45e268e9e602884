"""``sat merge``: combine databases captioned on separate machines into one. Results are
deduplicated by their usual key (image content x model fingerprint x decode settings: the first
database to hold one keeps it); runs are copied with their provenance (``runs.merged_from``);
image rows keep the newest look at each path. Merging the same database twice adds nothing."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SatError
from .queries import read_only_uri

RUN_IDENTITY = ("started_at", "model_fingerprint", "settings_key", "command", "device")  # runs without a uid


@dataclass
class MergeCount:
    source: str
    runs: int = 0
    results: int = 0
    duplicates: int = 0  # results the target already held
    images: int = 0  # image rows added or brought up to date


@dataclass
class MergeSummary:
    into: str
    sources: list[MergeCount] = field(default_factory=list)


def merge(sources: list[str | Path], into: str | Path, progress=None) -> MergeSummary:
    """Merge ``sources`` into ``into`` (created if missing), each source in one transaction: a
    crash or a full disk leaves the target as it was before that source."""
    from .writes import Store, open_db

    target_path = Path(into).expanduser()
    resolved = {Path(s).expanduser().resolve() for s in sources}
    if target_path.exists() and target_path.resolve() in resolved:
        raise SatError(f"{into} is both a source and the target of the merge")
    for s in sources:
        _check_source(Path(s).expanduser())
    db = open_db(target_path)
    store = Store(db)
    summary = MergeSummary(str(target_path))
    try:
        for source in sources:
            with store.write():
                summary.sources.append(_merge_one(db, Path(source).expanduser().resolve()))
            if progress:
                progress(summary.sources[-1])
    finally:
        db.close()
    return summary


def _check_source(path: Path):
    """A sat database that can be read (it is only read, never migrated or locked for writing)."""
    import sqlite3

    if not path.is_file():
        raise SatError(f"Database not found: {path}")
    try:
        conn = sqlite3.connect(read_only_uri(path), uri=True)
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        conn.close()
    except sqlite3.DatabaseError as exc:
        from .writes import storage_error

        raise storage_error(exc, path) from exc
    if not {"runs", "images", "results", "captions", "attention_maps"} <= tables:
        raise SatError(f"{path} is not a sat database (no runs/images/results tables)")


def _merge_one(db, source: Path) -> MergeCount:
    import sqlite3

    count = MergeCount(str(source))
    src = sqlite3.connect(read_only_uri(source), uri=True)
    src.row_factory = sqlite3.Row
    try:
        run_map = _merge_runs(db, src, source, count)
        _merge_results(db, src, run_map, count)
        _merge_images(db, src, run_map, count)
    finally:
        src.close()
    return count


def _merge_runs(db, src, source: Path, count: MergeCount) -> dict[int, int]:
    columns = [c for c in db["runs"].columns_dict if c not in ("id", "merged_from")]
    run_map = {}
    for row in src.execute("SELECT * FROM runs ORDER BY id"):
        row = dict(row)
        if row.get("uid"):  # the same run merged before (from this database or a copy of it)
            same = db.execute("SELECT id FROM runs WHERE uid = ?", [row["uid"]]).fetchone()
        else:  # a run recorded before runs had a uid
            where = " AND ".join(f"{c} IS ?" for c in RUN_IDENTITY)
            same = db.execute(f"SELECT id FROM runs WHERE uid IS NULL AND {where}",
                              [row.get(c) for c in RUN_IDENTITY]).fetchone()
        if same:
            run_map[row["id"]] = same[0]
            _refresh_run(db, same[0], row)
            continue
        provenance = row.get("merged_from") or json.dumps({"database": str(source), "run": row["id"]})
        new_id = db.execute(
            f"INSERT INTO runs ({', '.join(columns)}, merged_from) VALUES ({', '.join('?' * len(columns))}, ?)",
            [row.get(c) for c in columns] + [provenance]).lastrowid
        run_map[row["id"]] = new_id
        count.runs += 1
    return run_map


RUN_OUTCOME = ("finished_at", "status", "captioned", "skipped", "failed")


def _refresh_run(db, run_id: int, row: dict) -> None:
    """A run merged before while it was still going (or interrupted) and since finished or resumed
    in its own database: take its newer outcome."""
    old = db.execute(f"SELECT {', '.join(RUN_OUTCOME)} FROM runs WHERE id = ?", [run_id]).fetchone()
    new = tuple(row.get(c) for c in RUN_OUTCOME)
    if (new[0] or "") > (old[0] or ""):  # finished_at: ISO times, None while running
        db.execute(f"UPDATE runs SET {', '.join(c + ' = ?' for c in RUN_OUTCOME)} WHERE id = ?", [*new, run_id])


def _merge_results(db, src, run_map: dict[int, int], count: MergeCount):
    for res in src.execute("SELECT * FROM results ORDER BY id").fetchall():
        if db.execute("SELECT 1 FROM results WHERE sha256 = ? AND model_fingerprint = ? AND settings_key = ?",
                      [res["sha256"], res["model_fingerprint"], res["settings_key"]]).fetchone():
            count.duplicates += 1
            continue
        result_id = db.execute(
            "INSERT INTO results (sha256, model_fingerprint, settings_key, run_id, created_at) VALUES (?, ?, ?, ?, ?)",
            [res["sha256"], res["model_fingerprint"], res["settings_key"], run_map.get(res["run_id"]),
             res["created_at"]]).lastrowid
        for cap in src.execute("SELECT * FROM captions WHERE result_id = ? ORDER BY rank", [res["id"]]).fetchall():
            caption_id = db.execute(
                "INSERT INTO captions (result_id, rank, text, tokens, logprob, score, finished) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [result_id, cap["rank"], cap["text"], cap["tokens"], cap["logprob"], cap["score"],
                 cap["finished"]]).lastrowid
            att = src.execute("SELECT * FROM attention_maps WHERE caption_id = ?", [cap["id"]]).fetchone()
            if att is not None:
                db.execute("INSERT INTO attention_maps (caption_id, words, grid_h, grid_w, dtype, data) "
                           "VALUES (?, ?, ?, ?, ?, ?)",
                           [caption_id, att["words"], att["grid_h"], att["grid_w"], att["dtype"], att["data"]])
        count.results += 1


def _merge_images(db, src, run_map: dict[int, int], count: MergeCount):
    for img in src.execute("SELECT * FROM images ORDER BY id").fetchall():
        raw = img["path_bytes"] if "path_bytes" in img.keys() and img["path_bytes"] is not None else img["path"].encode()
        mine = db.execute("SELECT updated_at FROM images WHERE path_bytes = ?", [raw]).fetchone()
        if mine and (mine[0] or "") >= (img["updated_at"] or ""):
            continue  # the target looked at this path more recently
        db.execute(
            """INSERT INTO images (path, path_bytes, sha256, bytes, width, height, status, error, run_id, updated_at)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT(path_bytes) DO UPDATE SET
                 path = excluded.path, sha256 = excluded.sha256, bytes = excluded.bytes, width = excluded.width,
                 height = excluded.height, status = excluded.status, error = excluded.error,
                 run_id = excluded.run_id, updated_at = excluded.updated_at""",
            [img["path"], raw, img["sha256"], img["bytes"], img["width"], img["height"], img["status"],
             img["error"], run_map.get(img["run_id"]), img["updated_at"]])
        count.images += 1


def report(summary: MergeSummary, console) -> None:
    from rich.markup import escape

    from ..inputs.paths import printable

    for c in summary.sources:
        console.print(f"{escape(printable(c.source))}: {c.runs} runs, {c.results} results added "
                      f"({c.duplicates} already there), {c.images} image rows added or updated", highlight=False)
    console.print(f"-> {escape(printable(summary.into))}", highlight=False)
