"""Options no other test touches, each checked by its effect: sat caption --max-len,
--no-repeat-ngram, --length-penalty, --precision, --no-recursive, --xmp-name stem; sat show --run;
sat search --run and --limit; sat eval --run."""

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import EXAMPLES, build_tiny_model, rows
from sat_cli.cli.main import cli


@pytest.fixture(scope="module")
def wordy_model(tmp_path_factory):
    """A tiny model that never wants to stop: its captions run to the length limit (12 by default)."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "wordy", end_bias=-30.0, seed=1)


@pytest.fixture
def two(tmp_path):
    folder = tmp_path / "two"
    folder.mkdir()
    shutil.copy(EXAMPLES / "chelsea.png", folder / "chelsea.png")
    shutil.copy(EXAMPLES / "coffee.png", folder / "coffee.png")
    return folder


def sat(*args, code=0):
    r = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == code, r.output
    return r


def caption(paths, db, model, *extra):
    return sat("caption", paths, "--db", db, "--model", model, "--workers", "0", "-q", *extra)


def captions_of(db, run=None):
    where = "WHERE results.run_id = ?" if run is not None else ""
    return rows(db, f"""SELECT images.path, results.run_id, captions.* FROM captions
                        JOIN results ON results.id = captions.result_id
                        JOIN images ON images.sha256 = results.sha256 {where} ORDER BY captions.id""",
                *([run] if run is not None else []))


def test_max_len_caps_the_caption_length(two, tmp_path, wordy_model):
    caption(two, tmp_path / "a.db", wordy_model, "--n-best", "2")
    assert {len(json.loads(c["tokens"])) for c in captions_of(tmp_path / "a.db")} == {12}  # the model's default
    caption(two, tmp_path / "b.db", wordy_model, "--max-len", "3", "--n-best", "2")
    caps = captions_of(tmp_path / "b.db")
    assert len(caps) == 4 and {len(json.loads(c["tokens"])) for c in caps} == {3}
    assert not any(c["finished"] for c in caps)
    maps = rows(tmp_path / "b.db", "SELECT words FROM attention_maps")
    assert {m["words"] for m in maps} == {3}


def test_no_repeat_ngram_forbids_repeated_words(two, tmp_path, wordy_model):
    caption(two, tmp_path / "a.db", wordy_model)
    repeats = [json.loads(c["tokens"]) for c in captions_of(tmp_path / "a.db")]
    assert any(len(set(w)) < len(w) for w in repeats)  # without it, 12 words from 12 repeat
    caption(two, tmp_path / "b.db", wordy_model, "--no-repeat-ngram", "1", "--max-len", "8")
    for c in captions_of(tmp_path / "b.db"):
        words = json.loads(c["tokens"])
        assert len(words) == 8 and len(set(words)) == 8, words
    caption(two, tmp_path / "c.db", wordy_model, "--no-repeat-ngram", "2")
    for c in captions_of(tmp_path / "c.db"):
        words = json.loads(c["tokens"])
        pairs = list(zip(words, words[1:]))
        assert len(set(pairs)) == len(pairs), words


def test_length_penalty_divides_the_score_by_the_length(two, tmp_path, tiny_model):
    caption(two, tmp_path / "a.db", tiny_model, "--length-penalty", "1.0", "--n-best", "3", "--beam", "3")
    caps = captions_of(tmp_path / "a.db")
    assert len(caps) == 6
    for c in caps:
        length = len(json.loads(c["tokens"])) + (1 if c["finished"] else 0)  # <end> counts when reached
        assert c["score"] == pytest.approx(c["logprob"] / length)
    run = rows(tmp_path / "a.db", "SELECT settings FROM runs")[0]
    assert json.loads(run["settings"])["length_penalty"] == 1.0
    scores = [c["score"] for c in caps if c["path"].endswith("chelsea.png")]
    assert scores == sorted(scores, reverse=True)  # ranked by the penalised score


def test_precision_is_used_and_recorded(two, tmp_path, tiny_model):
    caption(two, tmp_path / "a.db", tiny_model, "--precision", "fp32", "--device", "cpu")
    caption(two, tmp_path / "b.db", tiny_model, "--precision", "bf16", "--device", "cpu")
    assert rows(tmp_path / "a.db", "SELECT precision FROM runs")[0]["precision"] == "fp32"
    assert rows(tmp_path / "b.db", "SELECT precision FROM runs")[0]["precision"] == "bf16"
    fp32 = [c["logprob"] for c in captions_of(tmp_path / "a.db")]
    bf16 = [c["logprob"] for c in captions_of(tmp_path / "b.db")]
    assert fp32 != bf16  # the encoder ran in bfloat16: its features, so the log-probabilities, differ
    assert bf16 == pytest.approx(fp32, abs=0.5)


def test_no_recursive_skips_subfolders(photos, tmp_path, tiny_model):
    caption(photos, tmp_path / "a.db", tiny_model, "--no-recursive")
    names = {r["path"].rsplit("/", 1)[1] for r in rows(tmp_path / "a.db", "SELECT path FROM images")}
    assert names == {"chelsea.png", "coffee.png", "rocket.jpg"}
    caption(photos, tmp_path / "b.db", tiny_model)
    names = {r["path"].rsplit("/", 1)[1] for r in rows(tmp_path / "b.db", "SELECT path FROM images")}
    assert names == {"chelsea.png", "coffee.png", "rocket.jpg", "astronaut.png"}


def test_xmp_name_stem_writes_photo_xmp(two, tmp_path, tiny_model):
    if not shutil.which("exiftool"):
        pytest.skip("exiftool is not installed")
    caption(two, tmp_path / "a.db", tiny_model, "--xmp", "--xmp-name", "stem")
    assert sorted(p.name for p in two.iterdir()) == ["chelsea.png", "chelsea.xmp", "coffee.png", "coffee.xmp"]
    best = {c["path"]: c["text"] for c in captions_of(tmp_path / "a.db") if c["rank"] == 1}
    writes = rows(tmp_path / "a.db", "SELECT target, caption, kind FROM metadata_writes ORDER BY target")
    assert [(w["target"], w["kind"]) for w in writes] == [(str(two / "chelsea.xmp"), "sidecar"),
                                                          (str(two / "coffee.xmp"), "sidecar")]
    for w in writes:
        photo = w["target"][: -len(".xmp")] + ".png"
        assert w["caption"] == best[photo] and best[photo] in Path(w["target"]).read_text()


@pytest.fixture
def two_runs(two, tmp_path, wordy_model):
    """Run 1: captions of 2 words; run 2: of 4 words (same photos, same model)."""
    db = tmp_path / "runs.db"
    caption(two, db, wordy_model, "--max-len", "2", "--n-best", "3", "--beam", "3")
    caption(two, db, wordy_model, "--max-len", "4", "--n-best", "3", "--beam", "3")
    return db


def test_show_run_draws_that_runs_caption(two_runs, two, tmp_path):
    for run, words in ((1, 2), (2, 4)):
        expected = [c["text"] for c in captions_of(two_runs, run) if c["path"].endswith("coffee.png") and c["rank"] == 1]
        out = sat("show", two_runs, "coffee.png", "--run", run, "--out", tmp_path / f"r{run}.png")
        assert f"{expected[0]!r} ({words} words, run {run})" in out.output
        assert (tmp_path / f"r{run}.png").stat().st_size > 0
    newest = sat("show", two_runs, "coffee.png", "--out", tmp_path / "n.png")
    assert "(4 words, run 2)" in newest.output


def test_search_run_and_limit(two_runs):
    all_caps = captions_of(two_runs)
    word = max({w for c in all_caps for w in json.loads(c["tokens"])},
               key=lambda w: (sum(w in json.loads(c["tokens"]) for c in all_caps), w))
    having = [c for c in all_caps if word in json.loads(c["tokens"])]
    assert len(having) > 3 and {c["run_id"] for c in having} == {1, 2}
    full = json.loads(sat("search", two_runs, word, "--json", "--limit", "100").output)
    assert len(full) == len(having)
    for run in (1, 2):
        hits = json.loads(sat("search", two_runs, word, "--json", "--run", run, "--limit", "100").output)
        assert hits and {h["run"] for h in hits} == {run}
        assert sorted((h["path"], h["rank"]) for h in hits) == sorted(
            (c["path"], c["rank"]) for c in having if c["run_id"] == run)
    limited = json.loads(sat("search", two_runs, word, "--json", "--limit", "3").output)
    assert limited == full[:3]  # the limit is reached: the three best matches, in order
    table = sat("search", two_runs, word, "--limit", "3").output
    assert "3 matches" in table


def test_eval_run_scores_that_runs_captions(two_runs, two, tmp_path):
    from sat_cli.evaluation.metrics import score_captions

    refs = {"chelsea.png": ["a cat lying on a red blanket", "a cat on a table"],
            "coffee.png": ["a cup of coffee on a table", "a white cup with coffee"]}
    ref_file = tmp_path / "refs.csv"
    ref_file.write_text("image,caption\n" + "".join(f"{k},{c}\n" for k, cs in refs.items() for c in cs))
    base = ["eval", two_runs, "--references", ref_file, "--images", two, "--no-meteor", "--json"]
    for run in (1, 2):
        got = json.loads(sat(*base, "--run", run).output)
        hyps = {str(two / c["path"].rsplit("/", 1)[1]): c["text"] for c in captions_of(two_runs, run) if c["rank"] == 1}
        expected = score_captions({str(two / k): v for k, v in refs.items()}, hyps, meteor=False)
        assert got["images"] == 2
        for metric in ("BLEU-1", "BLEU-4", "CIDEr", "ROUGE-L"):
            assert got[metric] == pytest.approx(expected[metric], abs=6e-4), (run, metric)  # printed to 3 places
    one, other = (json.loads(sat(*base, "--run", r).output) for r in (1, 2))
    assert one["BLEU-1"] != other["BLEU-1"]  # different captions, different scores
