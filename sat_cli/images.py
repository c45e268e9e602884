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

from .records import Result

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


def discover(inputs: list[str], recursive: bool = True, unique: bool = True) -> Iterator[Found]:
    """Files, folders (walked, image extensions only, hidden entries skipped) and glob patterns,
    in a stable order, each path once (``unique``). An argument that matches nothing yields an
    error entry."""
    seen: set[str] = set()

    def emit(path: str) -> Iterator[Found]:
        path = os.path.abspath(path)
        if not unique or path not in seen:
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


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"image too large (Pillow's decompression-bomb guard): {exc}"
    if isinstance(exc, Image.UnidentifiedImageError):
        return "not an image Pillow can read (unknown or corrupt format)"
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if not isinstance(exc, OSError) else text


def array_image(arr: np.ndarray) -> Image.Image:
    """A uint8 array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) as a PIL image; anything else is refused."""
    if not isinstance(arr, np.ndarray) or arr.dtype != np.uint8:
        raise ValueError(f"an image array must be uint8, not {getattr(arr, 'dtype', type(arr).__name__)}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(arr), "L")
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        return Image.fromarray(np.ascontiguousarray(arr), "RGB" if arr.shape[2] == 3 else "RGBA")
    raise ValueError(f"an image array must be (H, W), (H, W, 3) or (H, W, 4) (channels last), not {arr.shape}")


def is_image_object(source) -> bool:
    """True for the in-memory inputs sat takes: a PIL image or a numpy array."""
    return isinstance(source, (Image.Image, np.ndarray))


class Sources:
    """A map-style dataset keyed by ``(index, source)``: a file is hashed, skipped when its content
    is known, else decoded and resized; a PIL image or uint8 array is converted and resized. Any
    failure becomes ``Result.error``, never an exception. Runs in DataLoader workers."""

    def __init__(self, size: tuple[int, int], interpolation: str = "bicubic", skip: frozenset[str] = frozenset()):
        self.size = size
        self.interpolation = interpolation
        self.skip = skip

    def __getitem__(self, key) -> Result:
        index, source = key
        if is_image_object(source):
            return self._memory(index, source)
        if isinstance(source, Found):  # an argument that named nothing readable
            return Result(source.path, error=source.error, index=index)
        path = os.fspath(source)
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            return Result(path, error=describe_error(exc), index=index)
        item = Result(path, sha256=hashlib.sha256(data).hexdigest(), size=len(data), index=index)
        if item.sha256 in self.skip:
            item.skipped = True
            return item
        try:
            arr, (item.width, item.height) = load_image(io.BytesIO(data), self.size, self.interpolation)
        except Exception as exc:  # any decoder failure becomes an error row, never a crash
            item.error = describe_error(exc)
            return item
        return self._with_pixels(item, arr)

    def _memory(self, index: int, source) -> Result:
        item = Result(None, index=index)
        try:
            im = array_image(source) if isinstance(source, np.ndarray) else ImageOps.exif_transpose(source)
            raw = im.tobytes()
            item.sha256 = hashlib.sha256(f"{im.mode}{im.size}".encode() + raw).hexdigest()
            item.size = len(raw)
            item.width, item.height = im.size
            im = to_rgb(im).resize((self.size[1], self.size[0]), _RESAMPLE.get(self.interpolation, Image.Resampling.BICUBIC))
            return self._with_pixels(item, np.asarray(im, dtype=np.uint8))
        except Exception as exc:
            item.error = describe_error(exc)
            return item

    @staticmethod
    def _with_pixels(item: Result, arr: np.ndarray) -> Result:
        import torch

        item.pixels = torch.from_numpy(arr.copy()).permute(2, 0, 1)  # (3, H, W) uint8
        return item


def collate(items: list[Result]):
    """-> (items, stacked pixels (N, 3, H, W) uint8 of the items that have them, or None)."""
    import torch

    good = []
    for it in items:
        if it.pixels is not None:
            it.row = len(good)
            good.append(it.pixels)
            it.pixels = None
    return items, (torch.stack(good) if good else None)
