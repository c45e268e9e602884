"""Rough edges a new user hit (issue 20, items 7-13)."""

import csv
import json
import shutil

import pytest
from click.testing import CliRunner

from conftest import EXAMPLES
from sat_cli.cli import cli


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
