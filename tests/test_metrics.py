"""BLEU-1..4 and ROUGE-L from `score_captions` against values worked by hand on a small example; `sat
--version` and the `sat encoders` table."""

import math

import pytest


def test_bleu_and_rouge_l_equal_values_worked_by_hand():
    from sat_cli.evaluation.metrics import score_captions

    # hypothesis (6 words) against one reference (8 words):
    #   1-grams 6/6 match; 2-grams 4/5 (not "on grass"); 3-grams 3/4; 4-grams 2/3
    #   brevity penalty exp(1 - 8/6); BLEU-n = BP * (p1 ... pn) ** (1/n)
    #   ROUGE-L: longest common subsequence 6 (the whole hypothesis), P = 6/6, R = 6/8,
    #   F with beta 1.2 = (1 + 1.44) P R / (R + 1.44 P)
    refs = {"img": ["a black dog runs on the green grass"]}
    hyps = {"img": "a black dog runs on grass"}
    got = score_captions(refs, hyps, meteor=False)
    bp = math.exp(1 - 8 / 6)
    want = {"BLEU-1": bp, "BLEU-2": bp * (4 / 5) ** (1 / 2), "BLEU-3": bp * (1 * 4 / 5 * 3 / 4) ** (1 / 3),
            "BLEU-4": bp * (1 * 4 / 5 * 3 / 4 * 2 / 3) ** (1 / 4),
            "ROUGE-L": (1 + 1.2**2) * 1 * 0.75 / (0.75 + 1.2**2 * 1)}
    for name, value in want.items():
        assert got[name] == pytest.approx(100 * value, abs=1e-4), name


def test_version_and_the_encoders_table():
    import subprocess
    import sys

    from sat_cli import __version__

    def sat(*args):
        return subprocess.run([sys.executable, "-m", "sat_cli", *args], capture_output=True, text=True, timeout=120,
                              env={**__import__("os").environ, "COLUMNS": "250"})

    r = sat("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"sat, version {__version__}"
    r = sat("encoders")
    assert r.returncode == 0, r.stderr
    import re

    rows = dict(re.findall(r"^(\S+)  \(plugin (\S+)\)$", r.stdout, flags=re.M))
    # one block per encoder prefix, headed by the plugin module that provides it
    assert rows == {"torchvision": "sat_cli_plugins.torchvision_resnet", "timm": "sat_cli_plugins.timm_models",
                    "vit": "sat_cli_plugins.vit_grid"}


def test_cider_d_matches_pycocoevalcap_on_repeats_and_short_captions():
    """CIDEr-D against pycocoevalcap where its details matter: repeated n-grams (the term frequency
    and its clipping by the reference's), captions of one and two words (bigram length, no 3- or
    4-grams), a caption equal to a reference and one sharing nothing."""
    from pycocoevalcap.cider.cider import Cider

    from sat_cli.evaluation.cider import CiderD

    refs = {0: ["a dog runs on the grass", "a brown dog running", "dog on grass"],
            1: ["a man rides a red bike", "a cyclist on a road", "man riding bicycle"],
            2: ["two cats sleep on a sofa", "cats on a couch", "two cats sleeping"],
            3: ["a dog and a dog and a cat", "dogs playing with a cat", "a cat and two dogs"]}
    cases = [{0: "dog dog dog dog", 1: "a man a man a man", 2: "cats", 3: "a dog and a dog"},
             {0: "dog", 1: "man riding", 2: "two cats sleeping", 3: "a dog and a dog and a cat"},
             {0: "a dog runs on the grass on the grass on the grass", 1: "red", 2: "a sofa", 3: "zebra"}]
    mine = CiderD([[r.split() for r in refs[k]] for k in range(4)])
    for hyps in cases:
        reference, per_image = Cider().compute_score(refs, {k: [v] for k, v in hyps.items()})
        scores = [mine.score(hyps[k].split(), k) for k in range(4)]
        assert scores == pytest.approx(list(per_image), rel=1e-9, abs=1e-12), hyps
        assert sum(scores) / 4 == pytest.approx(reference, rel=1e-9)
