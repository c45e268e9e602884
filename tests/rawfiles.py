"""Small valid DNG files for the tests: a Bayer (RGGB) mosaic of a real photo, 16-bit, optionally
with a JPEG preview in IFD0 (the raw image then goes to a SubIFD, as cameras and converters do).
LibRaw decodes them and exiftool reads them as DNG 1.4."""

import io
import struct

import numpy as np
from PIL import Image

BYTE, ASCII, SHORT, LONG, RATIONAL, SRATIONAL = 1, 2, 3, 4, 5, 10
_SIZES = {BYTE: 1, ASCII: 1, SHORT: 2, LONG: 4, RATIONAL: 8, SRATIONAL: 8}
_FORMATS = {BYTE: "B", SHORT: "H", LONG: "I"}
XYZ_TO_SRGB = [3.2406, -1.5372, -0.4986, -0.9689, 1.8758, 0.0415, 0.0557, -0.2040, 1.0570]  # ColorMatrix1


def _pack(typ, values) -> bytes:
    if typ == ASCII:
        return values.encode() + b"\0"
    if typ in (RATIONAL, SRATIONAL):
        return b"".join(struct.pack("<ii" if typ == SRATIONAL else "<II", round(v * 10000), 10000) for v in values)
    return struct.pack("<" + _FORMATS[typ] * len(values), *values)


def _ifd(entries: dict, offset: int, next_ifd: int = 0) -> bytes:
    """An IFD placed at ``offset``, its values too long for an entry right after it."""
    extra_at = offset + 2 + 12 * len(entries) + 4
    head, extra = struct.pack("<H", len(entries)), b""
    for tag in sorted(entries):
        typ, values = entries[tag]
        data = _pack(typ, values)
        if len(data) <= 4:
            field = data.ljust(4, b"\0")
        else:
            field = struct.pack("<I", extra_at + len(extra))
            extra += data + b"\0" * (len(data) % 2)
        head += struct.pack("<HHI", tag, typ, len(data) // _SIZES[typ]) + field
    return head + struct.pack("<I", next_ifd) + extra


def mosaic(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> RGGB Bayer (H, W) uint16, linear light on a 12-bit scale."""
    lin = (rgb.astype(np.float64) / 255.0) ** 2.2 * 4000 + 64
    cfa = np.empty(rgb.shape[:2], np.uint16)
    cfa[0::2, 0::2] = lin[0::2, 0::2, 0]
    cfa[0::2, 1::2] = lin[0::2, 1::2, 1]
    cfa[1::2, 0::2] = lin[1::2, 0::2, 1]
    cfa[1::2, 1::2] = lin[1::2, 1::2, 2]
    return cfa


def make_dng(rgb: np.ndarray, orientation: int = 1, preview=None, make="SatTest", model="Bayer 1") -> bytes:
    """A DNG whose sensor data is a mosaic of ``rgb`` ((H, W, 3) uint8, even sides), with EXIF
    ``orientation``; ``preview``: a PIL image stored as the JPEG preview."""
    h, w = rgb.shape[:2]
    raw = mosaic(rgb).astype("<u2").tobytes()
    common = {271: (ASCII, make), 272: (ASCII, model), 274: (SHORT, [orientation]),
              50706: (BYTE, [1, 4, 0, 0]), 50707: (BYTE, [1, 1, 0, 0]), 50708: (ASCII, f"{make} {model}"),
              50721: (SRATIONAL, XYZ_TO_SRGB), 50778: (SHORT, [21]), 50728: (RATIONAL, [1, 1, 1])}
    sensor = {254: (LONG, [0]), 256: (LONG, [w]), 257: (LONG, [h]), 258: (SHORT, [16]), 259: (SHORT, [1]),
              262: (SHORT, [32803]), 277: (SHORT, [1]), 278: (LONG, [h]), 284: (SHORT, [1]),
              33421: (SHORT, [2, 2]), 33422: (BYTE, [0, 1, 1, 2]), 50710: (BYTE, [0, 1, 2]), 50711: (SHORT, [1]),
              50714: (LONG, [64]), 50717: (LONG, [4095])}
    out = bytearray(b"II*\0\0\0\0\0")
    raw_at = len(out)
    out += raw
    if preview is None:
        ifd0 = {**common, **sensor, 273: (LONG, [raw_at]), 279: (LONG, [len(raw)])}
        out += b"\0" * (len(out) % 2)
        out[4:8] = struct.pack("<I", len(out))
        return bytes(out + _ifd(ifd0, len(out)))
    buf = io.BytesIO()
    preview.convert("RGB").save(buf, "JPEG", quality=92)
    jpeg_at = len(out)
    out += buf.getvalue()
    out += b"\0" * (len(out) % 2)
    pw, ph = preview.size
    ifd0 = {**common, 254: (LONG, [1]), 256: (LONG, [pw]), 257: (LONG, [ph]), 258: (SHORT, [8, 8, 8]),
            259: (SHORT, [7]), 262: (SHORT, [6]), 273: (LONG, [jpeg_at]), 277: (SHORT, [3]), 278: (LONG, [ph]),
            279: (LONG, [len(buf.getvalue())]), 284: (SHORT, [1]), 330: (LONG, [0])}
    ifd0_at = len(out)
    size0 = len(_ifd(ifd0, ifd0_at))
    sub_at = ifd0_at + size0 + size0 % 2
    ifd0[330] = (LONG, [sub_at])
    out[4:8] = struct.pack("<I", ifd0_at)
    out += _ifd(ifd0, ifd0_at)
    out += b"\0" * (sub_at - len(out))
    out += _ifd({**sensor, 273: (LONG, [raw_at]), 279: (LONG, [len(raw)])}, sub_at)
    return bytes(out)


def nef_like(rgb: np.ndarray) -> bytes:
    """A TIFF whose IFD0 is an RGB thumbnail and whose SubIFD holds CFA data, without DNG tags
    (the layout of Nikon NEF and other TIFF-based RAW files)."""
    dng = bytearray(make_dng(rgb, preview=Image.fromarray(rgb)))
    at = dng.find(struct.pack("<HHI", 50706, BYTE, 4))  # hide the DNGVersion entry (entries stay in order)
    dng[at:at + 2] = struct.pack("<H", 50000)
    return bytes(dng)
