"""JPEG draft mode (DCT-domain downscaling before the resize, `inputs/images.load_image`): what it
saves and whether it changes captions. The photos of ../shared/data are at most 384 px, where draft
mode does nothing at the default model's 384 px; so each of N COCO val photos is upscaled by
--scale (bicubic, JPEG quality 92, as a camera's large JPEG) into a temporary folder, then captioned
with the default model: draft mode as sat uses it (decode at the smallest DCT scale that still covers
the model's size), draft mode asked for twice the model's size, and no draft mode; and the original
photos for comparison.

    nice -n 15 .venv/bin/python bench/draft_bench.py [--photos 100] [--scale 4]

Prints the decode + resize CPU ms per photo of each, how many best captions agree with the
full decode and with the original photo's, and CIDEr / BLEU-4 against the human captions.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=100)
    ap.add_argument("--scale", type=int, default=4)
    args = ap.parse_args()

    from PIL import Image, JpegImagePlugin

    import sat_cli
    from sat_cli.inputs.images import load_image
    from sat_cli.runtime import keep_freed_memory

    keep_freed_memory()
    images = [im for im in json.loads((DATA / "captions.json").read_text())["images"]
              if im["split"] == "val" and "cocoid" in im][: args.photos]
    cap = sat_cli.load(device="cpu")
    size = cap.model.preprocess.size
    draft = JpegImagePlugin.JpegImageFile.draft
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for im in images:
            with Image.open(DATA / im["filepath"] / im["filename"]) as photo:
                big = photo.convert("RGB").resize((photo.width * args.scale, photo.height * args.scale),
                                                  Image.Resampling.BICUBIC)
            paths.append(Path(tmp) / im["filename"])
            big.save(paths[-1], quality=92)
        texts, cost = {}, {}
        modes = {"draft": draft, "draft x2": lambda self, m, size: draft(self, m, tuple(2 * v for v in size)),
                 "full": lambda self, m, size: None}
        for mode, patch in modes.items():
            JpegImagePlugin.JpegImageFile.draft = patch
            try:
                cpu = time.process_time()
                for p in paths:
                    load_image(str(p), size)
                cost[mode] = 1000 * (time.process_time() - cpu) / len(paths)
                texts[mode] = [r.text for r in cap([str(p) for p in paths], workers=0)]
            finally:
                JpegImagePlugin.JpegImageFile.draft = draft
    texts["original"] = [r.text for r in cap([str(DATA / im["filepath"] / im["filename"]) for im in images], workers=0)]
    from sat_cli.evaluation.metrics import score_captions

    refs = {i: [s["raw"] for s in im["sentences"]] for i, im in enumerate(images)}
    print(f"{len(paths)} COCO val photos upscaled x{args.scale} (about {384 * args.scale} px), default model:")
    for mode, got in texts.items():
        scores = score_captions(refs, dict(enumerate(got)), meteor=False)
        same = sum(a == b for a, b in zip(got, texts["full"]))
        same_orig = sum(a == b for a, b in zip(got, texts["original"]))
        spent = f"decode + resize {cost[mode]:.1f} ms CPU/photo, " if mode in cost else "(the photos as stored) "
        print(f"  {mode:9s} {spent}best caption as without draft mode {same}/{len(got)}, as on the original "
              f"photo {same_orig}/{len(got)}; CIDEr {scores['CIDEr']:.1f}, BLEU-4 {scores['BLEU-4']:.1f}")


if __name__ == "__main__":
    main()
