"""`sat export`: csv, tsv, json, jsonl and COCO results from what is stored."""

import csv
import io
import json
import shutil

import numpy as np
import pytest
import sqlite_utils
from click.testing import CliRunner

from conftest import EXAMPLES
from sat_cli.cli.main import cli
from sat_cli.views.export import coco_number


@pytest.fixture
def filled_db(tmp_path, tiny_model):
    photos = tmp_path / "p"
    photos.mkdir()
    shutil.copy(EXAMPLES / "coffee.png", photos / "000000000042.png")
    shutil.copy(EXAMPLES / "chelsea.png", photos / "cat,with \"quotes\".png")
    (photos / "bad.jpg").write_bytes(b"nope")
    db = tmp_path / "out.db"
    r = CliRunner().invoke(cli, ["caption", str(photos), "--db", str(db), "--model", str(tiny_model),
                                 "--workers", "0", "--beam", "3", "-q"])
    assert r.exit_code == 1  # bad.jpg
    return db


def export(db, *args):
    r = CliRunner().invoke(cli, ["export", str(db), *args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r.stdout


def test_csv_and_tsv(filled_db):
    rows = list(csv.DictReader(io.StringIO(export(filled_db, "--format", "csv"))))
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 6 and sorted(r["rank"] for r in ok) == ["1", "1", "2", "2", "3", "3"]
    assert any(r["path"].endswith('cat,with "quotes".png') for r in ok)
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["path"].endswith("bad.jpg") and "not an image" in failed[0]["error"]
    db = sqlite_utils.Database(filled_db)
    stored = {(r["rank"], r["text"]) for r in db.query("select rank, text from captions")}
    assert {(int(r["rank"]), r["caption"]) for r in ok} == stored
    tsv = list(csv.DictReader(io.StringIO(export(filled_db, "--format", "tsv", "--best", "--no-failed")),
                              delimiter="\t"))
    assert len(tsv) == 2 and {r["rank"] for r in tsv} == {"1"}


def test_json_and_jsonl_group_captions_per_image(filled_db, tmp_path):
    data = json.loads(export(filled_db, "--format", "json"))
    assert len(data) == 3
    ok = [d for d in data if d["status"] == "ok"]
    assert all([c["rank"] for c in d["captions"]] == [1, 2, 3] for d in ok)
    assert all("attention" not in c for d in ok for c in d["captions"])
    lines = export(filled_db, "--format", "jsonl", "--best", "--attention").strip().split("\n")
    records = [json.loads(line) for line in lines]
    assert [len(r.get("captions", [])) for r in records if r["status"] == "ok"] == [1, 1]
    for r in records:
        for c in r.get("captions", []):
            assert c["attention"]["shape"] == [len(c["words"]), 2, 2]
            assert len(c["attention"]["maps"]) == len(c["words"])
            for m, peak, ent in zip(c["attention"]["maps"], c["attention"]["peak"], c["attention"]["entropy"]):
                p = np.asarray(m, dtype=np.float64).ravel()
                p = p / p.sum()
                assert peak == pytest.approx(max(map(max, m)), abs=1e-3)
                assert ent == pytest.approx(-(p[p > 0] * np.log(p[p > 0])).sum() / np.log(4), abs=2e-3)
    export(filled_db, "--format", "json", "-o", str(tmp_path / "x.json"))
    assert json.loads((tmp_path / "x.json").read_text()) == data


def test_coco_results(filled_db):
    data = json.loads(export(filled_db, "--format", "coco"))
    db = sqlite_utils.Database(filled_db)
    best = {r["text"] for r in db.query("select text from captions where rank = 1")}
    assert len(data) == 2 and {d["caption"] for d in data} == best
    # "cat,with ..." has no number: every image is named by its row id, and json says which is which
    rows = {r["path"]: r["id"] for r in db.query("select id, path from images")}
    records = json.loads(export(filled_db, "--format", "json"))
    assert {r["path"]: r["image_id"] for r in records} == rows
    assert {d["image_id"] for d in data} == {rows[r["path"]] for r in records if r["status"] == "ok"}


def caption_named(tmp_path, tiny_model, names):
    photos = tmp_path / "named"
    photos.mkdir(parents=True)
    for i, name in enumerate(names):
        shutil.copy(EXAMPLES / ("coffee.png", "chelsea.png", "rocket.jpg")[i % 3], photos / name)
    db = tmp_path / "named.db"
    r = CliRunner().invoke(cli, ["caption", str(photos), "--db", str(db), "--model", str(tiny_model),
                                 "--workers", "0", "--beam", "2", "-q"])
    assert r.exit_code == 0, r.output
    return db


def test_coco_ids_are_unique_and_recoverable(tmp_path, tiny_model):
    """Flickr8k names end in hex digits: 1002674143_1b742ab4b8 and 1007320043_627395c3d8 both
    ended in 8 and one photo was dropped (issue 20, item 2)."""
    flickr = caption_named(tmp_path / "f", tiny_model, ["1002674143_1b742ab4b8.jpg", "1007320043_627395c3d8.jpg",
                                                        "1012212859_01547e3f17.jpg"])
    data = json.loads(export(flickr, "--format", "coco"))
    assert len(data) == 3 and len({d["image_id"] for d in data}) == 3
    records = [json.loads(line) for line in export(flickr, "--format", "jsonl").splitlines()]
    by_id = {r["image_id"]: r["path"] for r in records}
    assert sorted(by_id) == sorted(d["image_id"] for d in data) and len(set(by_id.values())) == 3

    coco = caption_named(tmp_path / "c", tiny_model, ["COCO_val2014_000000000042.jpg", "000000000139.png",
                                                      "COCO_val2014_000000000007.jpg"])
    assert sorted(d["image_id"] for d in json.loads(export(coco, "--format", "coco"))) == [7, 42, 139]
    clash = caption_named(tmp_path / "d", tiny_model, ["COCO_val2014_000000000042.jpg", "COCO_train2014_42.jpg"])
    ids = [d["image_id"] for d in json.loads(export(clash, "--format", "coco"))]
    rows = [r["id"] for r in sqlite_utils.Database(clash).query("select id from images")]
    assert sorted(ids) == sorted(rows) and len(set(ids)) == 2  # two 42s: row ids for all


def test_run_filter_and_errors(filled_db, tiny_model, tmp_path):
    r = CliRunner().invoke(cli, ["caption", str(EXAMPLES / "rocket.jpg"), "--db", str(filled_db), "--model",
                                 str(tiny_model), "--workers", "0", "--beam", "2", "-q"])
    assert r.exit_code == 0
    run2 = json.loads(export(filled_db, "--format", "json", "--run", "2"))
    assert [d["path"].rsplit("/", 1)[1] for d in run2] == ["rocket.jpg"] and run2[0]["run"] == 2
    bad = CliRunner().invoke(cli, ["export", str(filled_db), "--format", "coco"])
    assert bad.exit_code == 2 and "--run" in bad.stderr
    assert CliRunner().invoke(cli, ["export", str(filled_db), "--run", "9"]).exit_code == 2
    att = CliRunner().invoke(cli, ["export", str(filled_db), "--format", "csv", "--attention"])
    assert att.exit_code == 2 and "json" in att.stderr
    missing = CliRunner().invoke(cli, ["export", str(tmp_path / "none.db")])
    assert missing.exit_code == 2 and "Database not found" in missing.stderr
    assert not (tmp_path / "none.db").exists()


def test_coco_number():
    assert coco_number("/x/COCO_val2014_000000000042.jpg") == 42
    assert coco_number("/x/000000000139.png") == 139
    assert coco_number("/x/photo.jpg") is None
    assert coco_number("/x/1002674143_1b742ab4b8.jpg") is None
