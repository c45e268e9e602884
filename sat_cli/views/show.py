"""``sat show``: the paper's figure. The image with its caption, then one panel per word with the
word's attention map upsampled, smoothed and blended over the image (what the model looked at stays
lit, the rest dims). Writes a PNG, headless."""

from __future__ import annotations

from pathlib import Path

from ..errors import SatError


def smooth_map(alpha, size: tuple[int, int]):
    """(gh, gw) attention -> (H, W) in [0, 1], scaled to the map's own peak (as the paper's figures
    are): bicubic upsampling, then a Gaussian blur of about a third of a grid cell (the paper's
    figures use skimage's pyramid_expand similarly). The figure prints each map's real peak
    weight and entropy, since the scaling hides them."""
    import numpy as np
    from PIL import Image, ImageFilter

    width, height = size
    a = np.asarray(alpha, dtype=np.float32)
    a = a / a.max() if a.max() > 0 else a
    up = Image.fromarray(np.round(255 * a).astype(np.uint8), mode="L").resize((width, height), Image.Resampling.BICUBIC)
    radius = max(1.0, min(width / a.shape[1], height / a.shape[0]) / 3)
    out = np.asarray(up.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32)
    # Scaled to the peak, never stretched from the minimum: a diffuse map stays evenly lit
    # instead of turning its small differences into a sharp-looking spot.
    return out / out.max() if out.max() > 0 else out


def render(image_path: str, words: list[str], maps, caption: str, out: str | Path, columns: int = 5,
           panel: int = 224, title: str | None = None) -> Path:
    """Draw the figure with matplotlib's Agg backend (no display needed) and save it as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image, ImageOps

    from ..inputs.images import to_rgb

    try:
        with Image.open(image_path) as im:
            img = to_rgb(ImageOps.exif_transpose(im))
    except OSError as exc:
        from ..inputs.paths import printable

        raise SatError(f"Cannot open {printable(image_path)}: {exc.strerror or exc}") from None
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
    from ..evaluation.pointing import map_stats

    for i, word in enumerate(words, start=1):
        ax = axes.flat[i]
        light = smooth_map(maps[i - 1], img.size)[..., None]  # 1 at the map's own peak (per-map scaling)
        ax.imshow((pixels * (0.15 + 0.85 * light)).astype(np.uint8))  # the rest of the photo dims
        ax.set_title(word, fontsize=12)
        peak, entropy = map_stats(maps[i - 1])  # so a diffuse map is never taken for a sharp one
        ax.text(0.5, -0.02, f"peak {peak:.3f}  entropy {entropy:.2f}", transform=ax.transAxes, ha="center",
                va="top", fontsize=8, color="#444444")
    fig.suptitle(caption, fontsize=13)
    fig.tight_layout()
    from ..atomic import atomic_open

    out = Path(out)
    try:
        with atomic_open(out, "wb") as f:  # a failed drawing keeps the old PNG
            fig.savefig(f, dpi=100, format="png")
    finally:
        plt.close(fig)
    return out


def show(db_path: str, selector: str, out: str | None = None, rank: int = 1, run: int | None = None,
         columns: int = 5, panel: int = 224) -> tuple[Path, dict, list[str]]:
    """`sat show`: find the image, read its caption and maps, draw the figure. Returns (PNG path,
    caption row, words)."""
    import json

    from ..store.queries import caption_with_attention, find_image, fs_path
    from ..store.writes import open_db

    db = open_db(db_path, must_exist=True)
    row = find_image(db, selector)
    cap, maps = caption_with_attention(db, row, rank=rank, run=run)
    words = json.loads(cap["tokens"])
    image = fs_path(row)
    target = out or f"{Path(row['path']).stem}.attention.png"
    path = render(image, words, maps, cap["text"], target, columns=columns, panel=panel,
                  title=f"rank {rank}, score {cap['score']:.2f}")
    return path, cap, words
