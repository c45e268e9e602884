"""Finding image files and turning each into the encoder's input, in DataLoader workers."""

from __future__ import annotations

import collections

import errno
import glob
import hashlib
import io
import os
import stat
import threading
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from PIL import Image, ImageOps

from ..records import Result
from .formats import RAW_EXTENSIONS, open_photo

IMAGE_EXTENSIONS = frozenset(
    ".jpg .jpeg .jpe .jfif .png .webp .bmp .dib .gif .tif .tiff .ppm .pgm .pbm .pnm .tga .jp2 .avif .heic .heif .hif"
    .split()
) | RAW_EXTENSIONS  # HEIC/HEIF through pillow-heif, camera RAW through rawpy (formats.py)
_GLOB_CHARS = set("*?[")
_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


@dataclass
class Found:
    path: str  # absolute path (undecodable bytes of the name as surrogate escapes)
    error: str | None = None  # set when the argument names nothing readable


READ_TIMEOUT = 60.0  # seconds a single file may take to read before it is given up (a dead network mount)
_KINDS = {stat.S_IFIFO: "a named pipe", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFDIR: "a folder"}


def why_not_regular(path: str) -> str | None:
    """Why ``path`` is not a regular file to open (None when it is), from ``stat`` alone: named
    pipes, sockets and devices (and symbolic links to them) would block or never end."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "broken symbolic link" if os.path.islink(path) else "no such file or directory"
    except OSError as exc:
        return "symbolic link loop" if exc.errno == errno.ELOOP else (exc.strerror or str(exc))
    if stat.S_ISREG(mode):
        return None
    return f"not a regular file ({_KINDS.get(stat.S_IFMT(mode), 'a special file')}): not opened"


def _walk(folder: str, recursive: bool) -> Iterator[Found]:
    problems: list[OSError] = []
    for root, dirs, files in os.walk(folder, onerror=problems.append):  # symbolic links to folders: not followed
        while problems:
            exc = problems.pop(0)
            yield Found(os.path.abspath(exc.filename or root), f"cannot read this folder: {exc.strerror or exc}")
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if recursive else []
        for name in sorted(files):
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                full = os.path.join(root, name)
                yield Found(full, why_not_regular(full))
    for exc in problems:  # the folder itself could not be listed
        yield Found(os.path.abspath(exc.filename or folder), f"cannot read this folder: {exc.strerror or exc}")


def discover(inputs: list[str], recursive: bool = True, unique: bool = True) -> Iterator[Found]:
    """Files, folders (walked, image extensions only, hidden entries skipped, symbolic links to
    folders not followed) and glob patterns, in a stable order, each path once (``unique``).
    Entries that cannot be read (special files, broken links, link loops, unreadable folders,
    an argument that matches nothing) come with their ``error``; nothing here opens a file."""
    seen: set[str] = set()

    def emit(found: Found) -> Iterator[Found]:
        found.path = os.path.abspath(found.path)
        if not unique or found.path not in seen:
            seen.add(found.path)
            yield found

    for arg in inputs:
        arg = os.fsdecode(arg)  # str, bytes or os.PathLike
        path = os.path.expanduser(arg)
        if os.path.isdir(path):
            for f in _walk(path, recursive):
                yield from emit(f)
        elif os.path.lexists(path):
            yield from emit(Found(path, why_not_regular(path)))
        elif _GLOB_CHARS & set(arg):
            matches = sorted(glob.glob(path, recursive=True))
            if not matches:
                yield Found(os.path.abspath(arg), "no files match this pattern")
            for m in matches:
                for f in (_walk(m, recursive) if os.path.isdir(m) else [Found(m, why_not_regular(m))]):
                    yield from emit(f)
        else:
            yield Found(os.path.abspath(arg), "no such file or directory")


def _read_all(path: str) -> bytes:
    """Open without blocking (a named pipe put in the file's place since it was found would block
    ``open`` forever), check that it is a regular file, read it whole."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, f"not a regular file ({_KINDS.get(stat.S_IFMT(mode), 'a special file')})")
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_file(path: str, timeout: float | None = READ_TIMEOUT) -> bytes:
    """A file's bytes. The read runs in a helper thread that is abandoned after ``timeout``
    seconds (TimeoutError): a stalled network mount costs one file, not the run."""
    if not timeout:
        return _read_all(path)
    return _READER.read(path, timeout)


class _Reader:
    """The helper thread of :func:`read_file`, one per process and reused from file to file (a new
    thread per file cost ~80 us of CPU and most of a millisecond of latency on a busy machine).
    A read that outlasts its timeout leaves its thread behind, blocked; the next read starts a new
    one. A forked process (a DataLoader worker) starts its own."""

    def __init__(self):
        self._lock = threading.Lock()
        self._pid = None
        self._requests = self._answers = None

    def read(self, path: str, timeout: float) -> bytes:
        import queue

        with self._lock:
            if self._pid != os.getpid():
                self._pid = os.getpid()
                self._requests, self._answers = queue.SimpleQueue(), queue.SimpleQueue()
                threading.Thread(target=self._serve, args=(self._requests, self._answers), name="sat-read",
                                 daemon=True).start()
            self._requests.put(path)
            try:
                ok, value = self._answers.get(timeout=timeout)
            except queue.Empty:
                self._pid = None  # that thread is stuck in the read: the next file gets a new one
                raise TimeoutError(f"reading the file stalled for more than {timeout:g} s (a dead network mount?): "
                                   "given up") from None
        if not ok:
            raise value
        return value

    @staticmethod
    def _serve(requests, answers):
        while True:
            path = requests.get()
            try:
                answers.put((True, _read_all(path)))
            except BaseException as exc:  # handed to the caller
                answers.put((False, exc))


_READER = _Reader()


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
    with open_photo(source) as im:  # Image.open, plus HEIC and camera RAW
        im.seek(0)  # the first frame of an animation
        w, h = im.info.get("full_size", im.size)  # a RAW file's sensor size, not its preview's
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
    """A one-line reason for a failed file, never holding raw bytes of its name."""
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"image too large (Pillow's decompression-bomb guard): {exc}"
    if isinstance(exc, Image.UnidentifiedImageError):
        return "not an image Pillow can read (unknown or corrupt format)"
    if isinstance(exc, OSError) and exc.strerror and not isinstance(exc, TimeoutError):
        text = exc.strerror  # without the file name: the row already holds it
    else:
        text = str(exc) or type(exc).__name__
        text = text if isinstance(exc, OSError) else f"{type(exc).__name__}: {text}"
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


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

    def __init__(self, size: tuple[int, int], interpolation: str = "bicubic", skip: frozenset[str] = frozenset(),
                 read_timeout: float | None = READ_TIMEOUT):
        self.size = size
        self.interpolation = interpolation
        self.skip = skip
        self.read_timeout = read_timeout

    def __getitem__(self, key) -> Result:
        index, source = key
        if is_image_object(source):
            return self._memory(index, source)
        if isinstance(source, Found):  # found, but not something to open
            return Result(source.path, error=source.error, index=index)
        path = os.fspath(source)
        try:
            data = read_file(path, self.read_timeout)
        except OSError as exc:  # gone, unreadable, no longer a regular file, stalled (TimeoutError)
            return Result(path, error=describe_error(exc), index=index)
        return self.from_bytes(path, data, index)

    def from_bytes(self, path: str | None, data: bytes, index: int | None = None) -> Result:
        """A file's bytes (read from disk, or sent to `sat serve`) -> its Result with pixels, as
        for a file: hashed, skipped when known, decoded; a failure is ``error``, never raised."""
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


# A loader worker keeps its last few pixel batches (shared memory) alive a little longer than the
# main process needs them. Shared memory is freed by whichever process lets go of it last: the
# main process, done with a batch, then only unmaps it, and the worker frees the ~7,000 pages of a
# 64-photo batch on its own core (0.05 ms of the caption loop's CPU per photo otherwise,
# bench/pipeline_bench.py). The main process's own reference keeps a batch valid however long
# it holds it: this only chooses who pays for the freeing. A worker has at most the DataLoader's
# prefetch_factor (4) batches in flight, so the main process is past the oldest of the last 6.
_KEPT: collections.deque = collections.deque(maxlen=6)


def collate(items: list[Result]):
    """-> (items, pixels (N, 3, H, W) uint8 of the items that have them, or None).

    Decoded photos are (H, W, 3) arrays: they are stacked as they are, into shared memory in a
    DataLoader worker (nothing to copy again on the way to the main process), and the batch is
    returned as a (N, 3, H, W) view with channels-last strides, the layout the encoders' convolutions
    want, instead of being transposed photo by photo (1-2 ms of a worker's CPU per photo)."""
    import torch

    good = []
    for it in items:
        if it.pixels is not None:
            it.row = len(good)
            good.append(it.pixels)
            it.pixels = None
    if not good:
        return items, None
    hwc = [p.permute(1, 2, 0) for p in good]
    if not all(h.is_contiguous() and h.shape == hwc[0].shape for h in hwc):
        return items, torch.stack(good)
    first = hwc[0]
    if torch.utils.data.get_worker_info() is not None:
        storage = first._typed_storage()._new_shared(len(hwc) * first.numel(), device=first.device)
        out = first.new(storage).resize_(len(hwc), *first.shape)
        _KEPT.append(out)
    else:
        out = first.new_empty((len(hwc), *first.shape))
    torch.stack(hwc, out=out)
    return items, out.permute(0, 3, 1, 2)
