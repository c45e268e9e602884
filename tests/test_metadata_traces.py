"""`sat metadata` leaves no wrong trace (issue 20, items 3-5): photos that are away keep their
write records; sat's XMP names cannot be taken for camera fields; --remove takes back the IPTC
record sat created."""

import json
import shutil
import subprocess

import pytest
import sqlite_utils
from click.testing import CliRunner

from conftest import EXAMPLES
from sat_cli.cli.main import cli
from sat_cli.metadata.xmp import EXIFTOOL_CONFIG

pytestmark = pytest.mark.skipif(not shutil.which("exiftool"), reason="exiftool is not installed")


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def caption(folder, db, model, *extra):
    r = run("caption", folder, "--db", db, "--model", model, "--workers", "0", "-q", *extra)
    assert r.exit_code == 0, r.output
    return r


def exiftool(*args, config=None):
    cfg = ["-config", str(config)] if config else []
    out = subprocess.run(["exiftool", *cfg, "-j", "-G1", "-a", *map(str, args)], capture_output=True,
                         text=True).stdout
    return json.loads(out)[0]


@pytest.mark.parametrize("kind", ["--sidecar", "--embed"])
def test_remove_while_the_photos_are_away_keeps_the_records(photos, tmp_path, tiny_model, kind):
    db = tmp_path / "pics.db"
    caption(photos, db, tiny_model)
    assert run("metadata", db, kind).exit_code == 0
    away = tmp_path / "away"
    shutil.move(photos, away)
    r = run("metadata", db, "--remove")
    assert r.exit_code == 1 and "4 missing" in r.stderr and "record" in r.stderr
    rows = list(sqlite_utils.Database(db)["metadata_writes"].rows)
    assert len(rows) == 4 and {row["status"] for row in rows} == {"written"}
    shutil.move(away, photos)  # back: --remove takes back what sat wrote
    r = run("metadata", db, "--remove")
    assert r.exit_code == 0 and "4 taken back" in r.stderr, r.stderr
    assert not list(photos.rglob("*.xmp"))
    assert {row["status"] for row in sqlite_utils.Database(db)["metadata_writes"].rows} == {"removed"}


def test_a_sidecar_deleted_beside_its_photo_is_gone_not_missing(photos, tmp_path, tiny_model):
    db = tmp_path / "pics.db"
    caption(photos, db, tiny_model, "--xmp")
    (photos / "rocket.jpg.xmp").unlink()
    r = run("metadata", db, "--remove")
    assert r.exit_code == 0 and "1 gone" in r.stderr and "3 taken back" in r.stderr


def test_sats_fields_are_not_taken_for_camera_fields(photos, tmp_path, tiny_model):
    db = tmp_path / "pics.db"
    caption(photos, db, tiny_model, "--xmp")
    assert run("metadata", db, "--embed").exit_code == 0
    for name in ("rocket.jpg.xmp", "coffee.png", "rocket.jpg"):  # exiftool without sat's config
        plain = exiftool("-Model", "-Date", "-Version", "-Score", "-Settings", photos / name)
        assert set(plain) == {"SourceFile"}, (name, plain)
    assert "satModel" in (photos / "rocket.jpg.xmp").read_text()


def test_fields_written_under_the_old_names_are_read_and_removed(photos, tmp_path, tiny_model):
    """sat 0.x wrote sat:description, sat:model, ...: still its own text, and --remove clears them."""
    db = tmp_path / "pics.db"
    caption(photos, db, tiny_model)
    assert run("metadata", db, "--embed", "--dry-run").exit_code == 0
    text = sqlite_utils.Database(db).execute("SELECT text FROM captions WHERE rank = 1").fetchone()[0]
    old = (f'<?xml version="1.0" encoding="UTF-8"?>\n<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
           f'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description rdf:about="" '
           f'xmlns:dc="http://purl.org/dc/elements/1.1/" xmlns:sat="urn:sat-cli:xmp:1.0/">'
           f'<dc:description><rdf:Alt><rdf:li xml:lang="x-default">{text}</rdf:li></rdf:Alt></dc:description>'
           f'<sat:description>{text}</sat:description><sat:model>abc</sat:model><sat:date>2024</sat:date>'
           f'</rdf:Description></rdf:RDF></x:xmpmeta>\n')
    for p in [p for p in photos.rglob("*.*") if not p.name.startswith(".")]:
        (p.parent / (p.name + ".xmp")).write_text(old)
    r = run("metadata", db, "--sidecar")  # its own old text: updated, not skipped as a person's
    assert r.exit_code == 0 and "skipped" not in r.stderr and "4 updated" in r.stderr, r.stderr
    config = tmp_path / "sat.config"
    config.write_text(EXIFTOOL_CONFIG)
    f = exiftool("-XMP-sat:all", photos / "rocket.jpg.xmp", config=config)
    assert "XMP-sat:SatModel" in f and not any("Old" in k for k in f), f  # old names replaced
    (photos / "chelsea.png.xmp").write_text(old)  # and when only old names are there, --remove clears them
    sqlite_utils.Database(db).execute("UPDATE metadata_writes SET caption = ?", [text])
    assert run("metadata", db, "--remove").exit_code == 0
    assert "sat" not in json.dumps(exiftool("-XMP-sat:all", photos / "chelsea.png.xmp", config=config)).replace(
        "SourceFile", "")


def test_remove_after_embed_leaves_no_iptc_record_sat_created(tmp_path, tiny_model):
    folder = tmp_path / "p"
    folder.mkdir()
    shutil.copy(EXAMPLES / "rocket.jpg", folder / "plain.jpg")  # no IPTC
    shutil.copy(EXAMPLES / "rocket.jpg", folder / "tagged.jpg")
    subprocess.run(["exiftool", "-q", "-overwrite_original", "-IPTC:Keywords=launch", str(folder / "tagged.jpg")],
                   check=True)
    before = {n: exiftool("-IPTC:all", folder / n) for n in ("plain.jpg", "tagged.jpg")}
    db = tmp_path / "pics.db"
    caption(folder, db, tiny_model)
    assert run("metadata", db, "--embed").exit_code == 0
    assert "IPTC:CodedCharacterSet" in exiftool("-IPTC:all", folder / "plain.jpg")
    assert run("metadata", db, "--remove").exit_code == 0
    assert exiftool("-IPTC:all", folder / "plain.jpg") == before["plain.jpg"] == {"SourceFile": str(folder / "plain.jpg")}
    tagged = exiftool("-IPTC:all", folder / "tagged.jpg")  # a record that was there stays, sat's part gone
    assert tagged["IPTC:Keywords"] == "launch" and "IPTC:Caption-Abstract" not in tagged
