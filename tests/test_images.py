"""Finding files and turning every kind of image into RGB input, without crashing on bad files."""

import io

import numpy as np
import pytest
from PIL import Image

from conftest import EXAMPLES
from sat_cli.inputs.images import Sources, collate, discover, load_image


def test_discover_folders_files_globs_and_missing(photos, tmp_path):
    (photos / "notes.txt").write_text("not an image")
    (photos / "UPPER.JPG").write_bytes((EXAMPLES / "rocket.jpg").read_bytes())
    found = list(discover([str(photos), str(photos / "coffee.png"), str(tmp_path / "missing.jpg"),
                           str(photos / "**" / "*.png"), str(tmp_path / "*.webp")]))
    paths = [f.path for f in found if not f.error]
    names = [p[len(str(photos)) + 1:] for p in paths]
    assert names == ["UPPER.JPG", "chelsea.png", "coffee.png", "rocket.jpg", "sub/astronaut.png"]  # each once
    errors = {f.path: f.error for f in found if f.error}
    assert errors == {str(tmp_path / "missing.jpg"): "no such file or directory",
                      str(tmp_path / "*.webp"): "no files match this pattern"}
    flat = [f.path for f in discover([str(photos)], recursive=False)]
    assert not any("sub" in p for p in flat) and len(flat) == 4


def rgb(arr):
    return np.asarray(arr, dtype=np.uint8)


def test_exif_orientation_is_applied(tmp_path):
    # left half black, right half white; EXIF 6 = rotate 90 degrees clockwise to display
    arr = np.zeros((40, 80, 3), np.uint8)
    arr[:, 40:] = 255
    im = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    out, size = load_image(tmp_path / "rot.jpg", (80, 80), "bilinear")
    assert size == (40, 80)  # displayed as 40 wide, 80 tall
    top, bottom = out[:30].mean(), out[50:].mean()
    assert top < 40 and bottom > 215  # the white half is now at the bottom


@pytest.mark.parametrize("mode", ["L", "1", "P", "CMYK", "I;16", "I", "F", "LA", "RGBA"])
def test_every_mode_becomes_rgb(tmp_path, mode):
    base = Image.open(EXAMPLES / "chelsea.png").convert("RGB").resize((64, 48))
    if mode == "I;16":
        im = Image.fromarray((np.asarray(base.convert("L"), np.uint16) * 257))
    elif mode == "I":
        im = Image.fromarray(np.asarray(base.convert("L"), np.int32) * 257)
    elif mode == "F":
        im = Image.fromarray(np.asarray(base.convert("L"), np.float32) / 255.0)
    else:
        im = base.convert(mode)
    fmt = {"CMYK": "JPEG", "F": "TIFF", "I": "TIFF"}.get(mode, "PNG")
    buf = io.BytesIO()
    im.save(buf, fmt)
    buf.seek(0)
    out, size = load_image(buf, (48, 64))
    assert out.shape == (48, 64, 3) and out.dtype == np.uint8 and size == (64, 48)
    grey = np.asarray(base.convert("L"), np.float32)
    if mode in ("L", "I;16", "I", "F", "LA"):
        assert np.abs(out[..., 0].astype(np.float32) - grey).mean() < 2.0  # scaled, not clipped or crushed
    assert out.std() > 10


def test_transparency_is_composited_on_white(tmp_path):
    rgba = np.zeros((20, 20, 4), np.uint8)  # fully transparent black
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "PNG")
    out, _ = load_image(io.BytesIO(buf.getvalue()), (20, 20))
    assert out.min() == 255
    pal = Image.new("P", (20, 20), 0)
    pal.putpalette([0, 0, 0] * 256)
    pal.info["transparency"] = 0
    buf = io.BytesIO()
    pal.save(buf, "PNG", transparency=0)
    out, _ = load_image(io.BytesIO(buf.getvalue()), (20, 20))
    assert out.min() == 255


def test_animated_gif_webp_tiff_bmp(tmp_path):
    frames = [Image.new("RGB", (30, 20), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    out, size = load_image(tmp_path / "a.gif", (20, 30))
    assert size == (30, 20) and out[..., 0].mean() > 200 and out[..., 2].mean() < 50  # first frame
    base = Image.open(EXAMPLES / "coffee.png").convert("RGB")
    for fmt in ("WEBP", "TIFF", "BMP"):
        buf = io.BytesIO()
        base.save(buf, fmt)
        buf.seek(0)
        assert load_image(buf, (32, 32))[0].shape == (32, 32, 3)


def test_large_jpeg_is_decoded_at_reduced_size_with_the_same_result(tmp_path):
    big = Image.open(EXAMPLES / "astronaut.png").convert("RGB").resize((2048, 2048))
    big.save(tmp_path / "big.jpg", quality=92)
    fast, size = load_image(tmp_path / "big.jpg", (224, 224))
    assert size == (2048, 2048)
    full = np.asarray(Image.open(tmp_path / "big.jpg").convert("RGB").resize((224, 224), Image.Resampling.BICUBIC))
    assert np.abs(fast.astype(int) - full.astype(int)).mean() < 3


def test_bad_files_become_errors_not_crashes(tmp_path, monkeypatch):
    (tmp_path / "text.jpg").write_text("hello")
    data = (EXAMPLES / "rocket.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "ok.jpg").write_bytes(data)
    Image.new("RGB", (600, 600)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 160_000)  # 360,000 px > 2x the limit: an error; rocket.jpg stays under
    names = ("text.jpg", "truncated.jpg", "empty.png", "ok.jpg", "bomb.png")
    files = Sources((32, 32))
    items, pixels = collate([files[(i, str(tmp_path / n))] for i, n in enumerate(names)])
    errors = {it.path.rsplit("/", 1)[1]: it.error for it in items}
    assert errors["ok.jpg"] is None and pixels.shape == (1, 3, 32, 32) and items[3].row == 0
    assert "not an image" in errors["text.jpg"] and "not an image" in errors["empty.png"]
    assert "truncated" in errors["truncated.jpg"]
    assert "decompression-bomb" in errors["bomb.png"]
    assert all(it.sha256 for it in items)


def test_known_content_is_skipped_without_decoding(tmp_path):
    import hashlib

    data = (EXAMPLES / "rocket.jpg").read_bytes()
    (tmp_path / "r.jpg").write_bytes(data)
    files = Sources((16, 16), skip=frozenset({hashlib.sha256(data).hexdigest()}))
    item = files[(0, str(tmp_path / "r.jpg"))]
    assert item.skipped and item.pixels is None and item.width is None


def test_a_batch_is_stacked_channels_last_and_from_a_worker_in_shared_memory(photos):
    """collate stacks the decoded (H, W, 3) photos as they are (issue 22): the same values as
    transposing each photo, with channels-last strides; from a DataLoader worker the batch is
    already in shared memory, so it is not copied again on the way to the main process."""
    import torch

    from sat_cli.pipeline import load_batches
    from sat_cli.model.encoders import Preprocess

    paths = sorted(str(p) for p in photos.rglob("*.*") if not p.name.startswith("."))
    files = Sources((40, 48))
    items = [files[(i, p)] for i, p in enumerate(paths)]
    expected = torch.stack([it.pixels.contiguous() for it in items])
    _, pixels = collate(items)
    assert torch.equal(pixels, expected) and pixels.shape == (4, 3, 40, 48)
    assert pixels.is_contiguous(memory_format=torch.channels_last) and not pixels.is_shared()
    (_, shared), = load_batches(paths, Preprocess(size=(40, 48)), batch_size=8, workers=1)
    assert torch.equal(shared, expected) and shared.is_shared()
