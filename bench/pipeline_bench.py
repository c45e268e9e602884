"""The caption pipeline's own ceiling (issue 22, part 3): the real `caption_to_db` path (walk,
workers, batching, storage with attention maps, progress) with the model's encode and decode
replaced by null ones that cost ~nothing (3 captions of 10 words with 12x12 attention maps each).

    nice -n 15 .venv/bin/python bench/pipeline_bench.py [--photos 400] [--workers 2] [--batch 64]

Prints the main process's CPU milliseconds per image (time.process_time around the run: what a GPU
can never beat) and the images/s of one loader worker (the dataset's hash + decode + resize run
in this process on COCO photos of ../shared/data). The machine's load is printed with each figure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"


def load() -> str:
    return open("/proc/loadavg").read().split()[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=400)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()

    import numpy as np

    import sat_cli
    from sat_cli import pipeline
    from sat_cli.captioning import CaptionOptions, caption_to_db
    from sat_cli.inputs.images import Sources
    from sat_cli.records import Caption

    images = json.loads((DATA / "captions.json").read_text())["images"][: args.photos]
    paths = [str(DATA / im["filepath"] / im["filename"]) for im in images]
    cap = sat_cli.load(device="cpu")
    model = cap.model
    grid = model.grid
    words = ["a", "man", "riding", "a", "wave", "on", "top", "of", "a", "surfboard"]
    maps = np.full((len(words), *grid), 1.0 / (grid[0] * grid[1]), dtype=np.float32)

    def null_encode(encoder, pixels, device, precision):
        return pixels

    def null_decode(model, features, settings, attention=True):
        return [[Caption(r, " ".join(words), list(words), -5.0 - r, -1.0 - r, True, maps if attention else None)
                 for r in (1, 2, 3)] for _ in range(len(features))]

    pipeline.encode, pipeline.decode = null_encode, null_decode

    # one loader worker: the dataset's work per photo, in this process
    ds = Sources(model.preprocess.size, getattr(model.preprocess, "interpolation", "bicubic"))
    n = min(len(paths), 200)
    t = time.perf_counter()
    for i, p in enumerate(paths[:n]):
        ds[(i, p)]
    rate = n / (time.perf_counter() - t)
    print(f"one loader worker: {rate:.0f} COCO photos/s (hash + decode + resize; target >= 400) (load {load()})")

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        for p in paths:
            os.symlink(p, folder / os.path.basename(p))
        options = CaptionOptions(batch_size=args.batch, workers=args.workers, quiet=False)
        cpu, wall = time.process_time(), time.perf_counter()
        summary = caption_to_db(model, [str(folder)], str(Path(tmp) / "x.db"), cap.settings(), options)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    per = 1000 * cpu / max(summary.captioned, 1)
    print(f"null model, {summary.captioned} photos, {args.workers} workers, batch {args.batch}: main process "
          f"{per:.2f} ms CPU/image (ceiling {1000 / per:.0f} images/s; target <= 0.2 ms), wall "
          f"{summary.captioned / wall:.0f} images/s (load {load()})")


if __name__ == "__main__":
    main()
