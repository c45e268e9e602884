"""The Python API (sat_cli.load, calling it, .stream, .to_db) and the one pipeline under it: the
same captions as `sat caption`, errors as values, lazy streaming."""

import shutil
from dataclasses import fields

import numpy as np
import pytest
import sqlite_utils
from click.testing import CliRunner
from PIL import Image

import sat_cli
from conftest import EXAMPLES
from sat_cli.cli.main import cli
from sat_cli.errors import SatError


@pytest.fixture(scope="module")
def cap(tiny_model):
    return sat_cli.load(tiny_model, device="cpu")


def test_load_and_call_on_paths_pil_arrays_and_folders(cap, photos):
    pil = Image.open(EXAMPLES / "coffee.png")
    arr = np.asarray(Image.open(EXAMPLES / "chelsea.png").convert("RGB"))
    out = cap([str(photos / "rocket.jpg"), pil, arr, photos / "sub"], beam=3, n_best=3)
    assert len(out) == 4  # the folder holds one image (astronaut.png)
    assert [r.path for r in out] == [str(photos / "rocket.jpg"), None, None, str(photos / "sub" / "astronaut.png")]
    assert [r.index for r in out] == [0, 1, 2, 3]
    for r in out:
        assert r.error is None and r.ok
        assert r.text == r.nbest[0].text == " ".join(r.words)
        assert r.score == r.nbest[0].score and len(r.nbest) == 3
        assert [c.rank for c in r.nbest] == [1, 2, 3]
        assert r.attention.shape == (len(r.words), *cap.grid)
        assert np.allclose(r.attention.astype(np.float32).sum(axis=(1, 2)), 1, atol=1e-2)
    assert (out[1].width, out[1].height) == pil.size and (out[2].width, out[2].height) == (arr.shape[1], arr.shape[0])


def test_in_memory_images_caption_like_their_files(cap, tmp_path):
    """A PIL image or an array decoded from a lossless file gives that file's caption and score."""
    by_file = cap([EXAMPLES / "chelsea.png"])[0]
    pil, arr = Image.open(EXAMPLES / "chelsea.png"), np.asarray(Image.open(EXAMPLES / "chelsea.png").convert("RGB"))
    for r in cap([pil, arr]):
        assert (r.text, r.score) == (by_file.text, by_file.score)


def test_one_bad_input_is_a_value_not_an_exception(cap, tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    out = cap([EXAMPLES / "rocket.jpg", tmp_path / "broken.jpg", tmp_path / "missing.png",
               np.zeros((4, 4), dtype=np.float64), np.zeros((2, 3, 5), dtype=np.uint8), EXAMPLES / "camera.png"])
    assert [r.error is None for r in out] == [True, False, False, False, False, True]
    assert "not an image" in out[1].error and "no such file" in out[2].error.lower()
    assert "uint8" in out[3].error and "(2, 3, 5)" in out[4].error
    assert out[1].text is None and out[1].attention is None and out[1].nbest == []


def test_odd_inputs_and_special_files_in_folders_are_values_too(cap, tmp_path):
    """None, numbers, tensors: an error Result each; a bytes path is a path; a named pipe inside a
    folder is reported with its reason and never opened; bad batch sizes raise at the call."""
    import os

    folder = tmp_path / "f"
    folder.mkdir()
    shutil.copy(EXAMPLES / "rocket.jpg", folder / "rocket.jpg")
    os.mkfifo(folder / "pipe.jpg")
    out = cap([None, 7, os.fsencode(EXAMPLES / "camera.png"), folder, EXAMPLES / "coffee.png"])
    assert [r.ok for r in out] == [False, False, True, False, True, True]
    assert "not an image or a path: NoneType" in out[0].error and "int" in out[1].error
    assert out[2].path == str(EXAMPLES / "camera.png")
    assert out[3].path == str(folder / "pipe.jpg") and "named pipe" in out[3].error
    assert out[4].path == str(folder / "rocket.jpg")
    assert cap(os.fsencode(EXAMPLES / "rocket.jpg"))[0].ok  # one bytes path is one input, not a list of ints
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="batch_size"):
            cap.stream([EXAMPLES / "rocket.jpg"], batch_size=bad)
    with pytest.raises(ValueError, match="batch_size"):
        cap.to_db(tmp_path / "x.db", [EXAMPLES / "rocket.jpg"], batch_size=0)
    assert not (tmp_path / "x.db").exists()


def test_stream_is_lazy(cap):
    pulled = []

    def endless():
        while True:
            pulled.append(1)
            yield EXAMPLES / "rocket.jpg"

    stream = cap.stream(endless(), batch_size=4)
    first = [next(stream) for _ in range(5)]  # the first two batches
    assert all(r.ok for r in first) and len(pulled) <= 12
    stream.close()


def test_single_input_and_settings(cap):
    one = cap(EXAMPLES / "rocket.jpg")
    assert len(one) == 1
    wide = cap(EXAMPLES / "rocket.jpg", n_best=5)[0]  # more hypotheses than the model's beam: it widens
    assert len(wide.nbest) == 5
    assert cap.settings(n_best=5).beam_size == 5 and cap.settings(beam=4, n_best=2).beam_size == 4
    with pytest.raises(ValueError, match="n-best"):
        cap.settings(beam=2, n_best=3)
    no_maps = cap(EXAMPLES / "rocket.jpg", attention=False)[0]
    assert no_maps.attention is None and no_maps.text == one[0].text


def test_to_db_is_what_sat_caption_stores(cap, tiny_model, photos, tmp_path):
    summary = cap.to_db(tmp_path / "api.db", [photos], beam=3)
    assert (summary.captioned, summary.failed, summary.exit_code) == (4, 0, 0)
    r = CliRunner().invoke(cli, ["caption", str(photos), "--db", str(tmp_path / "cli.db"), "--model", str(tiny_model),
                                 "--device", "cpu", "--beam", "3", "-q"])
    assert r.exit_code == 0, r.output

    def rows(db):
        return list(sqlite_utils.Database(db).query(
            "SELECT images.path, captions.rank, captions.text, captions.logprob, captions.score, attention_maps.data "
            "FROM images JOIN results USING (sha256) JOIN captions ON captions.result_id = results.id "
            "JOIN attention_maps ON attention_maps.caption_id = captions.id ORDER BY images.path, rank"))

    assert rows(tmp_path / "api.db") == rows(tmp_path / "cli.db") and len(rows(tmp_path / "cli.db")) == 4 * 3
    again = cap.to_db(tmp_path / "api.db", [photos], beam=3)
    assert again.skipped == 4 and again.captioned == 0
    calls = {r.path: r.text for r in cap([photos], beam=3)}
    stored = {row["path"]: row["text"] for row in rows(tmp_path / "cli.db") if row["rank"] == 1}
    assert calls == stored
    with pytest.raises(SatError, match="by path"):
        cap.to_db(tmp_path / "x.db", [np.zeros((8, 8, 3), np.uint8)])


def test_caption_of_an_empty_folder_leaves_no_database(tmp_path, tiny_model):
    (tmp_path / "empty").mkdir()
    r = CliRunner().invoke(cli, ["caption", str(tmp_path / "empty"), "--db", str(tmp_path / "e.db"),
                                 "--model", str(tiny_model)])
    assert r.exit_code == 2 and "No image files found" in r.stderr
    assert not (tmp_path / "e.db").exists()


def test_train_options_come_from_the_config():
    """Every TrainConfig field is a `sat train` option with the same default (switches flip theirs)."""
    from sat_cli.cli.models import config_from_options
    from sat_cli.cli.models import train as train_command
    from sat_cli.training import TrainConfig

    options = {p.name: p for p in train_command.params}
    for f in fields(TrainConfig):
        if "flag" in f.metadata:
            assert options["flag_" + f.name].is_flag, f.name
        else:
            assert options[f.name].default == f.default, f.name
    parsed = train_command.make_context("train", ["--data", __file__, "--no-meteor", "--feature-layers", "4,-1"])
    cfg = config_from_options(dict(parsed.params))
    assert cfg.meteor is False and cfg.feature_layers == [4, -1] and cfg.half is False
    assert {k: v for k, v in vars(cfg).items() if k not in ("data", "meteor", "feature_layers")} == {
        f.name: f.default for f in fields(TrainConfig) if f.name not in ("data", "meteor", "feature_layers")}


def test_eval_n_best_widens_the_beam_as_caption_does(tmp_path, tiny_model):
    """The beam rule is one function: `sat eval --n-best 5` works as `sat caption --n-best 5` does."""
    import json

    (tmp_path / "imgs").mkdir()
    shutil.copy(EXAMPLES / "rocket.jpg", tmp_path / "imgs" / "r.jpg")
    data = {"images": [{"filename": "r.jpg", "split": "val", "sentences": [{"raw": "a rocket", "tokens": ["a", "rocket"]}]}]}
    (tmp_path / "imgs" / "caps.json").write_text(json.dumps(data))
    r = CliRunner().invoke(cli, ["eval", "--model", str(tiny_model), "--data", str(tmp_path / "imgs" / "caps.json"),
                                 "--n-best", "5", "--no-meteor", "--no-cache", "--json", "-q"])
    assert r.exit_code == 0, r.output
    assert "beam 5" in json.loads(r.stdout)["source"]


def test_the_api_tour_example_runs():
    """examples/api_tour.py is the Python API page's (docs/python-api.md) notebook-style walk through the API: it must run as written."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(EXAMPLES / "api_tour.py")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "attention maps (words, grid height, grid width): (" in out.stdout
    assert "to_db: 5 captioned, 0 failed" in out.stdout and "rerun: 5 skipped, 0 captioned" in out.stdout
