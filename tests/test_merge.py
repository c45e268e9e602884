"""`sat merge`: databases captioned on separate machines become one, deduplicated by the usual
key, runs kept with their provenance, idempotent."""

import json
import shutil

import sqlite_utils
from click.testing import CliRunner

from conftest import EXAMPLES, build_tiny_model
from sat_cli.cli.main import cli


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
    # the full-text index follows the merge: exactly the merged captions holding the word, each once
    found = json.loads(run("search", tmp_path / "all.db", word, "--json", "--limit", "1000").stdout)
    want = db.execute("SELECT images.path, captions.rank, captions.text FROM captions JOIN results ON results.id = "
                      "captions.result_id JOIN images USING (sha256)").fetchall()
    want = sorted((p, r, t) for p, r, t in want if word in t.split())
    assert sorted((row["path"], row["rank"], row["caption"]) for row in found) == want
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


def test_sources_with_uri_characters_in_their_names_are_only_read(tmp_path, tiny_model):
    """A source named like an SQLite URI (``#``, ``?``, ``%``) is opened by its whole name, read
    only: nothing named after the part before ``#`` is created."""
    photos = tmp_path / "p"
    photos.mkdir()
    shutil.copy(EXAMPLES / "rocket.jpg", photos / "rocket.jpg")
    odd = tmp_path / "a#b?c%41.db"
    assert run("caption", photos, "--db", odd, "--model", tiny_model, "--workers", "0", "-q").exit_code == 0
    before = sorted(p.name for p in tmp_path.iterdir())
    r = run("merge", odd, "--into", tmp_path / "all.db")
    assert r.exit_code == 0, r.output
    new = {p.name for p in tmp_path.iterdir()} - set(before)
    assert {n for n in new if not n.endswith(("-wal", "-shm"))} == {"all.db"}  # SQLite's own WAL files aside
    assert not (tmp_path / "a").exists()
    assert sqlite_utils.Database(tmp_path / "all.db")["results"].count == 1


def test_a_run_merged_while_it_was_going_gets_its_final_outcome(tmp_path, tiny_model):
    photos = tmp_path / "p"
    photos.mkdir()
    for name in ("rocket.jpg", "coffee.png"):
        shutil.copy(EXAMPLES / name, photos / name)
    src = tmp_path / "a.db"
    assert run("caption", photos, "--db", src, "--model", tiny_model, "--workers", "0", "-q").exit_code == 0
    source = sqlite_utils.Database(src)
    final = source["runs"].get(1)
    source["runs"].update(1, {"status": "running", "finished_at": None, "captioned": 1})  # as seen mid-run
    assert run("merge", src, "--into", tmp_path / "all.db").exit_code == 0
    target = sqlite_utils.Database(tmp_path / "all.db")
    assert target["runs"].get(1)["status"] == "running"
    source["runs"].update(1, {k: final[k] for k in ("status", "finished_at", "captioned")})  # it finished
    assert run("merge", src, "--into", tmp_path / "all.db").exit_code == 0
    merged = target["runs"].get(1)
    assert (merged["status"], merged["finished_at"], merged["captioned"]) == ("done", final["finished_at"], 2)
    assert target["runs"].count == 1
