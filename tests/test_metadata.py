"""`sat caption --xmp` and `sat metadata`: captions written where photo managers read them, checked
by reading every field back with exiftool (and darktable-cli and exiv2, digiKam's metadata
library, where installed); people's descriptions and other programs' fields survive."""

import json
import os
import shutil
import struct
import subprocess
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import sqlite_utils
from click.testing import CliRunner
from PIL import Image

from conftest import EXAMPLES, build_tiny_model
from rawfiles import make_dng
from sat_cli import __version__
from sat_cli.cli.main import cli
from sat_cli.metadata import files as metadata_files
from sat_cli.metadata.apply import MetadataOptions, write_metadata
from sat_cli.metadata.xmp import EXIFTOOL_CONFIG

pytestmark = pytest.mark.skipif(not shutil.which("exiftool"), reason="exiftool is not installed "
                                "(apt install libimage-exiftool-perl; .ci/run installs it)")

DARKTABLE_XMP = """<?xml version="1.0" encoding="UTF-8"?>
<x:xmpmeta xmlns:x="adobe:ns:meta/" x:xmptk="XMP Core 4.4.0-Exiv2">
 <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <rdf:Description rdf:about=""
    xmlns:exif="http://ns.adobe.com/exif/1.0/"
    xmlns:xmp="http://ns.adobe.com/xap/1.0/"
    xmlns:xmpMM="http://ns.adobe.com/xap/1.0/mm/"
    xmlns:dc="http://purl.org/dc/elements/1.1/"
    xmlns:lr="http://ns.adobe.com/lightroom/1.0/"
    xmlns:darktable="http://darktable.sf.net/"
   exif:DateTimeOriginal="2021:06:05 14:03:11.000"
   xmp:Rating="4"
   xmpMM:DerivedFrom="rocket.jpg"
   darktable:import_timestamp="63790123456789012"
   darktable:change_timestamp="63790123456789999"
   darktable:export_timestamp="-1"
   darktable:print_timestamp="-1"
   darktable:xmp_version="5"
   darktable:raw_params="0"
   darktable:auto_presets_applied="1"
   darktable:history_end="2"
   darktable:iop_order_version="4">
   <darktable:colorlabels>
    <rdf:Seq>
     <rdf:li>0</rdf:li>
     <rdf:li>3</rdf:li>
    </rdf:Seq>
   </darktable:colorlabels>
   <dc:subject>
    <rdf:Bag>
     <rdf:li>launch</rdf:li>
     <rdf:li>rocket</rdf:li>
    </rdf:Bag>
   </dc:subject>
   <lr:hierarchicalSubject>
    <rdf:Bag>
     <rdf:li>places|Cape Canaveral</rdf:li>
     <rdf:li>rocket</rdf:li>
    </rdf:Bag>
   </lr:hierarchicalSubject>
   <darktable:history>
    <rdf:Seq>
     <rdf:li
      darktable:num="0"
      darktable:operation="exposure"
      darktable:enabled="1"
      darktable:modversion="6"
      darktable:params="0000000000000000cdcc4c3e00000000000000000000803f"
      darktable:multi_name=""
      darktable:multi_priority="0"
      darktable:blendop_version="11"
      darktable:blendop_params="gz11eJxjYIAACQYYOOHEgAZY0QVwggZ7CB6pfNoAAGjnBnA="/>
     <rdf:li
      darktable:num="1"
      darktable:operation="colorbalancergb"
      darktable:enabled="1"
      darktable:modversion="5"
      darktable:params="gz09eJxjYGiwZ2BgYGBgYGJQMFJgoBgAAEkOAQM="
      darktable:multi_name="_builtin_basic colorfulness"
      darktable:multi_priority="0"
      darktable:blendop_version="11"
      darktable:blendop_params="gz11eJxjYIAACQYYOOHEgAZY0QVwggZ7CB6pfNoAAGjnBnA="/>
    </rdf:Seq>
   </darktable:history>
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>
"""

DIGIKAM_XMP = """<?xml version="1.0" encoding="UTF-8"?>
<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>
<x:xmpmeta xmlns:x="adobe:ns:meta/" x:xmptk="XMP Core 4.4.0-Exiv2">
 <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <rdf:Description rdf:about=""
    xmlns:xmp="http://ns.adobe.com/xap/1.0/"
    xmlns:digiKam="http://www.digikam.org/ns/1.0/"
    xmlns:MicrosoftPhoto="http://ns.microsoft.com/photo/1.0/"
    xmlns:lr="http://ns.adobe.com/lightroom/1.0/"
    xmlns:dc="http://purl.org/dc/elements/1.1/"
    xmlns:mwg-rs="http://www.metadataworkinggroup.com/schemas/regions/"
    xmlns:stArea="http://ns.adobe.com/xmp/sType/Area#"
    xmlns:stDim="http://ns.adobe.com/xap/1.0/sType/Dimensions#"
   xmp:Rating="5"
   xmp:Label="Red"
   digiKam:ColorLabel="1"
   digiKam:PickLabel="3"
   MicrosoftPhoto:Rating="99">
   <digiKam:TagsList>
    <rdf:Seq>
     <rdf:li>People/Grandma</rdf:li>
     <rdf:li>Places/Florida</rdf:li>
    </rdf:Seq>
   </digiKam:TagsList>
   <lr:hierarchicalSubject>
    <rdf:Bag>
     <rdf:li>People|Grandma</rdf:li>
     <rdf:li>Places|Florida</rdf:li>
    </rdf:Bag>
   </lr:hierarchicalSubject>
   <dc:subject>
    <rdf:Bag>
     <rdf:li>Grandma</rdf:li>
     <rdf:li>Florida</rdf:li>
    </rdf:Bag>
   </dc:subject>
   <mwg-rs:Regions rdf:parseType="Resource">
    <mwg-rs:AppliedToDimensions stDim:w="640" stDim:h="427" stDim:unit="pixel"/>
    <mwg-rs:RegionList>
     <rdf:Bag>
      <rdf:li>
       <rdf:Description mwg-rs:Name="Grandma" mwg-rs:Type="Face">
        <mwg-rs:Area stArea:x="0.51" stArea:y="0.42" stArea:w="0.12" stArea:h="0.18" stArea:unit="normalized"/>
       </rdf:Description>
      </rdf:li>
     </rdf:Bag>
    </mwg-rs:RegionList>
   </mwg-rs:Regions>
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>
<?xpacket end="w"?>
"""

SAT_ADDED = {"XMP-dc:Description", "XMP-tiff:ImageDescription", "XMP-x:XMPToolkit"}


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def caption(folder, db, model, *extra):
    return run("caption", folder, "--db", db, "--model", model, "--workers", "0", "-q", *extra)


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    path = tmp_path_factory.mktemp("exiftool") / "sat.config"
    path.write_text(EXIFTOOL_CONFIG)
    return path


def read(config, *paths, tags=("-XMP:all", "-EXIF:ImageDescription", "-IPTC:all")) -> dict:
    """exiftool -j -G1 -a -struct of each file, by file name (what Immich and PhotoPrism run)."""
    out = subprocess.run(["exiftool", "-config", str(config), "-j", "-G1", "-a", "-struct", *tags,
                          *map(str, paths)], capture_output=True, text=True).stdout
    return {os.path.basename(r.pop("SourceFile")): r for r in json.loads(out)}


def best_captions(db_path) -> dict:
    db = sqlite_utils.Database(db_path)
    rows = db.query("""SELECT images.path, captions.text, captions.score, results.model_fingerprint FROM images
                       JOIN results ON results.sha256 = images.sha256
                       JOIN captions ON captions.result_id = results.id AND captions.rank = 1 ORDER BY results.id""")
    return {os.path.basename(r["path"]): r for r in rows}  # the newest result last wins


def snapshot(folder) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def others(fields: dict) -> dict:
    return {k: v for k, v in fields.items() if k not in SAT_ADDED and not k.startswith("XMP-sat:")}


def test_caption_xmp_writes_sidecars_that_readers_see(photos, tmp_path, tiny_model, config):
    db = tmp_path / "pics.db"
    result = caption(photos, db, tiny_model, "--xmp")
    assert result.exit_code == 0, result.output
    best = best_captions(db)
    sidecars = sorted(p.name for p in photos.rglob("*.xmp"))
    assert sidecars == ["astronaut.png.xmp", "chelsea.png.xmp", "coffee.png.xmp", "rocket.jpg.xmp"]
    assert not (photos / ".hidden.png.xmp").exists()
    fields = read(config, *photos.rglob("*.xmp"))
    for name, f in fields.items():
        want = best[name[:-4]]
        assert f["XMP-dc:Description"] == want["text"] and f["XMP-tiff:ImageDescription"] == want["text"]
        assert f["XMP-sat:SatDescription"] == want["text"]
        assert f["XMP-sat:SatModel"] == want["model_fingerprint"] and f["XMP-sat:SatVersion"] == __version__
        assert float(f["XMP-sat:SatScore"]) == pytest.approx(want["score"], abs=1e-4)
    # lang-alt x-default, as digiKam and darktable read it
    rdf, xml = "{http://www.w3.org/1999/02/22-rdf-syntax-ns#}", "{http://www.w3.org/XML/1998/namespace}"
    alt = ET.parse(photos / "rocket.jpg.xmp").find(f".//{{http://purl.org/dc/elements/1.1/}}description/{rdf}Alt")
    assert [(li.get(f"{xml}lang"), li.text) for li in alt] == [("x-default", best["rocket.jpg"]["text"])]
    rows = list(sqlite_utils.Database(db)["metadata_writes"].rows_where(order_by="target"))
    assert sorted((os.path.basename(r["target"]), r["kind"], r["status"], r["created_file"]) for r in rows) == [
        (n, "sidecar", "written", 1) for n in sidecars]
    assert all(r["caption"] == best[os.path.basename(r["target"])[:-4]]["text"] and r["run_id"] == 1 for r in rows)
    before = snapshot(photos)
    again = run("metadata", db, "--sidecar")
    assert again.exit_code == 0 and "4 unchanged" in again.stderr
    assert snapshot(photos) == before  # a rerun with the same captions touches nothing
    listing = [json.loads(line) for line in run("metadata", db, "--list").stdout.splitlines()]
    assert {os.path.basename(r["target"]) for r in listing} == set(sidecars)
    exported = [json.loads(line) for line in run("export", db, "--format", "jsonl", "--metadata").stdout.splitlines()]
    for record in exported:  # sat export shows what was written where, from which caption
        (write,) = record["metadata"]
        assert write["target"] == record["path"] + ".xmp" and write["kind"] == "sidecar"
        assert write["caption"] == record["captions"][0]["text"] and write["status"] == "written"


def test_a_persons_description_is_kept_and_reported(photos, tmp_path, tiny_model, config):
    subprocess.run(["exiftool", "-q", "-overwrite_original", "-IFD0:ImageDescription=Grandma at the launch",
                    str(photos / "coffee.png")], check=True)
    subprocess.run(["exiftool", "-q", "-overwrite_original", "-IFD0:ImageDescription=OLYMPUS DIGITAL CAMERA",
                    str(photos / "rocket.jpg")], check=True)  # a camera's stock text is no one's description
    human = DIGIKAM_XMP.replace('xmp:Rating="5"', 'xmp:Rating="5">\n   <dc:description><rdf:Alt><rdf:li '
                                'xml:lang="x-default">Our cat Chelsea\n  in the garden </rdf:li></rdf:Alt></dc:description')
    human = human.replace('MicrosoftPhoto:Rating="99">', 'MicrosoftPhoto:Rating="99"')
    (photos / "chelsea.png.xmp").write_text(human)
    chelsea_before = (photos / "chelsea.png.xmp").read_bytes()
    db = tmp_path / "pics.db"
    result = caption(photos, db, tiny_model, "--xmp")
    assert result.exit_code == 0, result.output
    assert not (photos / "coffee.png.xmp").exists()
    assert (photos / "chelsea.png.xmp").read_bytes() == chelsea_before
    assert (photos / "rocket.jpg.xmp").exists()
    out = run("metadata", db, "--sidecar")
    assert "2 skipped" in out.stderr and "'Grandma at the launch'" in out.stderr and "'Our cat Chelsea in the garden'" in out.stderr
    forced = run("metadata", db, "--sidecar", "--overwrite")
    assert forced.exit_code == 0 and "1 created" in forced.stderr and "1 updated" in forced.stderr
    best = best_captions(db)
    assert read(config, photos / "chelsea.png.xmp")["chelsea.png.xmp"]["XMP-dc:Description"] == best["chelsea.png"]["text"]
    taken = run("metadata", db, "--remove")
    assert taken.exit_code == 0, taken.output
    f = read(config, photos / "chelsea.png.xmp")["chelsea.png.xmp"]
    assert f["XMP-dc:Description"] == "Our cat Chelsea\n  in the garden " and "XMP-tiff:ImageDescription" not in f
    assert not any(k.startswith("XMP-sat:") for k in f)
    assert not (photos / "coffee.png.xmp").exists() and not (photos / "rocket.jpg.xmp").exists()


def test_darktable_sidecar_is_merged_and_darktable_reads_the_description(photos, tmp_path, tiny_model, config):
    (photos / "rocket.jpg.xmp").write_text(DARKTABLE_XMP)
    before = read(config, photos / "rocket.jpg.xmp")["rocket.jpg.xmp"]
    assert before["XMP-darktable:History"][1]["Operation"] == "colorbalancergb"
    db = tmp_path / "pics.db"
    assert caption(photos, db, tiny_model, "--xmp").exit_code == 0
    text = best_captions(db)["rocket.jpg"]["text"]
    after = read(config, photos / "rocket.jpg.xmp")["rocket.jpg.xmp"]
    assert after["XMP-dc:Description"] == text and after["XMP-tiff:ImageDescription"] == text
    assert others(after) == others(before)  # history stack, tags, rating, colour labels: every field
    assert after["XMP-xmp:Rating"] == 4 and after["XMP-dc:Subject"] == ["launch", "rocket"]
    if shutil.which("darktable-cli"):  # darktable itself reads the sidecar and exports the description
        out = tmp_path / "export.jpg"
        proc = subprocess.run(["darktable-cli", str(photos / "rocket.jpg"), str(photos / "rocket.jpg.xmp"), str(out),
                               "--core", "--configdir", str(tmp_path / "dt"), "--cachedir", str(tmp_path / "dtc")],
                              capture_output=True, text=True, timeout=300)
        assert out.exists(), proc.stdout + proc.stderr
        exported = read(config, out)["export.jpg"]
        assert exported["XMP-dc:Description"] == text and exported["IFD0:ImageDescription"] == text
    assert run("metadata", db, "--remove").exit_code == 0
    restored = read(config, photos / "rocket.jpg.xmp")["rocket.jpg.xmp"]
    assert others(restored) == others(before) and "XMP-dc:Description" not in restored  # kept, sat's part gone


def test_digikam_sidecar_is_merged_and_exiv2_reads_it(photos, tmp_path, tiny_model, config):
    (photos / "coffee.png.xmp").write_text(DIGIKAM_XMP)
    before = read(config, photos / "coffee.png.xmp")["coffee.png.xmp"]
    assert before["XMP-mwg-rs:RegionInfo"]["RegionList"][0]["Name"] == "Grandma"
    db = tmp_path / "pics.db"
    assert caption(photos, db, tiny_model, "--xmp").exit_code == 0
    text = best_captions(db)["coffee.png"]["text"]
    after = read(config, photos / "coffee.png.xmp")["coffee.png.xmp"]
    assert after["XMP-dc:Description"] == text
    assert others(after) == others(before)  # tags, ratings, colour and pick labels, face regions
    if shutil.which("exiv2"):  # Exiv2 is the library digiKam reads metadata with
        out = subprocess.run(["exiv2", "-PXkyt", str(photos / "coffee.png.xmp")], capture_output=True, text=True).stdout
        lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
        assert f'lang="x-default" {text}' in lines["Xmp.dc.description"]
        assert "People/Grandma" in lines["Xmp.digiKam.TagsList"] and lines["Xmp.xmp.Rating"].split()[-1] == "5"
        assert "Xmp.mwg-rs.Regions/mwg-rs:RegionList[1]/mwg-rs:Name" in lines


def test_a_new_caption_updates_the_description_sat_wrote(photos, tmp_path, tiny_model, config):
    db = tmp_path / "pics.db"
    assert caption(photos, db, tiny_model, "--xmp").exit_code == 0
    other = build_tiny_model(tmp_path / "other", seed=7, words=["a", "red", "bus", "in", "the", "street"])
    result = caption(photos, db, other, "--xmp")
    assert result.exit_code == 0, result.output
    best = best_captions(db)
    f = read(config, photos / "rocket.jpg.xmp")["rocket.jpg.xmp"]
    assert f["XMP-dc:Description"] == best["rocket.jpg"]["text"]
    assert f["XMP-sat:SatModel"] == best["rocket.jpg"]["model_fingerprint"]
    rows = list(sqlite_utils.Database(db)["metadata_writes"].rows)
    assert {r["run_id"] for r in rows} == {2} and all(r["created_file"] for r in rows)  # still sat's own sidecars
    assert run("metadata", db, "--run", 1).exit_code == 0  # back to the first model's captions
    first = sqlite_utils.Database(db)["runs"].get(1)["model_fingerprint"]
    assert first != f["XMP-sat:SatModel"]  # two models, so the check below tells them apart
    assert read(config, photos / "rocket.jpg.xmp")["rocket.jpg.xmp"]["XMP-sat:SatModel"] == first


def test_stem_sidecar_names_and_names_two_photos_would_share(photos, tmp_path, tiny_model, config):
    Image.open(EXAMPLES / "rocket.jpg").save(photos / "rocket.png")  # rocket.jpg and rocket.png -> rocket.xmp
    db = tmp_path / "pics.db"
    assert caption(photos, db, tiny_model).exit_code == 0
    result = run("metadata", db, "--sidecar", "--sidecar-name", "stem")
    assert result.exit_code == 1  # some files could not be written
    assert "rocket.jpg and rocket.png would share rocket.xmp" in result.stderr
    assert sorted(p.name for p in photos.rglob("*.xmp")) == ["astronaut.xmp", "chelsea.xmp", "coffee.xmp"]
    assert read(config, photos / "chelsea.xmp")["chelsea.xmp"]["XMP-dc:Description"] == best_captions(db)["chelsea.png"]["text"]


def test_dry_run_changes_nothing(photos, tmp_path, tiny_model):
    (photos / "rocket.jpg.xmp").write_text(DARKTABLE_XMP)
    db = tmp_path / "pics.db"
    assert caption(photos, db, tiny_model).exit_code == 0
    before = snapshot(photos)
    for args in (["--sidecar"], ["--embed"], ["--sidecar", "--overwrite"]):
        result = run("metadata", db, "--dry-run", *args)
        assert result.exit_code == 0 and "Dry run, nothing changed" in result.stderr
        assert snapshot(photos) == before
    assert "would create" in result.stderr and "would update" in result.stderr and "rocket.jpg.xmp" in result.stderr
    assert sqlite_utils.Database(db)["metadata_writes"].count == 0


def jpeg_scan(data: bytes) -> bytes:
    """The entropy-coded scan of a JPEG: everything from the first SOS marker on."""
    at = 2
    while data[at] == 0xFF and data[at + 1] != 0xDA:
        at += 2 + struct.unpack(">H", data[at + 2:at + 4])[0]
    return data[at:]


def png_idat(data: bytes) -> bytes:
    at, out = 8, b""
    while at < len(data):
        n, kind = struct.unpack(">I4s", data[at:at + 8])
        out += data[at + 8:at + 8 + n] if kind == b"IDAT" else b""
        at += 12 + n
    return out


def pixels(path) -> np.ndarray:
    if path.suffix == ".dng":
        import rawpy

        with rawpy.imread(str(path)) as raw:
            return raw.raw_image.copy()
    from sat_cli.inputs.formats import register_heif

    register_heif()
    with Image.open(path) as im:
        return np.asarray(im)


def test_embed_keeps_pixels_bit_identical_and_writes_exif_xmp_iptc(tmp_path, tiny_model, config):
    from sat_cli.inputs.formats import register_heif

    register_heif()  # pillow-heif writes the test's HEIC file
    folder = tmp_path / "photos"
    folder.mkdir()
    rocket = Image.open(EXAMPLES / "rocket.jpg")
    shutil.copy(EXAMPLES / "rocket.jpg", folder / "rocket.jpg")
    shutil.copy(EXAMPLES / "coffee.png", folder / "coffee.png")
    rocket.save(folder / "scan.tif")
    rocket.resize((320, 214)).save(folder / "phone.heic", format="HEIF", quality=80)
    (folder / "camera.dng").write_bytes(make_dng(np.asarray(rocket.resize((320, 214)))))
    originals = snapshot(folder)
    decoded = {p.name: pixels(p) for p in folder.iterdir()}
    db = tmp_path / "pics.db"
    assert caption(folder, db, tiny_model).exit_code == 0
    result = run("metadata", db, "--embed", "--backup")
    assert result.exit_code == 0, result.output
    assert "5 updated" in result.stderr
    best = best_captions(db)
    fields = read(config, *(folder / n for n in originals))
    for name, before in decoded.items():
        after = pixels(folder / name)
        assert after.shape == before.shape and np.array_equal(after, before), name  # bit-identical pixels
        assert (folder / (name + "_original")).read_bytes() == originals[name]  # --backup kept the original
        f, text = fields[name], best[name]["text"]
        assert f["XMP-dc:Description"] == text and f["IFD0:ImageDescription"] == text, (name, f)
        assert f["XMP-sat:SatDescription"] == text
        if name.endswith((".jpg", ".tif", ".dng")):
            assert f["IPTC:Caption-Abstract"] == text and f["IPTC:CodedCharacterSet"] == "UTF8"
    assert jpeg_scan((folder / "rocket.jpg").read_bytes()) == jpeg_scan(originals["rocket.jpg"])
    assert png_idat((folder / "coffee.png").read_bytes()) == png_idat(originals["coffee.png"])
    embedded = {n: ((folder / n).read_bytes(), (folder / n).stat().st_mtime_ns) for n in originals}
    assert run("metadata", db, "--embed").exit_code == 0  # the same captions again: nothing to do
    assert {n: ((folder / n).read_bytes(), (folder / n).stat().st_mtime_ns) for n in originals} == embedded
    assert run("metadata", db, "--remove", "--embed").exit_code == 0
    left = read(config, *(folder / n for n in originals))
    for name, before in decoded.items():
        assert np.array_equal(pixels(folder / name), before), name
        assert not {"XMP-dc:Description", "IFD0:ImageDescription", "IPTC:Caption-Abstract"} & set(left[name]), name


def test_embed_without_backup_rewrites_in_place_in_utf8(photos, tmp_path, tiny_model, config):
    db = tmp_path / "pics.db"
    assert caption(photos, db, tiny_model).exit_code == 0
    text = "Café au lait, naïve – 東京の猫"
    sqlite_utils.Database(db).execute("UPDATE captions SET text = ? WHERE rank = 1", [text])
    help_text = run("metadata", "--help").stdout
    assert "REWRITTEN" in help_text and "--backup" in help_text
    assert run("metadata", db, "--embed").exit_code == 0
    assert not list(photos.rglob("*_original"))
    f = read(config, photos / "rocket.jpg")["rocket.jpg"]
    assert f["XMP-dc:Description"] == text and f["IFD0:ImageDescription"] == text and f["IPTC:Caption-Abstract"] == text
    assert not list(photos.rglob(".*.sat-*"))  # no temporary files left behind
    # the photos' bytes changed, their pixels did not: a rerun of sat caption skips them all
    assert caption(photos, db, tiny_model).exit_code == 0
    last = list(sqlite_utils.Database(db)["runs"].rows)[-1]
    assert (last["captioned"], last["skipped"]) == (0, 4)


def test_read_only_and_unsupported_files_are_reported_and_the_run_goes_on(photos, tmp_path, tiny_model):
    Image.open(EXAMPLES / "camera.png").save(photos / "camera.gif")
    db = tmp_path / "pics.db"
    assert caption(photos, db, tiny_model).exit_code == 0
    os.chmod(photos / "rocket.jpg", 0o444)
    try:
        result = run("metadata", db, "--embed")
    finally:
        os.chmod(photos / "rocket.jpg", 0o644)
    assert result.exit_code == 1
    assert "rocket.jpg: read-only file: not changed" in result.stderr
    assert "camera.gif: sat cannot embed into .gif files: use --sidecar" in result.stderr
    assert "3 updated" in result.stderr and "2 failed" in result.stderr
    assert (photos / "rocket.jpg").read_bytes() == (EXAMPLES / "rocket.jpg").read_bytes()


def test_remove_takes_back_only_what_sat_wrote(photos, tmp_path, tiny_model, config):
    db = tmp_path / "pics.db"
    assert caption(photos, db, tiny_model, "--xmp").exit_code == 0
    subprocess.run(["exiftool", "-q", "-overwrite_original", "-XMP-dc:Description=Rocket launch, 1969",
                    str(photos / "rocket.jpg.xmp")], check=True)  # a person edits sat's description
    preview = run("metadata", db, "--remove", "--dry-run")
    assert preview.exit_code == 0 and len(list(photos.rglob("*.xmp"))) == 4
    result = run("metadata", db, "--remove")
    assert result.exit_code == 0, result.output
    assert "kept XMP-dc:Description (changed since sat wrote it)" in result.stderr
    assert [p.name for p in photos.rglob("*.xmp")] == ["rocket.jpg.xmp"]
    f = read(config, photos / "rocket.jpg.xmp")["rocket.jpg.xmp"]
    assert f["XMP-dc:Description"] == "Rocket launch, 1969"
    assert "XMP-tiff:ImageDescription" not in f and not any(k.startswith("XMP-sat:") for k in f)
    rows = list(sqlite_utils.Database(db)["metadata_writes"].rows)
    assert {r["status"] for r in rows} == {"removed"} and all(r["removed_at"] for r in rows)
    again = run("metadata", db, "--remove")
    assert again.exit_code == 0 and "nothing taken back" in again.stderr


def test_a_crash_while_writing_leaves_the_old_file_or_none(photos, tmp_path, tiny_model, monkeypatch):
    (photos / "rocket.jpg.xmp").write_text(DARKTABLE_XMP)
    db = tmp_path / "pics.db"
    assert caption(photos, db, tiny_model).exit_code == 0

    def crash(*args):
        raise KeyboardInterrupt  # the process dies between writing the new file and renaming it

    monkeypatch.setattr(metadata_files.os, "replace", crash)
    monkeypatch.setattr(metadata_files.os, "link", crash)
    with pytest.raises(KeyboardInterrupt):
        write_metadata(str(db), MetadataOptions(quiet=True))
    assert (photos / "rocket.jpg.xmp").read_text() == DARKTABLE_XMP  # the old sidecar, whole
    assert not (photos / "chelsea.png.xmp").exists()  # or none: never half a sidecar
    assert not list(photos.rglob(".*.sat-*"))


def test_usage_errors_exit_2(photos, tmp_path, tiny_model, monkeypatch):
    assert run("metadata", tmp_path / "missing.db").exit_code == 2
    db = tmp_path / "pics.db"
    assert caption(photos, db, tiny_model).exit_code == 0
    both = run("metadata", db, "--sidecar", "--embed")
    assert both.exit_code == 2 and "Choose --sidecar or --embed" in both.output
    monkeypatch.setenv("SAT_EXIFTOOL", str(tmp_path / "no-exiftool"))
    missing = run("metadata", db)
    assert missing.exit_code == 2 and "apt install libimage-exiftool-perl" in missing.output


def test_names_that_are_not_utf8_get_their_sidecars(tmp_path, tiny_model):
    folder = os.fsencode(tmp_path / "photos")
    os.mkdir(folder)
    name = os.path.join(folder, b"caf\xe9 1.jpg")  # Latin-1 bytes, as old cameras and Windows shares write
    shutil.copy(EXAMPLES / "rocket.jpg", name)
    db = tmp_path / "pics.db"
    result = caption(tmp_path / "photos", db, tiny_model, "--xmp")
    assert result.exit_code == 0, result.output
    assert os.path.exists(name + b".xmp")
    out = subprocess.run([b"exiftool", b"-s3", b"-XMP-dc:Description", name + b".xmp"], capture_output=True).stdout
    (text,) = [r["text"] for r in best_captions(db).values()]
    assert out.decode().strip() == text
    assert run("metadata", db, "--remove").exit_code == 0 and not os.path.exists(name + b".xmp")
