"""`sat caption` end to end: what lands in the database, reruns, failures and exit status."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import sqlite_utils
from click.testing import CliRunner

from conftest import EXAMPLES
from sat_cli.cli.main import cli
from sat_cli.store.queries import stored_results


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def caption(photos, db, model, *extra):
    return run("caption", photos, "--db", db, "--model", model, "--workers", "0", *extra)


def test_caption_folder_stores_captions_scores_nbest_and_attention(photos, tmp_path, tiny_model):
    db_path = tmp_path / "out.db"
    result = caption(photos, db_path, tiny_model, "--beam", "3", "--n-best", "2", "--batch-size", "3")
    assert result.exit_code == 0, result.output
    assert "4 captioned, 0 skipped" in result.stderr
    db = sqlite_utils.Database(db_path)
    images = list(db["images"].rows_where(order_by="path"))
    assert [i["path"].rsplit("/", 1)[1] for i in images] == ["chelsea.png", "coffee.png", "rocket.jpg", "astronaut.png"]
    assert {(i["width"], i["height"]) for i in images} == {(451, 300), (600, 400), (640, 427), (512, 512)}
    assert all(i["status"] == "ok" and len(i["sha256"]) == 64 for i in images)
    run_row = db["runs"].get(1)
    assert run_row["status"] == "done" and run_row["captioned"] == 4 and run_row["encoder"] == "timm:test_efficientnet"
    assert json.loads(run_row["settings"]) == {"beam_size": 3, "n_best": 2, "max_len": 12, "length_penalty": 0.0,
                                               "no_repeat_ngram": 0}
    assert db["results"].count == 4 and db["captions"].count == 8
    for cap in db["captions"].rows:
        words = json.loads(cap["tokens"])
        assert cap["text"] == " ".join(words) and cap["rank"] in (1, 2)
        assert cap["logprob"] <= 0 and cap["score"] == pytest.approx(cap["logprob"])
        att = db["attention_maps"].get(cap["id"])
        assert (att["words"], att["grid_h"], att["grid_w"]) == (len(words), 2, 2)
        maps = np.frombuffer(att["data"], dtype="<f2").reshape(len(words), 2, 2)
        np.testing.assert_allclose(maps.sum(axis=(1, 2)), 1.0, atol=5e-3)
    best = {r["rank"]: r["score"] for r in db.query("select rank, score from captions where result_id = 1")}
    assert best[1] >= best[2]
    assert db["_sat_migrations"].count >= 1 and db.journal_mode == "wal"


def test_rerun_skips_force_redoes_and_new_settings_recaption(photos, tmp_path, tiny_model):
    db_path = tmp_path / "out.db"
    assert caption(photos, db_path, tiny_model).exit_code == 0
    db = sqlite_utils.Database(db_path)
    first = [r["text"] for r in db.query("select text from captions order by id")]
    again = caption(photos, db_path, tiny_model)
    assert again.exit_code == 0 and "0 captioned, 4 skipped" in again.stderr
    assert db["results"].count == 4
    forced = caption(photos, db_path, tiny_model, "--force")
    assert "4 captioned, 0 skipped" in forced.stderr
    assert db["results"].count == 4  # replaced, not duplicated
    assert [r["text"] for r in db.query("select text from captions order by id")] == first
    assert db.execute("select count(*) from captions_fts").fetchone()[0] == db["captions"].count
    other = caption(photos, db_path, tiny_model, "--beam", "2")
    assert "4 captioned" in other.stderr and db["results"].count == 8
    assert db["runs"].count == 4


def test_failures_are_rows_the_run_goes_on_and_exit_status_is_1(photos, tmp_path, tiny_model):
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    result = caption(photos, tmp_path / "out.db", tiny_model, str(tmp_path / "missing.png"))
    assert result.exit_code == 1
    assert "4 captioned, 0 skipped (already stored), 1 failed" not in result.stderr
    assert "4 captioned" in result.stderr and "2 failed" in result.stderr
    db = sqlite_utils.Database(tmp_path / "out.db")
    failed = {r["path"].rsplit("/", 1)[1]: r["error"] for r in db["images"].rows_where("status = 'failed'")}
    assert set(failed) == {"broken.jpg", "missing.png"}
    assert "no such file" in failed["missing.png"]
    assert db["runs"].get(1)["status"] == "done_with_errors" and db["runs"].get(1)["failed"] == 2


def test_same_content_twice_is_captioned_once(tmp_path, tiny_model):
    folder = tmp_path / "dups"
    folder.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        shutil.copy(EXAMPLES / "coffee.png", folder / name)
    result = caption(folder, tmp_path / "d.db", tiny_model)
    assert "1 captioned, 2 skipped" in result.stderr
    db = sqlite_utils.Database(tmp_path / "d.db")
    assert db["images"].count == 3 and db["results"].count == 1
    rows = list(db.query("select images.path from images join results using (sha256)"))
    assert len(rows) == 3


def test_no_attention_and_print(photos, tmp_path, tiny_model):
    result = caption(photos, tmp_path / "n.db", tiny_model, "--no-attention", "--print", "-q")
    assert result.exit_code == 0 and result.stderr == ""
    lines = result.stdout.strip().split("\n")
    assert len(lines) == 4 and all(line.startswith(str(photos)) and "\t" in line for line in lines)
    db = sqlite_utils.Database(tmp_path / "n.db")
    assert db["captions"].count > 0 and db["attention_maps"].count == 0


def test_usage_errors_are_clear(photos, tmp_path, tiny_model):
    bad = run("caption", photos, "--db", tmp_path / "x.db", "--model", tmp_path / "nope")
    assert bad.exit_code == 2 and "Model not found" in bad.stderr and "Traceback" not in bad.stderr
    nbest = caption(photos, tmp_path / "x.db", tiny_model, "--beam", "2", "--n-best", "3")
    assert nbest.exit_code == 2 and "n-best must be between 1 and the beam size" in nbest.stderr
    notdb = tmp_path / "notes.db"
    notdb.write_text("hello")
    res = caption(photos, notdb, tiny_model)
    assert res.exit_code == 2 and "not an SQLite database" in res.stderr
    nothing = caption(tmp_path / "empty_dir_that_is_missing", tmp_path / "y.db", tiny_model)
    assert nothing.exit_code == 1 and "no such file or directory" in nothing.stderr


def test_python_m_sat_cli_help():
    out = subprocess.run([sys.executable, "-m", "sat_cli", "caption", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--length-penalty" in out.stdout and "Exit status" in out.stdout


def torchrun(*args, cwd=None, env=None, timeout=300):
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_ranks_one_writer(photos, tmp_path, tiny_model):
    """torchrun: each rank captions every WORLD_SIZE-th file and rank 0 alone writes the database."""
    db_path = tmp_path / "shared.db"
    proc = torchrun("--standalone", "--nproc-per-node", "2", "-m", "sat_cli", "caption", photos, "--db", db_path,
                    "--model", tiny_model, "--workers", "0", "-q")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    db = sqlite_utils.Database(db_path)
    assert db["images"].count == 4 and db["results"].count == 4 and db["runs"].count == 1
    assert db["runs"].get(1)["captioned"] == 4


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_only_rank_0_opens_the_database(photos, tmp_path, tiny_model):
    """torchrun --nnodes 2 with two local agents (c10d rendezvous on 127.0.0.1), each node in its
    own working folder with a relative --db: exactly one folder gets a database (rank 0's), the
    other never touches SQLite, and every photo of both ranks' shares is in it."""
    import os

    nodes = [tmp_path / "node-a", tmp_path / "node-b"]
    for node in nodes:
        node.mkdir()
    for attempt in range(3):  # the free port can be taken by another program before torchrun binds it
        port, procs = free_port(), []
        for node in nodes:
            procs.append(torchrun("--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                                  "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "sat-test", "-m", "sat_cli",
                                  "caption", photos, "--db", "out.db", "--model", tiny_model, "--workers", "0", "-q",
                                  cwd=node, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}))
        outs = [p.communicate(timeout=300) for p in procs]
        if not any("EADDRINUSE" in err or "address already in use" in err.lower() for _, err in outs):
            break
    with_db = [n for n in nodes if (n / "out.db").exists()]
    assert len(with_db) == 1
    other = next(n for n in nodes if n not in with_db)
    assert not [p.name for p in other.iterdir() if p.name.startswith("out.db")]  # no -wal, no -shm either
    db = sqlite_utils.Database(with_db[0] / "out.db")
    assert db["images"].count == 4 and db["results"].count == 4 and db["runs"].count == 1


def test_a_rank_that_dies_is_reported_and_a_rerun_finishes(tmp_path, tiny_model):
    """Rank 1 is killed mid-run: torchrun reports it, the database keeps what rank 0 stored and is
    consistent, and a rerun captions the rest (each photo once)."""
    import os

    from PIL import Image

    photos = tmp_path / "many"
    photos.mkdir()
    base = Image.open(EXAMPLES / "rocket.jpg").convert("RGB").resize((96, 64))
    for i in range(60):
        im = base.copy()
        im.putpixel((i, 0), (i * 4, 0, 0))
        im.save(photos / f"{i:02d}.png")  # lossless: 60 distinct contents
    db_path = tmp_path / "dies.db"
    # Rank 1 kills itself right after its 3rd batch reached rank 0: rank 0 has by then stored at least
    # the first two batches of both ranks, and rank 1 cannot finish first (no polling for it).
    script = tmp_path / "rank1_dies.py"
    script.write_text(
        "import os, runpy, signal, sys\n"
        "from sat_cli.runtime import Dist\n"
        "if os.environ.get('RANK') == '1':\n"
        "    gather, calls = Dist.gather_to_main, []\n"
        "    def dying(self, obj):\n"
        "        out = gather(self, obj)\n"
        "        calls.append(1)\n"
        "        if len(calls) == 3:\n"
        "            os.kill(os.getpid(), signal.SIGKILL)\n"
        "        return out\n"
        "    Dist.gather_to_main = dying\n"
        "sys.argv[0] = 'sat'\n"
        "runpy.run_module('sat_cli', run_name='__main__')\n")
    common = ("caption", photos, "--db", db_path, "--model", tiny_model, "--workers", "0", "--batch-size", "2", "-q")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = torchrun("--standalone", "--nproc-per-node", "2", script, *common, env=env)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "rank" in err.lower()  # torchrun names the failed rank
    db = sqlite_utils.Database(db_path)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    partial = db["results"].count
    assert 8 <= partial < 60
    again = torchrun("--standalone", "--nproc-per-node", "2", "-m", "sat_cli", *common)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert sqlite_utils.Database(db_path)["results"].count == 60 and sqlite_utils.Database(db_path)["images"].count == 60


class _TwoRanks:
    """Rank 0 of a two-rank run whose rank 1 has no photos: collectives answer locally, and what
    the run asks of the process group is recorded."""

    rank, world, local_rank, main = 0, 2, 0, True

    def __init__(self, fail_at=None):
        self.calls, self.fail_at = [], fail_at

    def init_objects(self):
        self.calls.append("init")

    def gather_to_main(self, obj):
        self.calls.append("gather")
        if self.calls.count("gather") == self.fail_at:
            raise RuntimeError("Connection closed by peer")  # what gloo raises when rank 1 is gone
        return [obj, None]

    def broadcast(self, obj):
        return obj

    def close(self):
        self.calls.append("close")


def test_ranks_tear_the_process_group_down_after_the_last_round_but_not_after_a_failure(photos, tmp_path, tiny_model):
    """A rank that exits with its gloo group alive can abort at interpreter exit ("terminate called
    without an active exception"), and torchrun then reports the whole run failed: the group is
    destroyed once the rounds end, and left alone when a rank failed (its barrier would wait for a
    dead rank)."""
    import torch

    from sat_cli.captioning import CaptionOptions, caption_to_db
    from sat_cli.model.beam import DecodeSettings
    from sat_cli.model.checkpoint import load_checkpoint

    model = load_checkpoint(tiny_model).for_inference(torch.device("cpu"))
    options = CaptionOptions(batch_size=1, workers=0, quiet=True)
    ok = _TwoRanks()
    summary = caption_to_db(model, [str(photos)], str(tmp_path / "ok.db"), DecodeSettings(), options, dist=ok)
    assert ok.calls[-1] == "close" and ok.calls.count("close") == 1 and ok.calls.count("gather") >= 2
    assert summary.captioned == sqlite_utils.Database(tmp_path / "ok.db")["results"].count > 0
    failing = _TwoRanks(fail_at=2)
    with pytest.raises(RuntimeError, match="Connection closed"):
        caption_to_db(model, [str(photos)], str(tmp_path / "bad.db"), DecodeSettings(), options, dist=failing)
    assert "close" not in failing.calls
    assert sqlite_utils.Database(tmp_path / "bad.db")["runs"].get(1)["status"] == "failed"


def test_default_model_captions_the_examples(tmp_path):
    """No --model: the model shipped in the package (real weights, offline Lite0 encoder)."""
    result = run("caption", EXAMPLES, "--db", tmp_path / "ex.db", "--workers", "0", "--print", "-q")
    assert result.exit_code == 0, result.output
    lines = dict(line.split("\t") for line in result.stdout.strip().split("\n"))
    assert len(lines) == 5 and all(len(text.split()) >= 4 for text in lines.values())
    assert "cat" in lines[str(EXAMPLES / "chelsea.png")].split()
    db = sqlite_utils.Database(tmp_path / "ex.db")
    run_row = db["runs"].get(1)
    assert run_row["encoder"] == "timm:tf_efficientnet_lite0" and run_row["model_path"].endswith("default")
    assert json.loads(run_row["settings"])["beam_size"] == 3


def test_a_model_that_outputs_nan_gives_error_rows_not_a_crash(photos, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from conftest import build_tiny_model

    model = build_tiny_model(tmp_path / "nan")
    weights = load_file(str(model / "model.safetensors"))
    weights["decoder.fc.bias"] = torch.full_like(weights["decoder.fc.bias"], float("nan"))
    save_file(weights, str(model / "model.safetensors"))
    result = caption(photos, tmp_path / "n.db", model)
    assert result.exit_code == 1 and "0 captioned" in result.stderr and "4 failed" in result.stderr
    db = sqlite_utils.Database(tmp_path / "n.db")
    assert {r["error"] for r in db["images"].rows} == {
        "the model produced no caption (non-finite scores: the encoder's features may overflow; try --precision fp32)"}
    assert db["results"].count == 0

