"""Rerun figures (issue 22): what `sat caption` costs when there is nothing new.

    nice -n 15 .venv/bin/python bench/rerun_bench.py [--photos 235] [--big 60] [--tree 100000]
        [--device cpu] [--only small,big,tree]

small: N COCO photos of ../shared/data (symlinks), captioned once, then rerun (wall seconds of a
       fresh `sat caption` process; --rehash for comparison).
big:   60 photos of 16 MB (a COCO photo plus 16 MB of trailing maker data, each distinct), captioned,
       then rerun; bytes the rerun process reads (rchar of /proc/self/io, --workers 0 so all reads are
       in that process) vs the small rerun's, and a photo rewritten in place plus a renamed one.
tree:  a tree of N files (hard links to 4 photos in folders of 1,000), captioned, then rerun twice
       (wall and CPU seconds, user + sys, of the sat process and its workers).
The machine's load (uptime) is printed with each figure: figures from a busy machine are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
WRAP = ("import sys, runpy, atexit\n"
        "def io():\n"
        "    f = dict(l.split(': ') for l in open('/proc/self/io').read().splitlines())\n"
        "    sys.stderr.write('RCHAR %s\\n' % f['rchar'])\n"
        "atexit.register(io)\n"
        "sys.argv = ['sat'] + sys.argv[1:]\n"
        "runpy.run_module('sat_cli', run_name='__main__')\n")


def load() -> str:
    return open("/proc/loadavg").read().split()[0]


CPU = [0.0]  # user + sys seconds of the last `sat caption` process (and its workers)


def sat(args: list[str]) -> tuple[float, int, str]:
    """(wall seconds, bytes read by the sat process, stderr tail) of one fresh `sat caption`; its
    CPU seconds (user + sys, workers included) in CPU[0]."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", WRAP, "caption", *args], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU[0] = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    if out.returncode not in (0, 1):
        sys.exit(f"sat caption failed ({out.returncode}):\n{out.stderr[-2000:]}")
    rchar = next((int(l.split()[1]) for l in out.stderr.splitlines() if l.startswith("RCHAR")), -1)
    summary = next((l for l in out.stderr.splitlines() if "captioned," in l), "").strip()
    return seconds, rchar, summary


def coco(n: int) -> list[Path]:
    images = json.loads((DATA / "captions.json").read_text())["images"][:n]
    return [DATA / im["filepath"] / im["filename"] for im in images]


def small(tmp: Path, n: int, device: str):
    folder = tmp / "small"
    folder.mkdir()
    for p in coco(n):
        os.symlink(p, folder / p.name)
    db = str(tmp / "small.db")
    first = sat([str(folder), "--db", db, "--device", device, "-q"])
    print(f"small: first run {len(os.listdir(folder))} photos {first[0]:.1f}s (load {load()})")
    time.sleep(1.1)
    for label, extra in (("rerun", []), ("rerun --rehash", ["--rehash"]), ("rerun", [])):
        s, rchar, summary = sat([str(folder), "--db", db, "--device", device, "--workers", "0", *extra])
        print(f"small: {label}: {s:.2f}s, read {rchar / 1e6:.1f} MB (load {load()})  [{summary}]")
    return rchar


def big(tmp: Path, n: int, device: str, small_read: int | None):
    folder = tmp / "big"
    folder.mkdir()
    photos = coco(4)
    for i in range(n):
        data = photos[i % len(photos)].read_bytes()
        (folder / f"cam{i:03d}.jpg").write_bytes(data + os.urandom(16 * 1024 * 1024 - len(data)))
    past = time.time() - 10
    for p in folder.iterdir():
        os.utime(p, (past, past))
    db = str(tmp / "big.db")
    first = sat([str(folder), "--db", db, "--device", device, "-q"])
    print(f"big: first run {n} x 16 MB {first[0]:.1f}s (load {load()})")
    s, rchar, summary = sat([str(folder), "--db", db, "--device", device, "--workers", "0"])
    extra = f", {(rchar - small_read) / 1e6:.1f} MB more than the small rerun" if small_read else ""
    print(f"big: rerun {s:.2f}s, read {rchar / 1e6:.1f} MB{extra} (target <= 50 MB more) (load {load()})  [{summary}]")
    target = folder / "cam000.jpg"  # rewritten in place, size and mtime put back
    st = target.stat()
    with open(target, "r+b") as fh:
        fh.seek(st.st_size - 100)
        fh.write(os.urandom(100))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.rename(folder / "cam001.jpg", folder / "renamed.jpg")
    s, rchar, summary = sat([str(folder), "--db", db, "--device", device, "--workers", "0"])
    print(f"big: after a rewrite in place and a rename: {s:.2f}s, read {rchar / 1e6:.1f} MB (load {load()})  "
          f"[{summary}] (expect 1 captioned, the renamed one read and skipped)")


def tree(tmp: Path, n: int, device: str):
    """N files in folders of 1,000: hard links to 4 photos (the file index keys on the path; links
    cost no disk space), captioned once (4 contents), then rerun."""
    folder = tmp / "tree"
    (tmp / "originals").mkdir()
    photos = [tmp / "originals" / p.name for p in coco(4)]  # copies: links to ../shared/data would move its ctimes
    for src, dst in zip(coco(4), photos):
        shutil.copyfile(src, dst)
    for i in range(n):
        sub = folder / f"d{i // 1000:03d}"
        if i % 1000 == 0:
            sub.mkdir(parents=True)
        os.link(photos[i % 4], sub / f"f{i:06d}.jpg")
    db = str(tmp / "tree.db")
    time.sleep(1.1)  # the racy-clean rule: entries recorded a second after the files' ctime are trusted
    first = sat([str(folder), "--db", db, "--device", device, "-q"])
    print(f"tree: first run {n} files {first[0]:.1f}s, {CPU[0]:.1f}s CPU (load {load()})  [{first[2]}]")
    time.sleep(1.1)
    for _ in range(2):
        s, rchar, summary = sat([str(folder), "--db", db, "--device", device])
        print(f"tree: rerun {n} files {s:.2f}s wall, {CPU[0]:.2f}s CPU (user + sys), read {rchar / 1e6:.1f} MB "
              f"(target <= 15 s) (load {load()})  [{summary}]")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=235)
    ap.add_argument("--big", type=int, default=60)
    ap.add_argument("--tree", type=int, default=100_000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only", default="small,big,tree")
    ap.add_argument("--tmp", default=None, help="where the photos and databases go (removed afterwards)")
    args = ap.parse_args()
    parts = args.only.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="sat-rerun-", dir=args.tmp))
    try:
        small_read = small(tmp, args.photos, args.device) if "small" in parts else None
        if "big" in parts:
            big(tmp, args.big, args.device, small_read)
        if "tree" in parts:
            tree(tmp, args.tree, args.device)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
