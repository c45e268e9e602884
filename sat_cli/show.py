"""``sat show``: the paper's figure. The image with its caption, then one panel per word with the
word's attention map upsampled, smoothed and blended over the image (what the model looked at stays
lit, the rest dims). Writes a PNG, headless."""

from __future__ import annotations

import re
from pathlib import Path

from .errors import SatError
from .store import decode_attention


def find_image(db, selector: str) -> dict:
    """An images row by path (full, relative or unique suffix), sha256 prefix or row id."""
    rows = []
    p = Path(selector).expanduser()
    exact = list(db["images"].rows_where("path = ?", [str(p.resolve())])) or list(
        db["images"].rows_where("path = ?", [str(p.absolute())]))
    if exact:
        return exact[0]
    if selector.isdigit():
        rows = list(db["images"].rows_where("id = ?", [int(selector)]))
    if not rows and re.fullmatch(r"[0-9a-fA-F]{6,64}", selector):
        rows = list(db["images"].rows_where("sha256 LIKE ?", [selector.lower() + "%"]))
    if not rows:
        suffix = "/" + selector.lstrip("./")
        rows = list(db["images"].rows_where("path LIKE ? ESCAPE '\\'", ["%" + _like(suffix)]))
    if not rows:
        raise SatError(f"No image matches {selector!r} (give a stored path, a sha256 prefix or a row id)")
    if len(rows) > 1 and len({r["sha256"] for r in rows}) > 1:
        listing = "\n  ".join(f"{r['id']}: {r['path']}" for r in rows[:10])
        raise SatError(f"{selector!r} matches {len(rows)} images; pick one by row id or full path:\n  {listing}")
    return rows[0]


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


def smooth_map(alpha, size: tuple[int, int]):
    """(gh, gw) attention -> (H, W) in [0, 1]: bicubic upsampling, then a Gaussian blur of about
    a third of a grid cell (the paper's figures use skimage's pyramid_expand similarly)."""
    import numpy as np
    from PIL import Image, ImageFilter

    width, height = size
    a = np.asarray(alpha, dtype=np.float32)
    a = a / a.max() if a.max() > 0 else a
    up = Image.fromarray(np.round(255 * a).astype(np.uint8), mode="L").resize((width, height), Image.Resampling.BICUBIC)
    radius = max(1.0, min(width / a.shape[1], height / a.shape[0]) / 3)
    out = np.asarray(up.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32)
    out = out - out.min()
    return out / out.max() if out.max() > 0 else out


def render(image_path: str, words: list[str], maps, caption: str, out: str | Path, columns: int = 5,
           panel: int = 224, title: str | None = None) -> Path:
    """Draw the figure with matplotlib's Agg backend (no display needed) and save it as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image, ImageOps

    from .images import to_rgb

    try:
        with Image.open(image_path) as im:
            img = to_rgb(ImageOps.exif_transpose(im))
    except OSError as exc:
        raise SatError(f"Cannot open {image_path}: {exc}") from None
    scale = panel / max(img.size)
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.BICUBIC)
    pixels = np.asarray(img)
    n = len(words) + 1
    cols = min(columns, n)
    rows = -(-n // cols)
    inch = panel / 100  # saved at 100 dpi: one panel pixel per image pixel
    fig, axes = plt.subplots(rows, cols, figsize=(cols * (inch + 0.2), rows * (inch * img.height / img.width + 0.45)
                                                  + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    first = axes.flat[0]
    first.imshow(pixels)
    first.set_title(title or "image", fontsize=10)
    for i, word in enumerate(words, start=1):
        ax = axes.flat[i]
        light = smooth_map(maps[i - 1], img.size)[..., None]  # 1 where the model looked
        ax.imshow((pixels * (0.15 + 0.85 * light)).astype(np.uint8))  # the rest of the photo dims
        ax.set_title(word, fontsize=12)
    fig.suptitle(caption, fontsize=13)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=100, format="png")
    plt.close(fig)
    return out
