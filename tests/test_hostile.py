"""Folders a careful user meets within a week: any file name the OS can hold, special files that
would block a read, unreadable folders, stalled reads and files that change under the run."""

import base64
import csv
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
import sqlite_utils
from click.testing import CliRunner

from conftest import EXAMPLES, as_nobody
from sat_cli.cli.main import cli

NAMES = [
    b"latin1-caf\xe9.jpg",  # not UTF-8: a disk copied from an old Windows or Samba share
    b"bytes-\xff\xfe.png",
    b"new\nline.png",
    b"tab\there.png",
    b"esc\x1b[31mred\x07.png",
    b"[bold]markup[red] \"quoted\", comma.png",
    b"back\\slash\\x41.png",  # a literal backslash-x: must not be confused with an escaped byte
    b"n" * 251 + b".png",  # 255 bytes, the longest name Linux allows
]


def fs(name: bytes) -> str:
    return os.fsdecode(name)


def unescape_tsv(field: str) -> bytes:
    """The inverse of sat's TSV escaping (\\\\, \\t, \\n, \\r, \\xNN), back to the exact bytes."""
    out, i = bytearray(), 0
    while i < len(field):
        ch = field[i]
        if ch == "\\":
            nxt = field[i + 1]
            if nxt == "x":
                out.append(int(field[i + 2 : i + 4], 16))
                i += 4
                continue
            out += {"\\": b"\\", "t": b"\t", "n": b"\n", "r": b"\r"}[nxt]
            i += 2
            continue
        out += ch.encode()
        i += 1
    return bytes(out)


@pytest.fixture
def named(tmp_path):
    """Photos under every kind of name, one of them at the bottom of a 40-level tree."""
    root = tmp_path / "named"
    root.mkdir()
    sources = ["rocket.jpg", "chelsea.png", "coffee.png", "camera.png", "astronaut.png"]
    for i, name in enumerate(NAMES):  # a distinct trailing byte each: distinct content, nothing deduplicated
        data = (EXAMPLES / sources[i % len(sources)]).read_bytes() + bytes([i])
        Path(os.path.join(str(root), fs(name))).write_bytes(data)
    deep = root
    for level in range(40):
        deep = deep / f"level{level:02d}"
    deep.mkdir(parents=True)
    shutil.copy(EXAMPLES / "rocket.jpg", deep / "deep.jpg")
    expected = {os.fsencode(str(root)) + b"/" + n for n in NAMES} | {os.fsencode(str(deep / "deep.jpg"))}
    return root, expected


def test_every_file_name_is_captioned_stored_exported_and_found_again(named, tmp_path, tiny_model):
    root, expected = named
    db = tmp_path / "n.db"
    r = CliRunner().invoke(cli, ["caption", str(root), "--db", str(db), "--model", str(tiny_model), "--workers", "0",
                                 "--print"])
    assert r.exit_code == 0, r.output
    assert "\x1b" not in r.stderr and "\x07" not in r.stderr  # no raw control characters on the terminal
    lines = r.stdout.splitlines()
    assert len(lines) == len(expected) and {unescape_tsv(line.split("\t")[0]) for line in lines} == expected
    rows = list(sqlite_utils.Database(db)["images"].rows)
    assert {row["path_bytes"] for row in rows} == expected and all(row["status"] == "ok" for row in rows)

    def export(fmt):
        out = CliRunner().invoke(cli, ["export", str(db), "--format", fmt, "--best"])
        assert out.exit_code == 0, out.output
        return out.stdout

    tsv = export("tsv").split("\n")[1:-1]
    assert len(tsv) == len(expected)  # one line per row, whatever the names hold
    assert {unescape_tsv(line.split("\t")[0]) for line in tsv} == expected
    parsed = list(csv.DictReader(io.StringIO(export("csv"))))
    texts = {os.fsencode(p).decode("utf-8", "backslashreplace") for p in map(os.fsdecode, expected)}
    assert {row["path"] for row in parsed} == texts  # quoted: newlines and commas stay inside their field
    records = [json.loads(line) for line in export("jsonl").splitlines()]
    exact = {base64.b64decode(rec["path_bytes"]) if "path_bytes" in rec else rec["path"].encode() for rec in records}
    assert exact == expected  # JSON keeps the exact bytes where the name is not UTF-8

    for row in rows:  # sat show finds every file again by its stored row and opens it
        shown = CliRunner().invoke(cli, ["show", str(db), str(row["id"]), "--out", str(tmp_path / f"{row['id']}.png")])
        assert shown.exit_code == 0, shown.output
    word = records[0]["captions"][0]["words"][0]
    found = CliRunner().invoke(cli, ["search", str(db), word, "--limit", "50"])
    assert found.exit_code == 0 and "\x1b" not in found.stdout
    gallery = CliRunner().invoke(cli, ["export", str(db), "--format", "html", "--out", str(tmp_path / "g"), "-q"])
    assert gallery.exit_code == 0 and len(list((tmp_path / "g" / "thumbs").rglob("*.jpg"))) == len(
        {row["sha256"] for row in rows})


def run_sat(*args, timeout=120, **kwargs):
    return subprocess.run([sys.executable, "-m", "sat_cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def test_special_files_are_failed_rows_never_opened(tmp_path, tiny_model):
    """A named pipe named like a photo used to block the run forever; sockets, devices, link loops
    and broken links are reported too, and the real photo is captioned."""
    folder = tmp_path / "special"
    folder.mkdir()
    shutil.copy(EXAMPLES / "rocket.jpg", folder / "real.jpg")
    os.mkfifo(folder / "pipe.jpg")
    os.symlink(folder / "pipe.jpg", folder / "link-to-pipe.png")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(folder / "sock.png"))
    os.symlink("/dev/zero", folder / "device.jpg")
    os.symlink(folder / "loop.jpg", folder / "loop.jpg")
    os.symlink(folder / "gone.png.target", folder / "gone.png")
    (folder / "folder.jpg").mkdir()  # a folder named like a photo: walked, not read
    db = tmp_path / "s.db"
    try:
        r = run_sat("caption", folder, "--db", db, "--model", tiny_model, "--workers", "1", timeout=120)
    finally:
        sock.close()
    assert r.returncode == 1, r.stderr
    rows = {Path(row["path"]).name: row for row in sqlite_utils.Database(db)["images"].rows}
    assert rows["real.jpg"]["status"] == "ok"
    reasons = {name: rows[name]["error"] for name in rows if name != "real.jpg"}
    assert "named pipe" in reasons["pipe.jpg"] and "named pipe" in reasons["link-to-pipe.png"]
    assert "socket" in reasons["sock.png"] and "character device" in reasons["device.jpg"]
    assert reasons["loop.jpg"] == "symbolic link loop" and reasons["gone.png"] == "broken symbolic link"
    assert set(reasons) == {"pipe.jpg", "link-to-pipe.png", "sock.png", "device.jpg", "loop.jpg", "gone.png"}


def test_unreadable_folders_and_files_are_reported_not_fatal(tiny_model):
    base = Path(tempfile.mkdtemp(prefix="sat-perm-"))
    try:
        os.chmod(base, 0o777)
        photos = base / "photos"
        (photos / "locked").mkdir(parents=True)
        shutil.copy(EXAMPLES / "rocket.jpg", photos / "ok.jpg")
        shutil.copy(EXAMPLES / "coffee.png", photos / "locked" / "hidden-inside.png")
        shutil.copy(EXAMPLES / "chelsea.png", photos / "secret.png")
        model = base / "model"
        shutil.copytree(tiny_model, model)
        for p in [base, photos, model, *model.iterdir()]:
            os.chmod(p, 0o777 if p.is_dir() else 0o644)
        os.chmod(photos / "locked", 0o000)
        os.chmod(photos / "secret.png", 0o000)
        env = {**os.environ, "HOME": str(base), "TORCH_HOME": str(base / "torch"), "HF_HOME": str(base / "hf")}
        cmd = [*as_nobody(), sys.executable, "-m", "sat_cli", "caption", str(photos), "--db", str(base / "p.db"),
               "--model", str(model), "--workers", "0"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
        assert r.returncode == 1, r.stderr
        rows = {row["path"]: row for row in sqlite_utils.Database(base / "p.db")["images"].rows}
        assert rows[str(photos / "ok.jpg")]["status"] == "ok"
        assert "cannot read this folder" in rows[str(photos / "locked")]["error"]
        assert "Permission denied" in rows[str(photos / "secret.png")]["error"]
    finally:
        for p in (base / "photos" / "locked", base / "photos" / "secret.png"):
            if p.exists():
                os.chmod(p, 0o755)
        shutil.rmtree(base, ignore_errors=True)


def test_a_stalled_read_times_out_and_the_run_goes_on(tiny_model, monkeypatch, tmp_path):
    """A read that never returns (a dead network mount) costs that file, not the run."""
    import sat_cli
    import sat_cli.inputs.images as images

    for name in ("a.jpg", "stuck.jpg", "b.jpg"):
        shutil.copy(EXAMPLES / "rocket.jpg", tmp_path / name)
    never = threading.Event()
    real = images._read_all

    def stalling(path):
        if path.endswith("stuck.jpg"):
            never.wait()  # blocks until the test ends
        return real(path)

    monkeypatch.setattr(images, "_read_all", stalling)
    cap = sat_cli.load(tiny_model, device="cpu")
    box = {}
    worker = threading.Thread(target=lambda: box.update(out=cap([tmp_path], read_timeout=5)), daemon=True)
    worker.start()
    worker.join(60)
    never.set()
    assert not worker.is_alive(), "the run hung on a stalled read"
    out = {Path(r.path).name: r for r in box["out"]}
    assert out["a.jpg"].ok and out["b.jpg"].ok
    assert "stalled" in out["stuck.jpg"].error


def test_files_that_change_after_discovery(tiny_model, monkeypatch, tmp_path):
    """Deleted, truncated, replaced by another photo, replaced by a named pipe, between the walk
    and the read: a failed row or the right caption, never a hang or a caption under a stale hash."""
    import hashlib

    import sat_cli
    import sat_cli.inputs.images as images

    folder = tmp_path / "changing"
    folder.mkdir()
    for name, src in (("deleted.jpg", "rocket.jpg"), ("truncated.jpg", "rocket.jpg"), ("replaced.png", "chelsea.png"),
                      ("piped.jpg", "rocket.jpg"), ("steady.png", "camera.png")):
        shutil.copy(EXAMPLES / src, folder / name)
    discover = images.discover

    def discover_then_change(*args, **kwargs):
        found = list(discover(*args, **kwargs))
        if not (folder / "deleted.jpg").exists():  # changed once already
            return iter(found)
        (folder / "deleted.jpg").unlink()
        data = (folder / "truncated.jpg").read_bytes()
        (folder / "truncated.jpg").write_bytes(data[: len(data) // 4])
        shutil.copy(EXAMPLES / "coffee.png", folder / "replaced.png")
        (folder / "piped.jpg").unlink()
        os.mkfifo(folder / "piped.jpg")
        return iter(found)

    monkeypatch.setattr(images, "discover", discover_then_change)
    cap = sat_cli.load(tiny_model, device="cpu")
    box = {}
    worker = threading.Thread(target=lambda: box.update(s=cap.to_db(tmp_path / "c.db", [folder], workers=0)),
                              daemon=True)
    worker.start()
    worker.join(120)
    assert not worker.is_alive(), "the run hung"
    db = sqlite_utils.Database(tmp_path / "c.db")
    rows = {Path(r["path"]).name: r for r in db["images"].rows}
    assert rows["deleted.jpg"]["status"] == "failed" and "No such file" in rows["deleted.jpg"]["error"]
    assert rows["truncated.jpg"]["status"] == "failed"
    assert rows["piped.jpg"]["status"] == "failed" and "not a regular file" in rows["piped.jpg"]["error"]
    coffee = hashlib.sha256((EXAMPLES / "coffee.png").read_bytes()).hexdigest()
    assert rows["replaced.png"]["sha256"] == coffee  # the content that was read, with its own caption
    expected = cap([EXAMPLES / "coffee.png"])[0].text
    stored = db.execute("SELECT text FROM captions JOIN results ON results.id = result_id WHERE sha256 = ? AND rank = 1",
                        [coffee]).fetchone()[0]
    assert stored == expected and rows["steady.png"]["status"] == "ok"
    assert box["s"].failed == 3
