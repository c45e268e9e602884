"""Training benchmark on this machine. Prints its figures; asserts nothing.

  python bench/train_bench.py                 # both parts
  python bench/train_bench.py --only cache    # cache | epoch

1. cache: training samples/s reading cached features vs re-running the frozen encoder
   (tf_efficientnet_lite0) on the images at every step; same data (the shared train split), same
   model (the reference recipe: 512/512/512, dropout 0.5, batch 32), same batches.
2. epoch: the set-up (feature cache) and one full epoch over the shared train split with cached
   features plus its validation, for the reference recipe and the default model's recipe, and the
   default model's training time as recorded in its checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "captions.json"
OUT = ROOT / "bench" / "out"


CACHE = OUT / "cache"


def trainer(**overrides):
    from sat_cli.training import TrainConfig
    from sat_cli.training.trainer import Trainer

    cfg = TrainConfig(data=str(DATA), out=str(OUT / "train_bench"), cache_dir=str(CACHE), quiet=True,
                      meteor=False, **overrides)
    t = Trainer(cfg)
    t.setup()
    return t


def step(t, idx, feats):
    from torch.nn.utils import clip_grad_norm_

    from sat_cli.training.losses import caption_loss

    lengths = t.lengths[idx]
    order = lengths.argsort(descending=True, stable=True)
    idx, lengths, feats = idx[order], lengths[order], feats[order]
    caps = t.caps[idx, : int(lengths.max())]
    logits, alphas, _ = t.decoder(feats, caps, lengths.tolist())
    loss, _ = caption_loss(logits, alphas, caps, lengths, 1.0, 0.0, t.vocab.pad)
    t.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    clip_grad_norm_(t.decoder.parameters(), 5.0)
    t.optimizer.step()


def part_cache(steps: int):
    print(f"== feature cache: {steps} training steps of batch 32 each way ==")
    t = trainer()
    t.decoder.train()
    from sat_cli.training.data import length_batches, pixel_batches

    batches = length_batches(t.lengths.tolist(), t.cfg.batch_size, t.cfg.seed, 0)[: steps + 2]
    for b in batches[:2]:  # warm-up
        idx = torch.tensor(b)
        step(t, idx, t.train_feats[t.image_index[idx]].float())
    start = time.perf_counter()
    n = 0
    for b in batches[2:]:
        idx = torch.tensor(b)
        step(t, idx, t.train_feats[t.image_index[idx]].float())
        n += len(b)
    cached = n / (time.perf_counter() - start)
    print(f"cached features:               {cached:7.1f} samples/s")
    start = time.perf_counter()
    n = 0
    index = t.image_index.tolist()
    groups = [[index[i] for i in b] for b in batches[2:]]
    for b, pixels in zip(batches[2:], pixel_batches([e.path for e in t.train_entries], t.encoder.preprocess, groups,
                                                    t.workers)):
        idx = torch.tensor(b)
        with torch.no_grad():
            feats = t.encoder(pixels)  # the frozen encoder, every step
        step(t, idx, feats)
        n += len(b)
    rerun = n / (time.perf_counter() - start)
    print(f"re-running the frozen encoder: {rerun:7.1f} samples/s  (images decoded in {t.workers} worker(s))")
    print(f"ratio: {cached / rerun:.2f}x")


def part_epoch():
    from sat_cli.progress import NullProgress
    from sat_cli.runtime import StopSignal
    from sat_cli.training.loop import xent_epoch

    recipes = [("reference recipe (224 px, 7x7 grid)", {}),
               ("default-model recipe (384 px, 12x12 grid, label smoothing 0.1)",
                {"image_size": 384, "label_smoothing": 0.1})]
    for label, overrides in recipes:
        print(f"== one epoch over the shared train split, cached features, {label} ==")
        before = sum(1 for _ in CACHE.rglob("*.npy"))
        start = time.perf_counter()
        t = trainer(epochs=1, **overrides)
        built = sum(1 for _ in CACHE.rglob("*.npy")) - before
        print(f"set-up (vocabulary; features of {built} images computed, the rest read from the cache): "
              f"{time.perf_counter() - start:.1f}s")
        start = time.perf_counter()
        loss, samples, _ = xent_epoch(t, 0, StopSignal(), NullProgress(), 0)
        seconds = time.perf_counter() - start
        start = time.perf_counter()
        metrics = t.validate()
        val = time.perf_counter() - start
        print(f"epoch: {samples} captions in {seconds:.1f}s ({samples / seconds:.0f} samples/s), loss {loss:.3f}; "
              f"validation (beam 3, {len(t.val_entries)} images): {val:.1f}s, CIDEr {metrics['CIDEr']:.1f}")
    cfg = json.loads((ROOT / "sat_cli" / "models" / "default" / "config.json").read_text())
    info = cfg.get("training", {})
    if info.get("train_seconds"):
        print(f"default model: {info['train_seconds'] / 60:.1f} min to its best epoch ({info.get('epoch')}), "
              f"validation included, as recorded in its config.json")


def main():
    global CACHE
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["cache", "epoch"])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--cache-dir", type=Path, default=CACHE, help="Feature cache (default: bench/out/cache).")
    args = ap.parse_args()
    CACHE = args.cache_dir
    from sat_cli.runtime import keep_freed_memory

    keep_freed_memory()  # as `sat train` does
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores")
    if args.only in (None, "cache"):
        part_cache(args.steps)
    if args.only in (None, "epoch"):
        part_epoch()


if __name__ == "__main__":
    main()
