"""`sat merge`: databases captioned on separate machines become one, deduplicated by the usual
key, runs kept with their provenance, idempotent."""

import json
import shutil

import sqlite_utils
from click.testing import CliRunner

from conftest import EXAMPLES, build_tiny_model
from sat_cli.cli import cli


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_merge_deduplicates_keeps_provenance_and_is_idempotent(tmp_path, tiny_model):
    a_photos, b_photos = tmp_path / "a", tmp_path / "b"
    a_photos.mkdir()
    b_photos.mkdir()
    for name in ("chelsea.png", "coffee.png", "rocket.jpg"):
        shutil.copy(EXAMPLES / name, a_photos / name)
    for name in ("rocket.jpg", "camera.png"):  # rocket.jpg: the same content on both machines
        shutil.copy(EXAMPLES / name, b_photos / name)
    other = build_tiny_model(tmp_path / "other", seed=5)
    assert run("caption", a_photos, "--db", tmp_path / "a.db", "--model", tiny_model, "--workers", "0", "-q").exit_code == 0
    assert run("caption", b_photos, "--db", tmp_path / "b.db", "--model", tiny_model, "--workers", "0", "-q").exit_code == 0
    assert run("caption", b_photos, "--db", tmp_path / "b.db", "--model", other, "--workers", "0", "-q").exit_code == 0
    r = run("merge", tmp_path / "a.db", tmp_path / "b.db", "--into", tmp_path / "all.db")
    assert r.exit_code == 0, r.output
    db = sqlite_utils.Database(tmp_path / "all.db")
    # a: 3 results; b: 2 with the tiny model (rocket's is a duplicate) + 2 with the other model
    assert db["results"].count == 3 + 1 + 2 and db["images"].count == 5
    assert db["runs"].count == 3
    provenance = [json.loads(row["merged_from"]) for row in db["runs"].rows]
    assert sorted(p["database"].rsplit("/", 1)[1] for p in provenance) == ["a.db", "b.db", "b.db"]
    assert db["captions"].count == sum(sqlite_utils.Database(tmp_path / n)["captions"].count for n in ("a.db", "b.db")) \
        - sqlite_utils.Database(tmp_path / "b.db").execute(
            "SELECT COUNT(*) FROM captions JOIN results ON results.id = result_id JOIN runs ON runs.id = results.run_id "
            "WHERE runs.id = 1 AND sha256 IN (SELECT sha256 FROM images WHERE path LIKE '%rocket.jpg')").fetchone()[0]
    assert db["attention_maps"].count == db["captions"].count
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    word = next(db["captions"].rows)["text"].split()[0]
    assert json.loads(run("search", tmp_path / "all.db", word, "--json").stdout)  # full-text index follows
    exported = run("export", tmp_path / "all.db", "--format", "jsonl", "--attention")
    # one object per image path and result: chelsea, coffee (1 each); both rocket.jpg paths and camera
    # with both models (2 each)
    assert exported.exit_code == 0 and len(exported.stdout.splitlines()) == 1 + 1 + 2 + 2 + 2
    before = {t: db[t].count for t in ("runs", "results", "captions", "attention_maps", "images")}
    again = run("merge", tmp_path / "a.db", tmp_path / "b.db", "--into", tmp_path / "all.db")
    assert again.exit_code == 0 and "0 runs, 0 results added" in again.stderr
    assert {t: db[t].count for t in before} == before
    refuse = CliRunner().invoke(cli, ["merge", str(tmp_path / "all.db"), "--into", str(tmp_path / "all.db")])
    assert refuse.exit_code == 2 and "both a source and the target" in refuse.stderr
    missing = CliRunner().invoke(cli, ["merge", str(tmp_path / "nope.db"), "--into", str(tmp_path / "x.db")])
    assert missing.exit_code == 2 and "not found" in missing.stderr
