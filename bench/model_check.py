"""Every target a default model must meet (issue 17), measured on one checkpoint. Prints its figures
and which targets are met; asserts nothing.

    python bench/model_check.py --model runs/r2/best            # against the shipped model's speed
    python bench/model_check.py --model runs/r2/best --json --photos 200

Runs, each as its own process: `sat eval` on the val split of ../shared/data (beam 3; the COCO and
Flickr8k parts scored apart), `bench/pointing_bench.py` (mosaic pointing game, map entropy, person
grounding), the size of the checkpoint's files, and `sat caption` on --photos val photos with this
model and with --baseline (default: the shipped model), interleaved, --rounds times (images/s from
the caption call's own wall time; start-up included, so use a few hundred photos on a quiet machine).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
SHIPPED = ROOT / "sat_cli" / "models" / "default"

TARGETS = [  # (figure, what, test)
    ("coco_cider", "COCO part CIDEr >= 80", lambda v: v >= 80),
    ("flickr_bleu4", "Flickr8k part BLEU-4 >= 22", lambda v: v >= 22),
    ("flickr_meteor", "Flickr8k part METEOR >= 20.5", lambda v: v >= 20.5),
    ("pointing_share", "mosaic pointing share >= 0.5", lambda v: v >= 0.5),
    ("entropy_ratio", "map entropy <= 0.8 of uniform", lambda v: v <= 0.8),
    ("grounding_ratio", "person grounding >= 2.0x the box area", lambda v: v >= 2.0),
    ("peak_on_person", "peak cell on a person >= 0.8", lambda v: v >= 0.8),
    ("size_mb", "shipped files < 40 MB", lambda v: v < 40),
    ("speed_ratio", "sat caption >= 0.6x the baseline's images/s", lambda v: v >= 0.6),
]


def run_json(cmd: list[str]) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def caption_speed(model: Path, photos: list[Path], beam: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        for p in photos:
            (folder / p.name).symlink_to(p)
        cmd = [sys.executable, "-m", "sat_cli", "caption", str(folder), "--db", str(Path(tmp) / "out.db"),
               "--beam", str(beam), "--model", str(model), "-q"]
        started = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        return len(photos) / (time.perf_counter() - started)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(SHIPPED), help="checkpoint folder (default: the shipped model)")
    parser.add_argument("--baseline", default=str(SHIPPED), help="model whose caption speed is the reference")
    parser.add_argument("--photos", type=int, default=150, help="val photos for the speed comparison")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--beam", type=int, default=3)
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: eval, pointing, speed")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    model = Path(args.model)
    figures: dict = {"model": str(model)}

    if "eval" not in skip:
        ev = run_json([sys.executable, "-m", "sat_cli", "eval", "--model", str(model), "--data",
                       str(DATA / "captions.json"), "--split", "val", "--beam", str(args.beam), "--json", "-q"])
        parts = ev.get("parts", {})
        figures.update(cider_all=ev["CIDEr"], coco_cider=parts.get("coco", {}).get("CIDEr"),
                       coco_bleu4=parts.get("coco", {}).get("BLEU-4"),
                       flickr_bleu4=parts.get("flickr8k", {}).get("BLEU-4"),
                       flickr_meteor=parts.get("flickr8k", {}).get("METEOR"),
                       flickr_cider=parts.get("flickr8k", {}).get("CIDEr"), eval=ev)
    if "pointing" not in skip:
        pt = run_json([sys.executable, str(ROOT / "bench" / "pointing_bench.py"), "--model", str(model),
                       "--beam", str(args.beam), "--json"])
        figures.update(pointing_share=pt["pointing_share"], pointing_hits=pt["pointing_hits"],
                       entropy_ratio=pt["entropy_ratio"], grounding_ratio=pt["grounding"]["grounding_ratio"],
                       peak_on_person=pt["grounding"]["peak_on_person"],
                       inside_share=pt["grounding"]["inside_share"], box_area=pt["grounding"]["box_area"])
    files = [f for f in model.iterdir() if f.is_file()]
    figures["size_mb"] = round(sum(f.stat().st_size for f in files) / 1e6, 2)
    if "speed" not in skip:
        records = json.loads((DATA / "captions.json").read_text())["images"]
        photos = [DATA / r["filepath"] / r["filename"] for r in records if r["split"] == "val"][: args.photos]
        this, base = [], []
        for _ in range(args.rounds):
            this.append(caption_speed(model, photos, args.beam))
            base.append(caption_speed(Path(args.baseline), photos, args.beam))
        figures.update(speed_images_s=round(max(this), 2), baseline_images_s=round(max(base), 2),
                       speed_ratio=round(max(this) / max(base), 3))
    figures["targets"] = {what: (None if figures.get(key) is None else bool(test(figures[key])))
                          for key, what, test in TARGETS}
    if args.json:
        print(json.dumps(figures))
    else:
        print(f"model {model} ({figures['size_mb']} MB)")
        for key, what, _ in TARGETS:
            met = figures["targets"][what]
            mark = "-" if met is None else ("met" if met else "NOT met")
            print(f"  {what:46s} {figures.get(key)!s:>10}  {mark}")
        if "speed_images_s" in figures:
            print(f"  sat caption: {figures['speed_images_s']} vs {figures['baseline_images_s']} images/s "
                  f"({args.photos} photos, best of {args.rounds})")
    return figures


if __name__ == "__main__":
    if shutil.which("java") is None:
        print("note: no java, so METEOR is skipped", file=sys.stderr)
    main()
