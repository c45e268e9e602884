"""The file index: for each path, the (device, inode, size, mtime_ns, ctime_ns) the file had when
it was hashed, with that sha256. A rerun trusts an entry, and reads nothing, only when every field
matches the file's stat now and the entry was recorded at least a second after the file's mtime
(git's racy-clean rule: a file written in the same clock tick as its entry, on a filesystem with
coarse timestamps, or with an mtime in the future, is read and hashed again). Anything else is
hashed as before, so the index can only save reads, never change what is captioned.
"""

from __future__ import annotations

import os
import time

RACY_NS = 1_000_000_000  # an entry must be this much younger than the file's mtime to be trusted


def stat_key(path) -> tuple[int, int, int, int, int] | None:
    """(dev, ino, size, mtime_ns, ctime_ns) of a regular file, or None (gone, not a file...)."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def trusted(entry, key) -> bool:
    """True when an index row (dev, ino, size, mtime_ns, ctime_ns, sha256, recorded_ns) still
    describes a file whose stat is ``key``."""
    if entry is None or key is None:
        return False
    if tuple(entry[:5]) != tuple(key):
        return False
    return entry[6] - key[3] >= RACY_NS


def lookup(db, paths_bytes: list[bytes]) -> dict[bytes, tuple]:
    """Index rows of these paths (exact name bytes), keyed by path."""
    rows: dict[bytes, tuple] = {}
    chunk = 500
    for i in range(0, len(paths_bytes), chunk):
        part = paths_bytes[i : i + chunk]
        marks = ",".join("?" * len(part))
        for row in db.execute(
            "SELECT path_bytes, dev, ino, size, mtime_ns, ctime_ns, sha256, recorded_ns FROM file_index "
            f"WHERE path_bytes IN ({marks})", part):
            rows[bytes(row[0])] = tuple(row[1:])
    return rows


def record(db, entries: list[tuple[bytes, tuple, str]]):
    """Store (path_bytes, stat key taken before the file was read, sha256) rows; the caller holds
    the transaction. The stat is the one from before the read: a file changed while it was read
    has a newer stat than its entry, so the next run hashes it again."""
    stamp = time.time_ns()
    db.conn.executemany(
        """INSERT INTO file_index (path_bytes, dev, ino, size, mtime_ns, ctime_ns, sha256, recorded_ns)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?)
           ON CONFLICT(path_bytes) DO UPDATE SET dev = excluded.dev, ino = excluded.ino, size = excluded.size,
             mtime_ns = excluded.mtime_ns, ctime_ns = excluded.ctime_ns, sha256 = excluded.sha256,
             recorded_ns = excluded.recorded_ns""",
        [(p, *key, sha, stamp) for p, key, sha in entries])


def forget(db, paths_bytes: list[bytes]):
    db.conn.executemany("DELETE FROM file_index WHERE path_bytes = ?", [(p,) for p in paths_bytes])
