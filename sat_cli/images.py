"""Finding image files and turning each into the encoder's input, in DataLoader workers."""

from __future__ import annotations

import glob
import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = frozenset(
    ".jpg .jpeg .jpe .jfif .png .webp .bmp .dib .gif .tif .tiff .ppm .pgm .pbm .pnm .tga .jp2 .avif .heic".split()
)
_GLOB_CHARS = set("*?[")
_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


@dataclass
class Found:
    path: str  # absolute path
    error: str | None = None  # set when the argument names nothing readable


def _walk(folder: Path, recursive: bool) -> Iterator[str]:
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if recursive else []
        for name in sorted(files):
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                yield os.path.join(root, name)


def discover(inputs: list[str], recursive: bool = True) -> Iterator[Found]:
    """Files, folders (walked, image extensions only, hidden entries skipped) and glob patterns,
    in a stable order, each path once. An argument that matches nothing yields an error entry."""
    seen: set[str] = set()

    def emit(path: str) -> Iterator[Found]:
        path = os.path.abspath(path)
        if path not in seen:
            seen.add(path)
            yield Found(path)

    for arg in inputs:
        p = Path(arg).expanduser()
        if p.is_dir():
            for f in _walk(p, recursive):
                yield from emit(f)
        elif p.is_file():
            yield from emit(str(p))
        elif _GLOB_CHARS & set(arg):
            matches = sorted(glob.glob(os.path.expanduser(arg), recursive=True))
            files = [m for m in matches if os.path.isfile(m)]
            for d in (m for m in matches if os.path.isdir(m)):
                files.extend(_walk(Path(d), recursive))
            if not files:
                yield Found(os.path.abspath(arg), "no files match this pattern")
            for f in files:
                yield from emit(f)
        else:
            yield Found(os.path.abspath(arg), "no such file or directory")


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB: transparency over white, 16-bit and float scaled, CMYK converted."""
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, im).convert("RGB")
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        arr = np.asarray(im, dtype=np.float32)
        if im.mode.startswith("I;16"):
            arr = arr / 257.0
        elif im.mode == "I" and arr.max(initial=0) > 255:
            arr = arr / (257.0 if arr.max() <= 65535 else arr.max() / 255.0)
        elif im.mode == "F" and arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    return im.convert("RGB") if im.mode != "RGB" else im


def load_image(source, size: tuple[int, int], interpolation: str = "bicubic") -> tuple[np.ndarray, tuple[int, int]]:
    """Decode, apply EXIF orientation, convert to RGB and resize the whole image to ``size``
    (height, width). Returns (H, W, 3) uint8 and the original (width, height). Pillow's
    decompression-bomb guard stays on: an oversized image raises ``Image.DecompressionBombError``."""
    height, width = size
    with Image.open(source) as im:
        im.seek(0)  # the first frame of an animation
        w, h = im.size
        orig = (h, w) if _rotated(im) else (w, h)
        if im.format == "JPEG":
            side = max(width, height)  # either orientation must still cover the target size
            im.draft("RGB", (side, side))  # DCT scaling: decode big JPEGs at a smaller size
        im = to_rgb(ImageOps.exif_transpose(im))
        im = im.resize((width, height), _RESAMPLE.get(interpolation, Image.Resampling.BICUBIC))
        return np.asarray(im, dtype=np.uint8), orig


def _rotated(im: Image.Image) -> bool:
    return im.getexif().get(0x0112, 1) in (5, 6, 7, 8)


@dataclass
class Item:
    """One file as a DataLoader worker saw it."""

    path: str
    sha256: str | None = None
    size: int | None = None  # bytes
    width: int | None = None
    height: int | None = None
    error: str | None = None
    skipped: bool = False  # already captioned with this model and these settings
    pixels: object = None  # (3, H, W) uint8 tensor until collated
    row: int | None = None  # its row in the collated pixel batch


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"image too large (Pillow's decompression-bomb guard): {exc}"
    if isinstance(exc, Image.UnidentifiedImageError):
        return "not an image Pillow can read (unknown or corrupt format)"
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if not isinstance(exc, OSError) else text


class ImageFiles:
    """A map-style dataset: hash each file, skip known content, decode and resize the rest."""

    def __init__(self, paths: list[str], size: tuple[int, int], interpolation: str = "bicubic",
                 skip: frozenset[str] = frozenset()):
        self.paths = paths
        self.size = size
        self.interpolation = interpolation
        self.skip = skip

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Item:
        import torch

        path = self.paths[index]
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            return Item(path, error=describe_error(exc))
        item = Item(path, sha256=hashlib.sha256(data).hexdigest(), size=len(data))
        if item.sha256 in self.skip:
            item.skipped = True
            return item
        try:
            arr, (item.width, item.height) = load_image(io.BytesIO(data), self.size, self.interpolation)
        except Exception as exc:  # any decoder failure becomes an error row, never a crash
            item.error = describe_error(exc)
            return item
        item.pixels = torch.from_numpy(arr.copy()).permute(2, 0, 1)  # (3, H, W) uint8
        return item


def collate(items: list[Item]):
    """-> (items, stacked pixels (N, 3, H, W) uint8 of the items that have them, or None)."""
    import torch

    good = []
    for it in items:
        if it.pixels is not None:
            it.row = len(good)
            good.append(it.pixels)
            it.pixels = None
    return items, (torch.stack(good) if good else None)
