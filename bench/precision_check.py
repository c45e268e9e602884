"""Does bf16 autocast of the encoder change the captions on this CPU? (issue 17, part 1). Prints its
figures; asserts nothing.

    python bench/precision_check.py                      # the shipped model, every val photo
    python bench/precision_check.py --model runs/r2f/best --photos 500 --json

Captions the val photos of ../shared/data with `sat caption --precision fp32` and with
`--precision bf16` (the encoder under bf16 autocast; beam search stays fp32), each run as its own
process, alternating fp32 and bf16 for --rounds rounds. Reports how many photos get the same best
caption (over the first --agree photos, and over all), the val figures of each run (`sat eval DB
--references`, the COCO and Flickr8k parts apart) and each run's images/s (wall time of the caption
process, start-up included; compare only on a quiet machine). The rule for `--precision auto` on a
CPU with AMX: bf16 only if >= 95% of 500 val photos keep their caption and CIDEr moves by < 0.5.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"


def caption(folder: Path, db: Path, precision: str, model: str | None, beam: int) -> float:
    db.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "sat_cli", "caption", str(folder), "--db", str(db), "--beam", str(beam),
           "--precision", precision, "--device", "cpu", "-q"] + (["--model", model] if model else [])
    started = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - started


def best_captions(db: Path) -> dict[str, str]:
    import sqlite_utils

    from sat_cli.store.queries import best_captions as stored

    return {Path(p).name: text for p, text in stored(sqlite_utils.Database(db)).items()}


def evaluate(db: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "sat_cli", "eval", str(db), "--references",
                          str(DATA / "captions.json"), "--json", "-q"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder (default: the shipped model)")
    parser.add_argument("--photos", type=int, default=0, help="the first N val photos (default: all 1,295)")
    parser.add_argument("--agree", type=int, default=500, help="agreement is also reported over the first N")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--beam", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    records = json.loads((DATA / "captions.json").read_text())["images"]
    photos = [DATA / r["filepath"] / r["filename"] for r in records if r["split"] == "val"]
    photos = photos[: args.photos] if args.photos else photos
    figures: dict = {"model": args.model or "shipped", "photos": len(photos)}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        for p in photos:
            (folder / p.name).symlink_to(p)
        seconds: dict[str, list[float]] = {"fp32": [], "bf16": []}
        for _ in range(args.rounds):
            for precision in ("fp32", "bf16"):
                seconds[precision].append(caption(folder, Path(tmp) / f"{precision}.db", precision, args.model,
                                                  args.beam))
        caps = {p: best_captions(Path(tmp) / f"{p}.db") for p in seconds}
        names = [p.name for p in photos]
        first = names[: args.agree]
        same = [n for n in names if caps["fp32"].get(n) == caps["bf16"].get(n)]
        figures["agree_first"] = round(sum(caps["fp32"].get(n) == caps["bf16"].get(n) for n in first) / len(first), 4)
        figures["agree_first_n"] = len(first)
        figures["agree_all"] = round(len(same) / len(names), 4)
        for precision in seconds:
            ev = evaluate(Path(tmp) / f"{precision}.db")
            parts = ev.get("parts", {})
            figures[precision] = {
                "CIDEr": ev["CIDEr"], "BLEU-4": ev["BLEU-4"],
                "coco_CIDEr": parts.get("coco", {}).get("CIDEr"),
                "flickr8k_BLEU-4": parts.get("flickr8k", {}).get("BLEU-4"),
                "images_s": round(len(photos) / min(seconds[precision]), 2),
            }
        figures["cider_change"] = round(figures["bf16"]["CIDEr"] - figures["fp32"]["CIDEr"], 3)
        figures["bf16_ok"] = figures["agree_first"] >= 0.95 and abs(figures["cider_change"]) < 0.5
        figures["differing"] = [(n, caps["fp32"].get(n), caps["bf16"].get(n)) for n in first
                                if caps["fp32"].get(n) != caps["bf16"].get(n)][:10]
    if args.json:
        print(json.dumps(figures))
    else:
        print(f"{figures['photos']} val photos, model {figures['model']}")
        print(f"  same best caption: {figures['agree_first']:.1%} of the first {figures['agree_first_n']}, "
              f"{figures['agree_all']:.1%} of all")
        for precision in ("fp32", "bf16"):
            f = figures[precision]
            print(f"  {precision}: CIDEr {f['CIDEr']} (COCO part {f['coco_CIDEr']}), Flickr8k BLEU-4 "
                  f"{f['flickr8k_BLEU-4']}, {f['images_s']} images/s")
        print(f"  CIDEr change {figures['cider_change']:+.3f}; bf16 for --precision auto: "
              f"{'yes' if figures['bf16_ok'] else 'no'}")
        for n, a, b in figures["differing"]:
            print(f"    {n}: fp32 {a!r} | bf16 {b!r}")
    return figures


if __name__ == "__main__":
    main()
