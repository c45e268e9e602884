"""``sat export``: stream what a database holds as CSV, TSV, JSON, JSON Lines or COCO results."""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import re
from typing import Iterator

from .errors import SatError
from .store import decode_attention

FORMATS = ("csv", "tsv", "json", "jsonl", "coco")
FLAT_COLUMNS = ("path", "sha256", "width", "height", "run", "rank", "caption", "score", "logprob",
                "finished", "status", "error")


def _query(db, run: int | None, best: bool, failed: bool, attention: bool):
    join_run = " AND results.run_id = :run" if run is not None else ""
    join_rank = " AND captions.rank = 1" if best else ""
    keep = ["results.id IS NOT NULL"]
    if failed:
        keep.append("(images.status = 'failed'" + (" AND images.run_id = :run)" if run is not None else ")"))
    sql = f"""
        SELECT images.id AS image_id, images.path, images.sha256, images.width, images.height,
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


def _flat(row: dict) -> dict:
    return {
        "path": row["path"], "sha256": row["sha256"], "width": row["width"], "height": row["height"],
        "run": row["run_id"], "rank": row["rank"], "caption": row["text"],
        "score": row["score"], "logprob": row["logprob"],
        "finished": None if row["finished"] is None else bool(row["finished"]),
        "status": row["status"], "error": row["error"],
    }


def _caption(row: dict, attention: bool) -> dict:
    out = {
        "rank": row["rank"], "text": row["text"], "words": json.loads(row["tokens"]),
        "score": row["score"], "logprob": row["logprob"], "finished": bool(row["finished"]),
    }
    if attention and row.get("data") is not None:
        maps = decode_attention(row)
        out["attention"] = {"shape": list(maps.shape), "maps": maps.round(4).tolist()}
    return out


def _grouped(rows, attention: bool) -> Iterator[dict]:
    for _, group in itertools.groupby(rows, key=lambda r: (r["image_id"], r["result_id"])):
        group = list(group)
        first = group[0]
        record = {
            "path": first["path"], "sha256": first["sha256"], "width": first["width"], "height": first["height"],
            "status": first["status"],
        }
        if first["status"] == "failed":
            record["error"] = first["error"]
        else:
            record.update(run=first["run_id"], model=first["model_fingerprint"], settings=first["settings_key"])
            record["captions"] = [_caption(r, attention) for r in group if r["caption_id"] is not None]
        yield record


def coco_image_id(path: str, row_id: int) -> int:
    """The number at the end of the file name (COCO_val2014_000000000042.jpg -> 42), else the row id."""
    match = re.search(r"(\d+)$", os.path.splitext(os.path.basename(path))[0])
    return int(match.group(1)) if match else row_id


def export(db, fmt: str, run: int | None = None, best: bool = False, failed: bool = True,
           attention: bool = False) -> Iterator[str]:
    """Yield the export's text in chunks, a row (or an image) at a time."""
    if fmt not in FORMATS:
        raise SatError(f"Unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    if run is not None and not db["runs"].count_where("id = ?", [run]):
        raise SatError(f"No run {run} in this database (see the runs table)")
    if fmt == "coco":
        yield from _coco(db, run)
        return
    rows = _query(db, run, best, failed, attention and fmt in ("json", "jsonl"))
    if fmt in ("csv", "tsv"):
        buf = io.StringIO()
        writer = csv.DictWriter(buf, FLAT_COLUMNS, delimiter="," if fmt == "csv" else "\t", lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow(_flat(row))
            if buf.tell() > 1 << 16:
                yield buf.getvalue()
                buf.seek(0)
                buf.truncate()
        yield buf.getvalue()
    elif fmt == "jsonl":
        for record in _grouped(rows, attention):
            yield json.dumps(record) + "\n"
    else:
        yield "["
        for i, record in enumerate(_grouped(rows, attention)):
            yield ("," if i else "") + "\n  " + json.dumps(record)
        yield "\n]\n"


def _coco(db, run: int | None) -> Iterator[str]:
    """COCO results: [{"image_id": int, "caption": str}], the best caption of each image."""
    if run is None:
        sets = db.execute("SELECT COUNT(DISTINCT model_fingerprint || settings_key) FROM results").fetchone()[0]
        if sets > 1:
            raise SatError(
                f"This database holds captions from {sets} different models or decode settings; "
                "pick one run with --run N for COCO results"
            )
    rows = _query(db, run, best=True, failed=False, attention=False)
    yield "["
    seen: set[int] = set()
    for row in rows:
        image_id = coco_image_id(row["path"], row["image_id"])
        if image_id in seen:
            continue
        seen.add(image_id)
        yield ("," if seen and len(seen) > 1 else "") + "\n  " + json.dumps({"image_id": image_id, "caption": row["text"]})
    yield "\n]\n"
