"""A short soak: bench/soak.py on a small generated folder of every kind of image plus hostile
entries, killed twice with SIGKILL and resumed; the database ends complete and consistent. Each killed
run kills itself right after its second committed batch, so the two kills land mid-run however slow
the machine is."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parent.parent / "bench" / "soak.py"


@pytest.mark.slow
def test_soak_killed_twice_ends_complete_and_consistent():
    out = subprocess.run([sys.executable, str(SOAK), "--images", "240", "--kills", "2", "--tiny", "--kill-after-batches", "2",
                          "--workers", "0", "--json"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    figures = json.loads(out.stdout)
    assert figures["kills"] == 2 and figures["integrity_check"] == "ok"
    killed, last = figures["runs"][:2], figures["runs"][2]
    assert [r["killed"] for r in figures["runs"]] == [True, True, False]
    # every run stored something and none stored everything: the kills landed mid-run, after commits
    assert all(0 < r["new_results"] < 240 for r in killed) and last["new_results"] > 0
    assert figures["good_captioned"] == figures["good_with_one_best_caption"] == 240
    assert figures["hostile_failed_once"] == figures["hostile"] >= 10 and figures["unexpected_rows"] == 0
    assert figures["runs"][-1]["returncode"] == 1  # finished; exit 1 because the hostile entries failed
