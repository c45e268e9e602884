"""Steady-state `sat caption` throughput on a GPU: N distinct generated photos vs N/6, so the
fixed start-up cost cancels. Run on the lent GPU machine through bench/gpu_check.sh's set-up:
  PYTHONPATH=... python3 bench/gpu_throughput.py --images 12000 --precision fp16 fp32
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def make(args):
    i, folder = args
    import random

    from PIL import Image, ImageEnhance

    sources = sorted(p for p in (ROOT / "examples").glob("*.*") if p.suffix in (".png", ".jpg"))
    rng = random.Random(i)
    im = Image.open(sources[i % len(sources)]).convert("RGB")
    w, h = im.size
    x0, y0 = rng.randint(0, w // 4), rng.randint(0, h // 4)
    crop = im.crop((x0, y0, x0 + rng.randint(w // 2, w - x0), y0 + rng.randint(h // 2, h - y0)))
    crop = ImageEnhance.Color(crop).enhance(rng.uniform(0.6, 1.4)).resize((384, 288))
    crop.save(Path(folder) / f"img{i:06d}.jpg", quality=88)


def run(folder, db, precision, batch):
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "sat_cli", "caption", str(folder), "--db", str(db), "--device", "cuda",
                    "--precision", precision, "--batch-size", str(batch), "--workers", "12", "-q"], check=True)
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=12000)
    ap.add_argument("--precision", nargs="+", default=["fp16", "fp32"])
    ap.add_argument("--batch-size", type=int, default=128)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    big, small = tmp / "big", tmp / "small"
    big.mkdir()
    small.mkdir()
    n_small = args.images // 6
    t = time.perf_counter()
    with Pool() as pool:
        pool.map(make, [(i, big) for i in range(args.images)], chunksize=64)
    for p in sorted(big.iterdir())[:n_small]:
        (small / p.name).symlink_to(p)
    print(f"made {args.images} photos in {time.perf_counter() - t:.1f}s", flush=True)
    for precision in args.precision:
        t_big = run(big, tmp / f"{precision}.db", precision, args.batch_size)
        t_small = run(small, tmp / f"{precision}-small.db", precision, args.batch_size)
        rate = (args.images - n_small) / (t_big - t_small)
        print(f"{precision}: {args.images} images {t_big:.1f}s, {n_small} images {t_small:.1f}s -> steady state "
              f"{rate:.0f} images/s (batch {args.batch_size}, beam 3, start-up {t_small - n_small / rate:.1f}s)",
              flush=True)


if __name__ == "__main__":
    main()
