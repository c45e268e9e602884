"""``sat export --format html``: a static, self-contained gallery folder.

index.html + assets/ + data/ (one script file per page of images, loaded on demand, so 10,000
images stay quick) + thumbs/. It opens from disk with no network. Attention maps travel as
uint8 grids and are drawn over the thumbnail in the browser when a word is hovered or clicked.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from datetime import datetime, timezone
from importlib import resources
from itertools import groupby
from pathlib import Path

from .. import __version__
from ..errors import SatError

INDEX = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>sat gallery</title>
<link rel="stylesheet" href="assets/gallery.css">
<script src="assets/gallery.js"></script>
</head>
<body>
<header>
  <h1 id="title">sat gallery</h1>
  <span class="stats" id="stats"></span>
  <button id="show-failures" hidden>failed files</button>
  <nav>
    <button id="prev" title="previous page">&larr;</button>
    <span id="page-info"></span>
    <input id="page-input" type="number" min="1" value="1" aria-label="page">
    <button id="next" title="next page">&rarr;</button>
  </nav>
</header>
<main id="grid"></main>
<section id="failures"></section>
</body>
</html>
"""


def js_payload(call: str, *args) -> str:
    """``SAT.call(args...);`` with JSON that cannot close a script or inject markup."""
    body = ", ".join(json.dumps(a, separators=(",", ":"), ensure_ascii=True) for a in args)
    body = body.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return f"SAT.{call}({body});\n"


def quantize(maps) -> str:
    """(words, gh, gw) attention -> base64 of uint8, each map scaled to its own maximum."""
    import numpy as np

    peak = maps.reshape(maps.shape[0], -1).max(axis=1).reshape(-1, 1, 1)
    q = np.round(255 * maps / np.where(peak > 0, peak, 1)).astype(np.uint8)
    return base64.b64encode(q.tobytes()).decode()


def map_stats_lists(maps) -> tuple[list[float], list[float]]:
    """Each map's real peak weight and entropy relative to uniform, shown beside the overlay."""
    from ..evaluation.pointing import map_stats

    stats = [map_stats(m) for m in maps]
    return [round(p, 4) for p, _ in stats], [round(e, 3) for _, e in stats]


def thumbnail(src: str, target: Path, size: int, previous: Path | None = None) -> bool:
    """Write ``target``; an existing ``previous`` (the last gallery's thumbnail) is reused."""
    from PIL import Image, ImageOps

    from ..inputs.images import to_rgb

    if target.exists():
        return True
    if previous is not None and previous.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(previous, target)
            return True
        except OSError:
            pass
    try:
        with Image.open(src) as im:
            if im.format == "JPEG":
                im.draft("RGB", (size, size))
            im = to_rgb(ImageOps.exif_transpose(im))
            im.thumbnail((size, size), Image.Resampling.LANCZOS)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(".tmp")
            im.save(tmp, "JPEG", quality=85)
            tmp.replace(target)
        return True
    except Exception:  # the file moved or broke since it was captioned: show the card without it
        return False


def export_html(db, out: str | Path, run: int | None = None, best: bool = False, page_size: int = 100,
                thumb_size: int = 320, quiet: bool = False, title: str | None = None) -> Path:
    from ..atomic import folder

    final = Path(out)
    if final.exists() and not final.is_dir():
        raise SatError(f"{final} exists and is not a folder")
    # Built in a temporary folder and swapped in only when complete: a failed export keeps the old
    # gallery (and the other files of its folder).
    with folder(final) as out:
        _build(db, out, final, run, best, page_size, thumb_size, quiet, title)
    return final / "index.html"


def _build(db, out: Path, previous: Path, run, best, page_size, thumb_size, quiet, title) -> None:
    from ..progress import progress_bar
    from ..store.queries import caption_rows, decode_attention, fs_path

    for sub in ("assets", "data", "thumbs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for name in ("gallery.js", "gallery.css"):
        with resources.as_file(resources.files("sat_cli.views") / "assets" / name) as src:
            shutil.copy(src, out / "assets" / name)
    (out / "index.html").write_text(INDEX, encoding="utf-8")

    total = db.execute("SELECT COUNT(*) FROM images").fetchone()[0]
    page, pages, failed, counts = [], 0, [], {"images": 0, "captioned": 0}

    def flush():
        nonlocal page, pages
        if page:
            pages += 1
            (out / "data" / f"page-{pages:05d}.js").write_text(js_payload("page", pages, page), encoding="utf-8")
            page = []

    rows = caption_rows(db, run, best, True, True)
    with progress_bar("images", quiet) as progress:
        task = progress.add_task("Building gallery", total=total, status="")
        for _, group in groupby(rows, key=lambda r: (r["image_id"], r["result_id"])):
            group = list(group)
            first = group[0]
            rec = {"i": first["image_id"], "p": first["path"], "w": first["width"], "h": first["height"],
                   "s": first["status"]}
            counts["images"] += 1
            if first["status"] == "failed":
                rec["e"] = first["error"]
                failed.append({"path": first["path"], "error": first["error"]})
            else:
                counts["captioned"] += 1
                sha = first["sha256"]
                thumb = Path("thumbs") / sha[:2] / f"{sha}.jpg"
                if thumbnail(fs_path(first), out / thumb, thumb_size, previous / thumb):
                    rec["t"] = thumb.as_posix()
                rec["r"] = first["run_id"]
                rec["c"] = []
                for r in group:
                    if r["caption_id"] is None:
                        continue
                    c = {"r": r["rank"], "x": r["text"], "wd": json.loads(r["tokens"]), "sc": r["score"],
                         "lp": r["logprob"], "f": bool(r["finished"])}
                    if r["data"] is not None and r["words"]:
                        maps = decode_attention(r)
                        c["g"] = [r["grid_h"], r["grid_w"]]
                        c["m"] = quantize(maps)
                        c["pk"], c["en"] = map_stats_lists(maps)
                    rec["c"].append(c)
            page.append(rec)
            if len(page) >= page_size:
                flush()
            progress.advance(task)
        flush()
    (out / "data" / "failed.js").write_text(js_payload("failed", failed), encoding="utf-8")
    meta = {"title": title or "sat gallery", "pages": pages, "pageSize": page_size, "images": counts["images"],
            "captioned": counts["captioned"], "failed": len(failed), "sat": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    (out / "data" / "manifest.js").write_text(js_payload("manifest", meta), encoding="utf-8")
