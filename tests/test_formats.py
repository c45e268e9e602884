"""HEIC/HEIF (pillow-heif), AVIF (Pillow) and camera RAW (rawpy) inputs: decoded, oriented and
captioned like any other photo. The HEIC and AVIF files are made with the libraries themselves,
the RAW files are DNGs written by tests/rawfiles.py (a mosaic of a real photo)."""

import io
import shutil
import subprocess

import numpy as np
import pytest
import sqlite_utils
from click.testing import CliRunner
from PIL import Image

from conftest import EXAMPLES
from rawfiles import make_dng, nef_like
from sat_cli.cli.main import cli
from sat_cli.inputs import formats
from sat_cli.inputs.images import IMAGE_EXTENSIONS, load_image

pytest.importorskip("pillow_heif")
pytest.importorskip("rawpy")

ROTATE = {1: None, 3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_270, 8: Image.Transpose.ROTATE_90}


@pytest.fixture(scope="module")
def rocket():
    """The rocket photo at 320x214 (even sides for the Bayer mosaic); not symmetric in any way."""
    return Image.open(EXAMPLES / "rocket.jpg").convert("RGB").resize((320, 214))


def similarity(arr: np.ndarray, im: Image.Image) -> float:
    """Correlation of two pictures' grey levels at 64x64."""
    a = np.asarray(Image.fromarray(arr).convert("L").resize((64, 64)), float).ravel()
    b = np.asarray(im.convert("L").resize((64, 64)), float).ravel()
    return float(np.corrcoef(a, b)[0, 1])


def oriented(im: Image.Image, orientation: int) -> Image.Image:
    return im if ROTATE[orientation] is None else im.transpose(ROTATE[orientation])


def exif(orientation: int) -> bytes:
    e = Image.Exif()
    e[0x0112] = orientation
    return e.tobytes()


def test_new_extensions_are_found_by_folder_walks():
    for ext in (".heic", ".heif", ".hif", ".avif", ".dng", ".cr2", ".cr3", ".nef", ".arw", ".raf", ".orf", ".rw2"):
        assert ext in IMAGE_EXTENSIONS


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
@pytest.mark.parametrize("orientation", [1, 6, 8])
def test_heic_and_avif_decode_with_their_orientation(rocket, fmt, orientation):
    formats.register_heif()
    buf = io.BytesIO()
    rocket.save(buf, format=fmt, exif=exif(orientation), quality=90)
    arr, size = load_image(io.BytesIO(buf.getvalue()), (96, 96))
    want = oriented(rocket, orientation)
    assert size == want.size
    assert similarity(arr, want) > 0.97
    if orientation != 1:  # the unrotated picture does not match: the orientation was applied
        assert similarity(arr, oriented(rocket, 3 if orientation == 1 else 1).resize(want.size)) < 0.5


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_dng_without_preview_is_demosaiced_half_size_and_oriented(rocket, orientation):
    data = make_dng(np.asarray(rocket), orientation=orientation)
    assert formats.is_tiff_raw(data)
    with formats.open_photo(io.BytesIO(data)) as im:
        assert im.format == "RAW" and im.size == (160, 107)  # half-size demosaic
    arr, size = load_image(io.BytesIO(data), (96, 96))
    want = oriented(rocket, orientation)
    assert size == want.size  # the sensor's size, oriented, not the half-size picture's
    assert similarity(arr, want) > 0.97


def test_dng_preview_is_used_when_large_enough_else_the_sensor_data(rocket):
    # the preview shows another photo, so the result tells which one was decoded
    other = Image.open(EXAMPLES / "astronaut.png").convert("RGB")
    big = make_dng(np.asarray(rocket), orientation=6, preview=other.resize((320, 214)))
    arr, size = load_image(io.BytesIO(big), (96, 96))
    assert size == (214, 320)
    assert similarity(arr, oriented(other.resize((320, 214)), 6)) > 0.97  # preview, with the RAW's orientation
    small = make_dng(np.asarray(rocket), orientation=6, preview=other.resize((80, 54)))
    arr, _ = load_image(io.BytesIO(small), (96, 96))
    assert similarity(arr, oriented(rocket, 6)) > 0.97  # too small a preview: the sensor data


def test_raw_is_told_from_plain_tiff_by_content():
    rgb = np.asarray(Image.open(EXAMPLES / "rocket.jpg").convert("RGB").resize((64, 48)))
    plain = io.BytesIO()
    Image.fromarray(rgb).save(plain, "TIFF")
    assert not formats.is_tiff_raw(plain.getvalue())
    assert formats.is_tiff_raw(nef_like(rgb))  # CFA data in a SubIFD, no DNG tags
    assert formats.is_tiff_raw(b"II*\0\x10\0\0\0CR\x02\0" + b"\0" * 8)  # Canon CR2 marker
    arr, size = load_image(io.BytesIO(nef_like(rgb)), (32, 32))
    assert size == (64, 48)
    arr, size = load_image(io.BytesIO(plain.getvalue()), (32, 32))  # a plain TIFF still goes to Pillow
    assert size == (64, 48)


def test_unreadable_files_keep_pillows_message_and_raw_keeps_the_bomb_guard(rocket, monkeypatch):
    from sat_cli.inputs.images import describe_error

    with pytest.raises(Image.UnidentifiedImageError) as info:
        load_image(io.BytesIO(b"not an image at all" * 10), (32, 32))
    assert describe_error(info.value) == "not an image Pillow can read (unknown or corrupt format)"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(Image.DecompressionBombError):
        load_image(io.BytesIO(make_dng(np.asarray(rocket))), (32, 32))


def test_caption_reads_heic_avif_and_dng_files(tmp_path, tiny_model, rocket):
    folder = tmp_path / "phone"
    folder.mkdir()
    rocket.save(folder / "IMG_0001.HEIC", format="HEIF", exif=exif(6))
    rocket.save(folder / "IMG_0002.avif", format="AVIF")
    (folder / "DSC_0003.dng").write_bytes(make_dng(np.asarray(rocket), orientation=8))
    shutil.copy(EXAMPLES / "coffee.png", folder / "coffee.png")
    db = tmp_path / "out.db"
    result = CliRunner().invoke(cli, ["caption", str(folder), "--db", str(db), "--model", str(tiny_model),
                                      "--workers", "0", "-q"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = {r["path"].rsplit("/", 1)[1]: r for r in sqlite_utils.Database(db)["images"].rows}
    assert set(rows) == {"IMG_0001.HEIC", "IMG_0002.avif", "DSC_0003.dng", "coffee.png"}
    assert all(r["status"] == "ok" for r in rows.values()), rows
    assert (rows["IMG_0001.HEIC"]["width"], rows["IMG_0001.HEIC"]["height"]) == (214, 320)
    assert (rows["DSC_0003.dng"]["width"], rows["DSC_0003.dng"]["height"]) == (214, 320)


@pytest.mark.skipif(not shutil.which("exiftool"), reason="exiftool is not installed")
def test_the_test_dng_is_a_valid_dng_for_exiftool(tmp_path, rocket):
    path = tmp_path / "x.dng"
    path.write_bytes(make_dng(np.asarray(rocket), orientation=6, preview=rocket))
    out = subprocess.run(["exiftool", "-s", "-s", "-s", "-FileType", "-DNGVersion", "-Orientation#",
                          "-SubIFD:PhotometricInterpretation", str(path)], capture_output=True, text=True).stdout
    assert out.split() == ["DNG", "1.4.0.0", "6", "Color", "Filter", "Array"]
