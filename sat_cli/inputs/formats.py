"""Photo formats Pillow does not open by itself: HEIC/HEIF (pillow-heif) and camera RAW (rawpy).

``open_photo`` stands where ``Image.open`` would: it returns a PIL image whose EXIF orientation
is still to be applied (``ImageOps.exif_transpose``), so every format goes through the same steps
afterwards. AVIF needs nothing here: Pillow reads it itself (11.2+ wheels).

RAW files are recognised by content, not by name (the caption pipeline hands over the bytes it
hashed): TIFF-based RAW (DNG, CR2, NEF, ARW, PEF, ...) is told from an ordinary TIFF by its
DNGVersion tag, the CR2 marker, or an IFD holding colour-filter-array or linear raw data; a file
Pillow cannot identify that starts like a RAW container (RAF, CR3, ORF, RW2, ...) is offered to
LibRaw before it is called unreadable; other files (a text file named .jpg) never reach LibRaw.
"""

from __future__ import annotations

import io
import os
import struct
from functools import lru_cache

from PIL import Image

# A RAW file's embedded preview is used when it is at least this large on its longer side, or at
# least as large as the half-size demosaic would be; otherwise the sensor data is demosaiced.
PREVIEW_MIN_SIDE = 1024
RAW_EXTENSIONS = frozenset(".dng .cr2 .cr3 .nef .nrw .arw .raf .orf .rw2 .pef .srw".split())
_RAW_PHOTOMETRIC = {32803, 34892}  # CFA, LinearRaw
_DNG_VERSION, _SUB_IFDS, _PHOTOMETRIC = 50706, 330, 262
# LibRaw's flip (dcraw's "50132467" mapping of EXIF orientation) back to the EXIF value
_FLIP_TO_ORIENTATION = {0: 1, 1: 2, 2: 4, 3: 3, 4: 5, 5: 8, 6: 6, 7: 7}


@lru_cache(maxsize=1)
def register_heif() -> bool:
    """Let Pillow open HEIC/HEIF (once per process; DataLoader workers call it too)."""
    try:
        from pillow_heif import register_heif_opener
    except ImportError:  # HEIC files then fail as "not an image Pillow can read"
        return False
    register_heif_opener()
    return True


def open_photo(source) -> Image.Image:
    """``Image.open`` for every photo sat reads: a path or a file object (BytesIO) of any format
    Pillow, pillow-heif or LibRaw reads. The image's EXIF orientation is not yet applied."""
    register_heif()
    data = _bytes(source)
    if is_tiff_raw(data):
        return open_raw(data)
    try:
        return Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError:
        if not looks_like_raw(data):  # a text file named .jpg never reaches LibRaw (nor its warnings)
            raise
        try:
            return open_raw(data)
        except RawError:
            pass  # not a RAW file either: keep Pillow's message
        raise


# The first bytes of the RAW containers LibRaw reads that are not TIFF-based: (offset, magic)
_RAW_MAGIC = ((0, b"II*\x00"), (0, b"MM\x00*"), (4, b"ftypcrx"), (0, b"FUJIFILMCCD-RAW"), (0, b"IIRO"), (0, b"IIRS"),
              (0, b"MMOR"), (0, b"IIU\x00"), (6, b"HEAPCCDR"), (0, b"\x00MRM"), (0, b"FOVb"), (0, b"ARRI"),
              (0, b"\x00MRW"), (0, b"RIFF"), (0, b"IIII"), (0, b"MMMM"))


def looks_like_raw(data: bytes) -> bool:
    """A container some camera RAW uses (TIFF, ISO BMFF CR3, RAF, ORF, RW2, CRW, MRW, X3F, ...)."""
    return any(data[offset:offset + len(magic)] == magic for offset, magic in _RAW_MAGIC)


class RawError(ValueError):
    """LibRaw could not read the file."""


def open_raw(data: bytes) -> Image.Image:
    """A camera RAW file's picture: its embedded preview JPEG when large enough, else a
    half-size demosaic, with the file's orientation set as EXIF orientation (not yet applied)."""
    try:
        import rawpy
    except ImportError as exc:  # a dependency; only a broken install lacks it
        raise RawError("camera RAW files need rawpy (pip install rawpy)") from exc
    try:
        raw = rawpy.imread(io.BytesIO(data))
    except (rawpy.LibRawError, ValueError) as exc:
        raise RawError(f"not a RAW file LibRaw can read ({exc})") from exc
    with raw:
        sizes = raw.sizes
        orientation = _FLIP_TO_ORIENTATION.get(sizes.flip, 1)
        im = _preview(raw, rawpy, max(sizes.width, sizes.height))
        if im is None:
            _bomb_check(sizes.raw_width * sizes.raw_height)
            rgb = raw.postprocess(half_size=True, user_flip=0, use_camera_wb=True, output_bps=8)
            im = Image.fromarray(rgb)
            im.format = "RAW"
    im.getexif()[0x0112] = orientation  # the RAW's orientation governs its preview too
    im.info["full_size"] = (sizes.width, sizes.height)  # the sensor's picture, before orientation
    return im


def _preview(raw, rawpy, sensor_side: int) -> Image.Image | None:
    try:
        thumb = raw.extract_thumb()
    except (rawpy.LibRawError, ValueError):  # no preview, or one LibRaw cannot unpack
        return None
    if thumb.format == rawpy.ThumbFormat.JPEG:
        try:  # decoded later by the caller, with JPEG draft scaling
            im = Image.open(io.BytesIO(bytes(thumb.data)))
        except (OSError, Image.UnidentifiedImageError):
            return None
    elif thumb.format == rawpy.ThumbFormat.BITMAP:
        im = Image.fromarray(thumb.data)
    else:
        return None
    if max(im.size) >= min(PREVIEW_MIN_SIDE, sensor_side // 2):
        return im
    return None


def _bomb_check(pixels: int) -> None:
    """Pillow's decompression-bomb guard for sensor data LibRaw would demosaic."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and pixels > 2 * limit:
        raise Image.DecompressionBombError(
            f"RAW image size ({pixels} pixels) exceeds limit of {2 * limit} pixels, could be decompression bomb DOS attack.")


def is_tiff_raw(data: bytes) -> bool:
    """A TIFF-structured camera RAW file (DNG, CR2, NEF, ARW, PEF, ...), not a plain TIFF."""
    if data[:4] not in (b"II*\0", b"MM\0*"):
        return False
    if data[8:10] == b"CR":  # Canon CR2
        return True
    order = "<" if data[:2] == b"II" else ">"
    try:
        return _ifds_hold_raw(data, order, struct.unpack(order + "I", data[4:8])[0])
    except struct.error:  # truncated: let Pillow report it
        return False


def _ifds_hold_raw(data: bytes, order: str, first: int) -> bool:
    todo, seen = [first], set()
    while todo and len(seen) < 16:
        offset = todo.pop()
        if not offset or offset in seen or offset + 2 > len(data):
            continue
        seen.add(offset)
        (count,) = struct.unpack(order + "H", data[offset:offset + 2])
        for i in range(min(count, 512)):
            at = offset + 2 + 12 * i
            tag, typ, n = struct.unpack(order + "HHI", data[at:at + 8])
            if tag == _DNG_VERSION:
                return True
            if tag == _PHOTOMETRIC and typ == 3 and struct.unpack(order + "H", data[at + 8:at + 10])[0] in _RAW_PHOTOMETRIC:
                return True
            if tag == _SUB_IFDS and typ in (4, 13):
                where = at + 8 if n == 1 else struct.unpack(order + "I", data[at + 8:at + 12])[0]
                todo.extend(struct.unpack(order + "I" * n, data[where:where + 4 * n]) if n <= 16 else [])
        end = offset + 2 + 12 * count
        todo.append(struct.unpack(order + "I", data[end:end + 4])[0] if end + 4 <= len(data) else 0)
    return False


def _bytes(source) -> bytes:
    if isinstance(source, io.BytesIO):
        return source.getvalue()
    if hasattr(source, "read"):
        source.seek(0)
        return source.read()
    with open(os.fspath(source), "rb") as f:
        return f.read()
