"""The metadata_writes table (migration m002): what sat wrote into which file, from which caption.
Reads and writes of `sat metadata`; the write transaction is store.writes.Store's."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from ..errors import SatError
from ..inputs.paths import display
from ..store.queries import fs_path


@dataclass
class Target:
    """A photo and the caption to write into its metadata."""

    image_id: int
    path: str  # the real file name (undecodable bytes as surrogate escapes)
    caption: str
    score: float | None
    result_id: int
    run_id: int
    model_fingerprint: str
    settings_key: str


def targets(db, run: int | None = None, of_run: int | None = None) -> list[Target]:
    """The best caption of each captioned photo, in path order: the newest result for its content,
    or (``run``) the result of run N's model and settings, or (``of_run``) only the photos run N
    looked at, with the captions of its model and settings (what `sat caption --xmp` writes)."""
    pick = run if run is not None else of_run
    where, params = ["images.status = 'ok'"], {}
    match = ""
    if pick is not None:
        row = db.execute("SELECT model_fingerprint, settings_key FROM runs WHERE id = ?", [pick]).fetchone()
        if row is None:
            raise SatError(f"No run {pick} in this database (see the runs table)")
        match = "AND r.model_fingerprint = :fp AND r.settings_key = :key"
        params.update(fp=row[0], key=row[1])
    if of_run is not None:
        where.append("images.run_id = :of_run")
        params["of_run"] = of_run
    path_bytes = ", images.path_bytes" if "path_bytes" in db["images"].columns_dict else ""
    sql = f"""
        SELECT images.id AS image_id, images.path{path_bytes}, captions.text, captions.score,
               results.id AS result_id, results.run_id, results.model_fingerprint, results.settings_key
        FROM images
        JOIN results ON results.id = (SELECT r.id FROM results r WHERE r.sha256 = images.sha256 {match}
                                      ORDER BY r.id DESC LIMIT 1)
        JOIN captions ON captions.result_id = results.id AND captions.rank = 1
        WHERE {" AND ".join(where)}
        ORDER BY images.path"""
    return [Target(r["image_id"], fs_path(r), r["text"], r["score"], r["result_id"], r["run_id"],
                   r["model_fingerprint"], r["settings_key"]) for r in db.query(sql, params)]


def records(db, status: str | None = "written") -> dict[bytes, dict]:
    """metadata_writes rows by target name (bytes), ``previous`` decoded."""
    where, params = ("WHERE status = ?", [status]) if status else ("", [])
    out = {}
    for row in db.query(f"SELECT * FROM metadata_writes {where} ORDER BY target", params):
        row["previous"] = json.loads(row["previous"]) if row["previous"] else {}
        out[bytes(row["target_bytes"])] = row
    return out


def photo_paths(db) -> dict[int, str]:
    """Image row id -> the photo's real file name."""
    path_bytes = ", path_bytes" if "path_bytes" in db["images"].columns_dict else ""
    return {r["id"]: fs_path(r) for r in db.query(f"SELECT id, path{path_bytes} FROM images")}


def save_write(db, target: Target, file: str, kind: str, fields: dict, previous: dict, created: bool,
               backup: str | None, file_sha256: str, version: str, stamp: str) -> None:
    """Record one write (inside a Store.write() transaction). A rewrite of a target sat already
    holds keeps what the first write replaced and whether sat created the file."""
    key = os.fsencode(file)
    old = db.execute("SELECT previous, created_file, backup FROM metadata_writes WHERE target_bytes = ? "
                     "AND status = 'written'", [key]).fetchone()
    if old:
        previous, created, backup = json.loads(old[0] or "{}"), bool(old[1]), backup or old[2]
    db.execute("DELETE FROM metadata_writes WHERE target_bytes = ?", [key])
    db["metadata_writes"].insert({
        "image_id": target.image_id, "target": display(file), "target_bytes": key, "kind": kind,
        "status": "written", "caption": fields.get("XMP-dc:Description"), "result_id": target.result_id,
        "run_id": target.run_id, "model_fingerprint": target.model_fingerprint,
        "settings_key": target.settings_key, "score": target.score, "sat_version": version,
        "written_at": stamp, "removed_at": None, "created_file": int(created),
        "previous": json.dumps(previous) if previous else None, "backup": backup, "file_sha256": file_sha256,
    })


def carry_results(db, image_id: int, new_sha: str, new_size: int) -> None:
    """After an embed (inside the write transaction): the photo's bytes changed, its pixels did
    not, so its stored results (every model and setting) also become the new content's and the
    image row points at it: the next `sat caption` skips the photo instead of captioning it again."""
    row = db.execute("SELECT sha256 FROM images WHERE id = ?", [image_id]).fetchone()
    if row is None or row[0] == new_sha:
        return
    old_sha = row[0]
    for res in db.execute("SELECT id, model_fingerprint, settings_key, run_id, created_at FROM results "
                          "WHERE sha256 = ?", [old_sha]).fetchall():
        if db.execute("SELECT 1 FROM results WHERE sha256 = ? AND model_fingerprint = ? AND settings_key = ?",
                      [new_sha, res[1], res[2]]).fetchone():
            continue
        new_id = db.execute("INSERT INTO results (sha256, model_fingerprint, settings_key, run_id, created_at) "
                            "VALUES (?, ?, ?, ?, ?)", [new_sha, res[1], res[2], res[3], res[4]]).lastrowid
        for cap in db.execute("SELECT id, rank, text, tokens, logprob, score, finished FROM captions "
                              "WHERE result_id = ?", [res[0]]).fetchall():
            cap_id = db.execute("INSERT INTO captions (result_id, rank, text, tokens, logprob, score, finished) "
                                "VALUES (?, ?, ?, ?, ?, ?, ?)", [new_id, *cap[1:]]).lastrowid
            db.execute("INSERT INTO attention_maps (caption_id, words, grid_h, grid_w, dtype, data) "
                       "SELECT ?, words, grid_h, grid_w, dtype, data FROM attention_maps WHERE caption_id = ?",
                       [cap_id, cap[0]])
    db.execute("UPDATE images SET sha256 = ?, bytes = ? WHERE id = ?", [new_sha, new_size, image_id])


def mark_removed(db, target_bytes: bytes, stamp: str) -> None:
    db.execute("UPDATE metadata_writes SET status = 'removed', removed_at = ? WHERE target_bytes = ?",
               [stamp, target_bytes])


def listing(db) -> list[dict]:
    """Every write sat recorded, for `sat metadata --list` (paths in their text form)."""
    cols = ", ".join(f"w.{c}" for c in ("target", "kind", "status", "caption", "model_fingerprint", "settings_key",
                                        "score", "run_id", "sat_version", "written_at", "removed_at", "created_file",
                                        "previous", "backup"))
    rows = db.query(f"""SELECT images.path AS photo, {cols} FROM metadata_writes AS w
                        LEFT JOIN images ON images.id = w.image_id ORDER BY w.target""")
    return [{**r, "created_file": bool(r["created_file"]),
             "previous": json.loads(r["previous"]) if r["previous"] else None} for r in rows]


