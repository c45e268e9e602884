"""Changing photo and sidecar files safely: every write goes to a hidden temporary file beside the
target (named and flushed by ``atomic``), is flushed to disk, then renamed over it, so a crash
leaves the old file or the new one, never half of either. exiftool rewrites existing files."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil

from ..atomic import fsync_folder as _fsync_folder
from ..atomic import fsync_path as _fsync
from ..atomic import temp_name as _temp_name


class FileProblem(Exception):
    """A file sat cannot change; the message says why (reported per file, the run goes on)."""


def sha256_file(path: str) -> str | None:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def check_writable(path: str, exists: bool) -> None:
    """A file without any write permission is read-only, for root too (its owner said so)."""
    folder = os.path.dirname(os.path.abspath(path))
    if exists and (not os.access(path, os.W_OK) or not os.stat(path).st_mode & 0o222):
        raise FileProblem("read-only file: not changed")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise FileProblem("cannot write in its folder (read-only): not changed")


@contextlib.contextmanager
def _beside(path: str):
    """A temporary name next to ``path`` (same folder, so a rename is atomic), removed afterwards
    whatever happens; OS errors become one per-file message."""
    tmp = _temp_name(path)
    try:
        yield tmp
        _fsync_folder(path)
    except OSError as exc:
        raise FileProblem(f"cannot write: {exc.strerror or exc}") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def create_file(path: str, data: bytes) -> None:
    """Write a new file atomically; refuse if one appeared meanwhile (another program's sidecar)."""
    check_writable(path, exists=False)
    with _beside(path) as tmp:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # fails if the name exists: never replaces a file sat did not see
        except FileExistsError:
            raise FileProblem("a sidecar appeared while sat was writing: not changed (run again)") from None
        except OSError:  # a file system without hard links
            if os.path.exists(path):
                raise FileProblem("a sidecar appeared while sat was writing: not changed (run again)") from None
            os.replace(tmp, path)


def backup_path(path: str) -> str:
    """exiftool's name for the original: ``photo.jpg_original``."""
    return path + "_original"


def rewrite(et, path: str, args: list, backup: bool) -> str | None:
    """Rewrite ``path`` with exiftool ``args`` into a temporary copy, then rename it over the
    original (atomic). With ``backup`` the original is kept as ``path_original`` (an existing
    backup, the oldest original, is never replaced). Returns the backup's path, if any."""
    check_writable(path, exists=True)
    with _beside(path) as tmp:
        out, err = et.execute(*args, "-o", tmp, path)
        if not os.path.exists(tmp) or not re.search(r"[1-9]\d* image files? (created|updated)", out):
            raise FileProblem(_exiftool_reason(err, path) or "exiftool wrote nothing")
        shutil.copymode(path, tmp)
        _fsync(tmp)
        kept = None
        if backup:
            kept = backup_path(path)
            if not os.path.exists(kept):
                try:
                    os.link(path, kept)
                except OSError:
                    shutil.copy2(path, kept)
        os.replace(tmp, path)
    return kept


def remove_file(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise FileProblem(f"cannot delete: {exc.strerror or exc}") from exc


def _exiftool_reason(err: str, path: str) -> str:
    """exiftool's first error line, without the file name it ends with."""
    lines = [line for line in err.splitlines() if line.strip()]
    line = next((x for x in lines if x.startswith("Error")), lines[0] if lines else "")
    for name in (path, os.path.basename(path)):
        line = line.removesuffix(f" - {name}")
    return "exiftool: " + line.split(":", 1)[-1].strip() if line else ""
