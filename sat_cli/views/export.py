"""``sat export``: stream what a database holds as CSV, TSV, JSON, JSON Lines or COCO results."""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import re
from typing import Iterator

from ..errors import SatError
from ..store.queries import caption_rows, check_run, decode_attention, one_result_set

FORMATS = ("csv", "tsv", "json", "jsonl", "coco")
FLAT_COLUMNS = ("path", "sha256", "width", "height", "run", "rank", "caption", "score", "logprob",
                "finished", "status", "error")


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
        from .gallery import map_stats_lists

        maps = decode_attention(row)
        peaks, entropies = map_stats_lists(maps)
        out["attention"] = {"shape": list(maps.shape), "maps": maps.round(4).tolist(), "peak": peaks,
                            "entropy": entropies}
    return out


def _grouped(rows, attention: bool, writes: dict | None = None, ids: dict | None = None) -> Iterator[dict]:
    for _, group in itertools.groupby(rows, key=lambda r: (r["image_id"], r["result_id"])):
        group = list(group)
        first = group[0]
        record = {
            "path": first["path"], "sha256": first["sha256"], "width": first["width"], "height": first["height"],
            "status": first["status"],
        }
        if ids is not None:
            record["image_id"] = ids.get(first["image_id"], first["image_id"])
        if first["path_bytes"] is not None and first["path_bytes"] != first["path"].encode():
            import base64

            record["path_bytes"] = base64.b64encode(first["path_bytes"]).decode()  # the exact name, not UTF-8
        if first["status"] == "failed":
            record["error"] = first["error"]
        else:
            record.update(run=first["run_id"], model=first["model_fingerprint"], settings=first["settings_key"])
            record["captions"] = [_caption(r, attention) for r in group if r["caption_id"] is not None]
        if writes is not None:
            record["metadata"] = writes.get(first["image_id"], [])
        yield record


_COCO_NUMBER = re.compile(r"(?:.*_)?(\d+)")  # COCO_val2014_000000000042 -> 42, 000000000042 -> 42


def coco_number(path: str) -> int | None:
    """The number a COCO-style file name ends with after its last ``_`` (or that is the whole
    stem), else None: ``1002674143_1b742ab4b8.jpg`` (Flickr8k, hex) has none."""
    match = _COCO_NUMBER.fullmatch(os.path.splitext(os.path.basename(path))[0])
    return int(match.group(1)) if match else None


def coco_ids(db) -> dict[int, int]:
    """Image row id -> the ``image_id`` of exports: the file name's COCO number when every image
    in the database has one and no two share it, else the image row id for every image (so ids
    are always unique; json/jsonl exports carry them beside the path)."""
    rows = db.execute("SELECT id, path FROM images").fetchall()
    numbers = {row_id: coco_number(path) for row_id, path in rows}
    values = list(numbers.values())
    if None in values or len(set(values)) != len(values):
        return {row_id: row_id for row_id, _ in rows}
    return numbers


def metadata_writes(db) -> dict[int, list[dict]]:
    """What `sat metadata` wrote for each image id: file, kind, status, caption, when."""
    if "metadata_writes" not in db.table_names():
        return {}
    out: dict[int, list[dict]] = {}
    for row in db.query("""SELECT image_id, target, kind, status, caption, run_id, written_at, removed_at, backup
                           FROM metadata_writes ORDER BY image_id, target"""):
        out.setdefault(row.pop("image_id"), []).append(row)
    return out


def export(db, fmt: str, run: int | None = None, best: bool = False, failed: bool = True,
           attention: bool = False, metadata: bool = False) -> Iterator[str]:
    """Yield the export's text in chunks, a row (or an image) at a time. ``metadata`` (json,
    jsonl): each image lists what `sat metadata` wrote for it."""
    if fmt not in FORMATS:
        raise SatError(f"Unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    check_run(db, run)
    if fmt == "coco":
        yield from _coco(db, run)
        return
    rows = caption_rows(db, run, best, failed, attention and fmt in ("json", "jsonl"))
    if fmt == "tsv":
        yield from _tsv(rows)
    elif fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, FLAT_COLUMNS, lineterminator="\n")  # RFC 4180 quoting: commas, quotes, newlines
        writer.writeheader()
        for row in rows:
            writer.writerow(_flat(row))
            if buf.tell() > 1 << 16:
                yield buf.getvalue()
                buf.seek(0)
                buf.truncate()
        yield buf.getvalue()
    elif fmt == "jsonl":
        for record in _grouped(rows, attention, metadata_writes(db) if metadata else None, coco_ids(db)):
            yield json.dumps(record) + "\n"
    else:
        yield "["
        for i, record in enumerate(_grouped(rows, attention, metadata_writes(db) if metadata else None,
                                            coco_ids(db))):
            yield ("," if i else "") + "\n  " + json.dumps(record)
        yield "\n]\n"


def _tsv(rows) -> Iterator[str]:
    """Tab-separated, one line per row, nothing quoted: backslash, tab, newline, carriage return,
    other control characters and the bytes of a name that are not UTF-8 are escaped
    (``\\\\ \\t \\n \\r \\xNN``, as PostgreSQL's text format), so every row is one line and the
    exact file name can be recovered."""
    from ..inputs.paths import tsv_field
    from ..store.queries import fs_path

    lines = ["\t".join(FLAT_COLUMNS)]
    for row in rows:
        flat = _flat(row)
        flat["path"] = fs_path(row)
        lines.append("\t".join(tsv_field(flat[c]) for c in FLAT_COLUMNS))
        if len(lines) >= 512:
            yield "\n".join(lines) + "\n"
            lines = []
    if lines:
        yield "\n".join(lines) + "\n"


def _coco(db, run: int | None) -> Iterator[str]:
    """COCO results: [{"image_id": int, "caption": str}], the best caption of each image (ids:
    ``coco_ids``)."""
    one_result_set(db, run, "COCO results")
    ids = coco_ids(db)
    rows = caption_rows(db, run, best=True, failed=False, attention=False)
    yield "["
    seen: set[int] = set()
    for row in rows:
        if row["image_id"] in seen:
            continue
        seen.add(row["image_id"])
        record = {"image_id": ids[row["image_id"]], "caption": row["text"]}
        yield ("," if len(seen) > 1 else "") + "\n  " + json.dumps(record)
    yield "\n]\n"


def export_to(db_path: str, fmt: str, out: str | None = None, run: int | None = None, best: bool = False,
              failed: bool = True, attention: bool = False, page_size: int = 100, quiet: bool = False,
              metadata: bool = False):
    """`sat export`: write the export to ``out`` (a file; a folder for html) or to stdout."""
    import sys
    from pathlib import Path

    from ..store.writes import open_db

    if attention and fmt not in ("json", "jsonl"):
        raise SatError("--attention works with --format json or jsonl")
    if metadata and fmt not in ("json", "jsonl"):
        raise SatError("--metadata works with --format json or jsonl")
    db = open_db(db_path, must_exist=True)
    if fmt == "html":
        from ..progress import console
        from .gallery import export_html

        if not out:
            raise SatError("--format html writes a folder: give it with --out")
        check_run(db, run)
        index = export_html(db, out, run=run, best=best, page_size=page_size, quiet=quiet,
                            title=f"sat: {Path(db_path).name}")
        if not quiet:
            console.print(f"Gallery written: {index}")
        return
    chunks = export(db, fmt, run=run, best=best, failed=failed, attention=attention, metadata=metadata)
    if out:  # replaced only once the whole export is written: a failure keeps the old file
        from ..atomic import atomic_open

        with atomic_open(out, "w", encoding="utf-8", newline="") as f:
            for chunk in chunks:
                f.write(chunk)
    else:
        for chunk in chunks:
            sys.stdout.write(chunk)
