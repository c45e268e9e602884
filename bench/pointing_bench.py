"""Pointing game and person grounding: does a model's attention fall where its words are?

1. mosaic: the pointing game on 2x2 mosaics (below).
2. grounding: every COCO photo of the shared val split with person boxes
   (`coco/person_boxes.json`, 277 photos) is captioned (beam 3); for each generated person word
   (man, woman, people, player, skier, ...) the attention mass inside the union of the photo's person
   boxes against the share of the grid those boxes cover (ratio 1.0 = a uniform map), and how often
   the map's peak cell has its centre on a person (sat_cli.evaluation.grounding).

The pointing game:
Builds 2x2 mosaics of four real COCO photos of the shared val split, captions each mosaic with the
model (beam 3), and for every generated word that belongs to exactly one of the four photos (by
their human captions; function words and shared words are skipped) measures the attention mass on
that photo's quadrant (0.25 = chance). Also the maps' entropy relative to a uniform map (1.0 = no
information) and their mean peak weight. Prints the figures; asserts nothing.

    python bench/pointing_bench.py                       # the shipped model
    python bench/pointing_bench.py --model runs/x/best --mosaics 200 --json
    python bench/pointing_bench.py --only grounding --examples 5
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "captions.json"


def coco_val(data: Path):
    """(image paths, tokenized captions) of the COCO photos of the val split."""
    records = json.loads(data.read_text())["images"]
    chosen = [r for r in records if r["split"] == "val" and r.get("source", "coco") == "coco"]
    paths = [str(data.parent / r["filepath"] / r["filename"]) for r in chosen]
    return paths, [[s["tokens"] for s in r["sentences"]] for r in chosen]


def person_val(data: Path, boxes_file: Path):
    """(image paths, person boxes) of the val photos that have person boxes."""
    records = json.loads(data.read_text())["images"]
    boxes = json.loads(boxes_file.read_text())["boxes"]
    chosen = [r for r in records if r["split"] == "val" and boxes.get(r["filename"])]
    return [str(data.parent / r["filepath"] / r["filename"]) for r in chosen], [boxes[r["filename"]] for r in chosen]


def grounding(cap, args) -> dict:
    from sat_cli.evaluation.grounding import score

    data = Path(args.data)
    paths, boxes = person_val(data, Path(args.boxes) if args.boxes else data.parent / "coco" / "person_boxes.json")
    started = time.perf_counter()
    results = cap(paths, beam=args.beam, n_best=1, batch_size=args.batch_size)
    seconds = time.perf_counter() - started
    bad = [r.error for r in results if r.error]
    if bad:
        sys.exit(f"{len(bad)} photos failed: {bad[0]}")
    outcome = score([(r.words, r.attention) for r in results], boxes)
    figures = {**outcome.to_dict(), "seconds": round(seconds, 1)}
    if not args.json:
        print(f"person grounding: {len(paths)} val photos with person boxes, {len(outcome.scored)} person words "
              f"of {outcome.words} words, {seconds:.1f} s")
        print(f"  attention inside the person boxes {outcome.inside:.3f} vs their area {outcome.area:.3f}: "
              f"{outcome.ratio:.2f}x (uniform 1.0); peak cell on a person {outcome.peak:.3f}")
        for i in range(min(args.examples, len(results))):
            words = [f"{s.word}:{s.inside:.2f}/{s.area:.2f}{'*' if s.peak_on_person else ''}"
                     for s in outcome.scored if s.photo == i]
            print(f"  [{i}] {results[i].text!r}  {' '.join(words)}")
    return figures


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder (default: the shipped model)")
    parser.add_argument("--data", default=str(DATA), help="Karpathy-split JSON with a val split")
    parser.add_argument("--mosaics", type=int, default=200)
    parser.add_argument("--beam", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--examples", type=int, default=0, help="print this many mosaics' captions and shares")
    parser.add_argument("--only", choices=["mosaic", "grounding"], help="one part (default: both)")
    parser.add_argument("--boxes", help="person boxes JSON (default: coco/person_boxes.json beside --data)")
    args = parser.parse_args(argv)

    import sat_cli

    cap = sat_cli.load(args.model, device="cpu")
    figures = {"model": cap.path}
    if args.only != "grounding":
        figures.update(mosaic_game(cap, args))
    if args.only != "mosaic":
        figures["grounding"] = grounding(cap, args)
    if args.json:
        print(json.dumps(figures))
    return figures


def mosaic_game(cap, args) -> dict:
    from PIL import Image

    from sat_cli.evaluation.pointing import content_words, mosaic, mosaic_sets, score

    paths, captions = coco_val(Path(args.data))
    words = [content_words(c) for c in captions]
    sets = mosaic_sets(len(paths), args.mosaics, args.seed)
    size = cap.preprocess.size
    photos = {}

    def photo(i):
        if i not in photos:
            with Image.open(paths[i]) as im:
                photos[i] = im.convert("RGB")
        return photos[i]

    images = [mosaic([photo(i) for i in four], size) for four in sets]
    started = time.perf_counter()
    results = cap(images, beam=args.beam, n_best=1, batch_size=args.batch_size)
    seconds = time.perf_counter() - started
    bad = [r.error for r in results if r.error]
    if bad:
        sys.exit(f"{len(bad)} mosaics failed: {bad[0]}")
    outcome = score([(r.words, r.attention) for r in results], [[words[i] for i in four] for four in sets])
    figures = {"grid": list(results[0].attention.shape[1:]), **outcome.to_dict(), "seconds": round(seconds, 1)}
    if not args.json:
        print(f"model {cap.path}: {outcome.mosaics} mosaics of {len(paths)} COCO val photos, grid "
              f"{figures['grid'][0]}x{figures['grid'][1]}, beam {args.beam}, {seconds:.1f} s")
        print(f"  pointing share on the owning photo: {outcome.share:.3f} (chance 0.25) over "
              f"{len(outcome.scored)} of {outcome.words} words; its quadrant the most attended: {outcome.hits:.3f}")
        print(f"  map entropy / uniform: {outcome.entropy:.3f}; mean peak weight {outcome.peak:.4f} "
              f"(uniform {1 / (figures['grid'][0] * figures['grid'][1]):.4f})")
    for i in range(min(args.examples, len(results))):
        scored = [f"{s.word}->{s.tile}:{s.share:.2f}" for s in outcome.scored if s.mosaic == i]
        print(f"  [{i}] {results[i].text!r}  {' '.join(scored)}")
    return figures


if __name__ == "__main__":
    main()
