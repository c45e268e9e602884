"""Every command that writes a file replaces it only on success: a failed or interrupted command
leaves the file it was told to write as it was, and no temporary file behind (issue 20, item 1)."""

import json
import os
import shutil
import threading

import pytest
from click.testing import CliRunner

from conftest import EXAMPLES, build_tiny_model
from sat_cli import atomic
from sat_cli.cli.main import cli

PRECIOUS = "precious, not sat's\n"


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_model):
    """A database with two runs (COCO export needs one), photos named like Flickr8k's."""
    tmp = tmp_path_factory.mktemp("atomic")
    photos = tmp / "p"
    photos.mkdir()
    shutil.copy(EXAMPLES / "coffee.png", photos / "1002674143_1b742ab4b8.png")
    shutil.copy(EXAMPLES / "chelsea.png", photos / "1007320043_627395c3d8.png")
    db = tmp / "out.db"
    for beam in ("2", "3"):
        r = CliRunner().invoke(cli, ["caption", str(photos), "--db", str(db), "--model", str(tiny_model),
                                     "--workers", "0", "--beam", beam, "-q"])
        assert r.exit_code == 0, r.output
    return db


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if ".sat-" in p.name)


@pytest.mark.parametrize("fmt", ["csv", "tsv", "json", "jsonl", "coco"])
def test_a_failed_export_keeps_the_file_it_was_told_to_write(two_runs, tmp_path, fmt):
    keep = tmp_path / f"keep.{fmt}"
    keep.write_text(PRECIOUS)
    r = invoke("export", two_runs, "--format", fmt, "--run", 99, "-o", keep)
    assert r.exit_code == 2 and "No run 99" in r.output
    assert keep.read_text() == PRECIOUS and not leftovers(tmp_path)
    if fmt == "coco":  # several runs and no --run: refused, the file kept
        r = invoke("export", two_runs, "--format", "coco", "-o", keep)
        assert r.exit_code == 2 and keep.read_text() == PRECIOUS and not leftovers(tmp_path)


def test_an_export_that_dies_mid_way_keeps_the_old_file(two_runs, tmp_path, monkeypatch):
    from sat_cli.views import export as export_module

    real = export_module.export

    def dies(*args, **kwargs):
        chunks = real(*args, **kwargs)
        yield next(chunks)
        raise KeyboardInterrupt  # Ctrl-C between two chunks

    keep = tmp_path / "keep.csv"
    keep.write_text(PRECIOUS)
    monkeypatch.setattr(export_module, "export", dies)
    assert invoke("export", two_runs, "-o", keep).exit_code != 0  # click: "Aborted!"
    assert keep.read_text() == PRECIOUS and not leftovers(tmp_path)
    monkeypatch.setattr(export_module, "export", real)
    assert invoke("export", two_runs, "--run", 1, "-o", keep).exit_code == 0
    assert keep.read_text().startswith("path,sha256")


def test_a_symlink_target_is_replaced_through_the_link(two_runs, tmp_path):
    real = tmp_path / "real.csv"
    real.write_text(PRECIOUS)
    os.chmod(real, 0o640)
    link = tmp_path / "link.csv"
    link.symlink_to(real)
    assert invoke("export", two_runs, "--run", 1, "-o", link).exit_code == 0
    assert link.is_symlink() and real.read_text().startswith("path,sha256")
    assert oct(real.stat().st_mode & 0o777) == oct(0o640)  # the replaced file keeps its permissions


def test_stdout_and_fifos_are_written_directly(two_runs, tmp_path):
    r = invoke("export", two_runs, "--run", 1, "--format", "jsonl", "-o", "-")
    assert r.exit_code == 0 and len(r.stdout.splitlines()) == 2
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(open(fifo).read()))
    reader.start()
    r = invoke("export", two_runs, "--run", 1, "--format", "jsonl", "-o", fifo)
    reader.join(10)
    assert r.exit_code == 0 and len(got[0].splitlines()) == 2 and not leftovers(tmp_path)
    assert atomic.is_stream("-") and atomic.is_stream("/dev/stdout") and atomic.is_stream(fifo)


def test_a_failed_gallery_keeps_the_old_one_and_other_files(two_runs, tmp_path, monkeypatch):
    from sat_cli.views import gallery

    out = tmp_path / "gallery"
    assert invoke("export", two_runs, "--format", "html", "-o", out, "-q").exit_code == 0
    (out / "notes.txt").write_text(PRECIOUS)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert invoke("export", two_runs, "--format", "html", "--run", 99, "-o", out, "-q").exit_code == 2

    def dies(db, out, *args):
        (out / "index.html").write_text("half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gallery, "_build", dies)
    r = invoke("export", two_runs, "--format", "html", "-o", out, "-q")
    assert r.exit_code != 0
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before and not leftovers(tmp_path)
    monkeypatch.undo()
    assert invoke("export", two_runs, "--format", "html", "--run", 1, "-o", out, "-q").exit_code == 0
    assert (out / "notes.txt").read_text() == PRECIOUS and not leftovers(tmp_path) and not leftovers(out)
    assert "pages" in (out / "data" / "manifest.js").read_text()


def test_show_keeps_the_old_png_when_drawing_fails(two_runs, tmp_path, monkeypatch):
    png = tmp_path / "fig.png"
    png.write_text(PRECIOUS)
    r = invoke("show", two_runs, "1002674143_1b742ab4b8.png", "--rank", 9, "--out", png)
    assert r.exit_code == 2 and png.read_text() == PRECIOUS
    import matplotlib.figure

    def dies(self, f, **kwargs):
        if isinstance(f, (str, os.PathLike)):
            f = open(f, "wb")
        f.write(b"\x89PNG half")
        f.flush()
        raise MemoryError

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", dies)
    r = invoke("show", two_runs, "1002674143_1b742ab4b8.png", "--out", png)
    assert r.exit_code != 0 and png.read_text() == PRECIOUS and not leftovers(tmp_path)
    monkeypatch.undo()
    assert invoke("show", two_runs, "1002674143_1b742ab4b8.png", "--out", png).exit_code == 0
    assert png.read_bytes().startswith(b"\x89PNG")


def checkpoint_files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_average_and_import_keep_the_old_checkpoint_on_failure(tmp_path, monkeypatch):
    a, b = build_tiny_model(tmp_path / "a", seed=0), build_tiny_model(tmp_path / "b", seed=1)
    out = tmp_path / "avg"
    assert invoke("average", a, b, "--out", out).exit_code == 0
    before = checkpoint_files(out)
    import safetensors.torch

    real = safetensors.torch.save_file

    def dies(tensors, path, metadata=None):
        real(tensors, path, metadata=metadata)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", dies)
    assert invoke("average", a, b, "--out", out, "--half").exit_code != 0
    assert checkpoint_files(out) == before and not leftovers(tmp_path)
    assert invoke("average", a, b, "--out", tmp_path / "new").exit_code != 0
    assert not (tmp_path / "new").exists() and not leftovers(tmp_path)
    monkeypatch.undo()

    (tmp_path / "wm.json").write_text(json.dumps({"a": 1, "<unk>": 2, "<start>": 3, "<end>": 4, "<pad>": 0}))
    (tmp_path / "ck.pth.tar").write_bytes(b"not a checkpoint")
    r = invoke("import", "sgrvinod", tmp_path / "ck.pth.tar", "--word-map", tmp_path / "wm.json", "--out", out)
    assert r.exit_code == 2 and checkpoint_files(out) == before and not leftovers(tmp_path)

    assert invoke("average", a, b, "--out", out, "--half").exit_code == 0  # success replaces both files
    after = checkpoint_files(out)
    assert set(after) == set(before) and after["model.safetensors"] != before["model.safetensors"]


def test_atomic_open_removes_its_temporary_file_on_any_exception(tmp_path):
    target = tmp_path / "t.txt"
    target.write_text(PRECIOUS)
    with pytest.raises(ZeroDivisionError):
        with atomic.atomic_open(target, "w") as f:
            f.write("new")
            1 / 0
    assert target.read_text() == PRECIOUS and not leftovers(tmp_path)
    atomic.write_text(target, "new")
    assert target.read_text() == "new" and not leftovers(tmp_path)
