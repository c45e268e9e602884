"""Writing files so that a failure never costs the old one: every file sat writes goes to a hidden
temporary name beside its target, is flushed to disk, and is renamed over the target only once it
is complete. A failed or interrupted command leaves the previous file (or none), never an empty or
half-written one, and removes its temporary file.

A symbolic link as target: the file it points to is replaced (the link stays). Standard output
(``-``, ``/dev/stdout``), FIFOs and character devices cannot be renamed over and are written
directly. Folders (a gallery, a checkpoint) are built under a temporary name and renamed in.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import stat
import sys
from pathlib import Path


def temp_name(path: str) -> str:
    """A hidden name beside ``path`` with the same extension (exiftool picks the format by it)."""
    folder, name = os.path.split(path)
    stem, ext = os.path.splitext(name)
    return os.path.join(folder, f".{stem}.sat-{os.getpid()}-{secrets.token_hex(4)}{ext}")


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_folder(path: str) -> None:
    """Make a rename inside ``path``'s folder durable (best effort: some file systems refuse)."""
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def is_stream(path: str | os.PathLike) -> bool:
    """Standard output, a FIFO or a device: written in place, as there is nothing to rename over."""
    path = os.fspath(path)
    if path == "-" or path in ("/dev/stdout", "/dev/stderr"):
        return True
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISSOCK(mode)


def resolve(path: str | os.PathLike) -> str:
    """The file a write to ``path`` should replace: a symbolic link's target, else ``path``."""
    path = os.fspath(path)
    return os.path.realpath(path) if os.path.islink(path) else path


def usual_mode() -> int:
    """The permissions of a new file: 0666 less the umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _mode_for(target: str) -> int:
    """The replaced file's permissions, or the usual ones for a new file."""
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        return usual_mode()


@contextlib.contextmanager
def replacing(path: str | os.PathLike):
    """Yield a temporary path beside ``path`` to write; on success it is flushed to disk and renamed
    over ``path``; on any exception it is removed and ``path`` is left as it was."""
    target = resolve(path)
    tmp = temp_name(target)
    try:
        yield tmp
        os.chmod(tmp, _mode_for(target))
        fsync_path(tmp)
        os.replace(tmp, target)
        fsync_folder(target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs):
    """``open(path, mode)`` that replaces ``path`` only when the block completes (``mode`` "w" or
    "wb"). ``-`` is standard output; FIFOs and devices are opened directly."""
    if mode not in ("w", "wb"):
        raise ValueError("atomic_open writes whole files: mode 'w' or 'wb'")
    if os.fspath(path) == "-":
        yield sys.stdout.buffer if "b" in mode else sys.stdout
        return
    if is_stream(path):
        with open(path, mode, **kwargs) as f:
            yield f
        return
    with replacing(path) as tmp:
        with open(tmp, mode.replace("w", "x"), **kwargs) as f:
            yield f
            f.flush()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)


@contextlib.contextmanager
def folder(path: str | os.PathLike, keep_others: bool = True):
    """Yield a new temporary folder beside ``path`` to fill. On success a missing ``path`` is
    the renamed temporary folder; an existing one has each entry of the new folder swapped in
    (an entry of the same name is replaced, other files in it are kept). On any exception the
    temporary folder is removed and ``path`` is untouched."""
    target = Path(resolve(path))
    if target.exists() and not target.is_dir():
        from .errors import SatError

        raise SatError(f"{path} exists and is not a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(temp_name(str(target)))
    tmp.mkdir()
    try:
        yield tmp
        if not target.exists():
            os.replace(tmp, target)
        else:
            for entry in sorted(tmp.iterdir()):
                _swap_in(entry, target / entry.name)
        fsync_folder(str(target))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(new: Path, old: Path) -> None:
    if old.is_dir() and not old.is_symlink():
        aside = Path(temp_name(str(old)))
        os.replace(old, aside)
        try:
            os.replace(new, old)
        except BaseException:
            os.replace(aside, old)
            raise
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(new, old)
