"""Rough edges a new user hit (issue 20, items 7-13)."""

import csv
import json
import shutil

import pytest
from click.testing import CliRunner

from conftest import EXAMPLES
from sat_cli.cli.main import cli


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def captioned(tmp_path_factory, tiny_model):
    tmp = tmp_path_factory.mktemp("rough")
    photos = tmp / "p"
    photos.mkdir()
    for name in ("chelsea.png", "coffee.png", "rocket.jpg", "astronaut.png"):
        shutil.copy(EXAMPLES / name, photos / name)
    db = tmp / "out.db"
    r = run("caption", photos, "--db", db, "--model", tiny_model, "--workers", "0", "-q")
    assert r.exit_code == 0, r.output
    return db


def test_eval_of_a_database_needs_only_the_reference_names(captioned, tmp_path):
    refs = tmp_path / "elsewhere" / "refs.csv"  # no photos beside it, no --images
    refs.parent.mkdir()
    with open(refs, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        for name in ("chelsea.png", "coffee.png", "rocket.jpg"):
            w.writerow([name, f"a photo of {name.split('.')[0]}"])
    r = run("eval", captioned, "--references", refs, "--no-meteor", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["images"] == 3


def test_under_torchrun_only_the_writer_reports(photos, tmp_path, tiny_model):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "sat_cli", "caption", str(photos), "--db", str(tmp_path / "t.db"), "--model",
                           str(tiny_model), "--workers", "0"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if " captioned, " in line]
    assert len(lines) == 1 and "4 captioned" in lines[0], proc.stderr


def test_show_takes_short_hash_prefixes_and_refuses_ambiguous_arguments(captioned, tmp_path):
    import sqlite_utils

    rows = {r["id"]: r for r in sqlite_utils.Database(captioned)["images"].rows}
    sha = rows[1]["sha256"]
    out = tmp_path / "x.png"
    r = run("show", captioned, sha[:4], "--out", out)  # 4 hex digits are enough (6 were needed)
    assert r.exit_code == 0 and out.exists(), r.output
    assert run("show", captioned, f"sha:{sha[:4]}", "--out", out).exit_code == 0
    assert run("show", captioned, "id:2", "--out", out).exit_code == 0
    assert run("show", captioned, "sha:zz", "--out", out).exit_code == 2
    # 1234 as a row id of one image and the hash prefix of another: both are listed
    copy = tmp_path / "copy.db"
    shutil.copy(captioned, copy)
    db = sqlite_utils.Database(copy)
    db.execute("UPDATE images SET id = 1234 WHERE id = 2")
    db.execute("UPDATE images SET sha256 = '1234' || substr(sha256, 5) WHERE id = 3")
    db.conn.commit()
    clash = run("show", copy, "1234", "--out", out)
    assert clash.exit_code == 2 and "matches 2 images" in clash.output
    assert "id:1234" in clash.output and "sha:1234" in clash.output
    help_text = run("show", "--help").output
    assert "id:N" in help_text and "4+ hex" in help_text


def test_tables_stay_readable_at_80_columns():
    import io

    from rich.console import Console

    from sat_cli.model.encoders import families
    from sat_cli.evaluation.metrics import METRICS, metrics_table

    env_out = CliRunner(env={"COLUMNS": "80"}).invoke(cli, ["encoders"])
    assert env_out.exit_code == 0
    text = env_out.output
    for f in families().values():  # every plugin name and example whole, no "…"
        assert f.plugin in text and all(e in text for e in f.examples)
    assert "…" not in text and max(map(len, text.splitlines())) <= 80
    rows = [{"epoch": e, "train_loss": 3.14159, "val_loss": 2.71828, "lr": 0.0004, "seconds": 123.4,
             **{m: 12.3456 for m in METRICS}} for e in range(1, 4)]
    buf = io.StringIO()
    Console(file=buf, width=80).print(metrics_table(rows, title="runs/x/metrics.jsonl", width=80))
    out = buf.getvalue()
    assert "…" not in out and max(map(len, out.splitlines())) <= 80
    for header in ("epoch", "train_loss", "val_loss", "BLEU-4", "CIDEr", "3.14", "12.35"):
        assert header in out, out


@pytest.mark.parametrize("spec", ["timm:efficientnet_b3", "torchvision:resnet50"])
def test_offline_without_cached_weights_fails_at_once(spec, tmp_path, monkeypatch):
    """No hub retries for most of a minute: no route to the host and nothing cached is a clear
    error before any download is tried."""
    import socket

    import timm
    import torch

    from sat_cli.model.encoders import EncoderOptions, create_encoder
    from sat_cli.errors import WeightsError

    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch"))

    def no_route(*args, **kwargs):
        raise OSError(101, "Network is unreachable")

    class DownloadTried(BaseException):  # not caught as a load error on the way out
        pass

    def no_download(*args, **kwargs):
        raise DownloadTried

    monkeypatch.setattr(socket, "create_connection", no_route)
    monkeypatch.setattr(timm, "create_model", lambda name, pretrained=False, **kw: no_download() if pretrained
                        else real_create(name, pretrained=False, **kw))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    with pytest.raises(WeightsError, match="--encoder-weights"):
        create_encoder(spec, EncoderOptions(pretrained=True))


real_create = __import__("timm").create_model


def test_a_text_file_named_like_a_photo_never_reaches_libraw(tmp_path, monkeypatch):
    """rawpy warned about fork deadlocks in the workers for a text file named fake.jpg."""
    import rawpy
    from PIL import UnidentifiedImageError

    from sat_cli.inputs.formats import looks_like_raw, open_photo

    def no_libraw(*args, **kwargs):
        raise AssertionError("LibRaw was asked to read a text file")

    monkeypatch.setattr(rawpy, "imread", no_libraw)
    for data in (b"hello\n", b"", b"<html>not a photo</html>", bytes(range(256))):
        with pytest.raises(UnidentifiedImageError):
            open_photo(__import__("io").BytesIO(data))
    assert looks_like_raw(b"FUJIFILMCCD-RAW 0201") and looks_like_raw(b"\x00\x00\x00\x18ftypcrx ")
    assert looks_like_raw(b"IIU\x00\x18\x00") and not looks_like_raw(b"hello")


def test_ctrl_c_while_the_model_loads_exits_130_without_a_traceback(monkeypatch, tmp_path):
    import sat_cli.api

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sat_cli.api, "load", interrupted)
    r = CliRunner().invoke(cli, ["caption", str(EXAMPLES / "rocket.jpg"), "--db", str(tmp_path / "x.db")])
    assert r.exit_code == 130 and "Interrupted" in r.output and "Traceback" not in r.output


def test_decoding_workers_leave_ctrl_c_to_the_main_process_and_die_quietly():
    """A worker ignores SIGINT and never prints what its threads raise once the main process goes
    (multiprocessing/resource_sharer.py printed a cut-off traceback, 1 run in 6)."""
    import subprocess
    import sys

    code = """
import os, signal, threading, time
from sat_cli.runtime import quiet_worker
quiet_worker(0)
assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
os.kill(os.getpid(), signal.SIGINT)  # ignored
def sharer():
    raise ConnectionRefusedError(111, "Connection refused")  # the main process is gone
t = threading.Thread(target=sharer); t.start(); t.join()
print("alive")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "alive" and "Traceback" not in out.stderr, out.stderr
    from sat_cli import pipeline
    import inspect

    assert "worker_init_fn=quiet_worker" in inspect.getsource(pipeline.load_batches)
