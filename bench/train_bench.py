"""Training benchmark on this machine. Prints its figures; asserts nothing.

  python bench/train_bench.py                 # both parts
  python bench/train_bench.py --only cache    # cache | epoch | speed
  python bench/train_bench.py --only speed --baseline ../base   # this checkout vs another (e.g. db0e2c2)
  python bench/train_bench.py --only speed --baseline ../base --precision bf16   # this one's bf16 products
  python bench/train_bench.py --only speed --baseline ../base --precision bf16 --grid-dim 512   # and a projected grid

1. cache: training samples/s reading cached features vs re-running the frozen encoder
   (tf_efficientnet_lite0) on the images at every step; same data (the shared train split), same
   model (the reference recipe: 512/512/512, dropout 0.5, batch 32), same batches.
3. speed: `sat train`'s own epoch loop (its default recipe at --image-size 384, cached features)
   on the first --photos photos of the shared train split, this checkout against --baseline (a
   checkout of another version, e.g. `git worktree add --detach ../base db0e2c2`), each in its own
   process, interleaved for --rounds rounds: training samples (captions) per second and the loss.
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


class StopAfter:
    """A stop signal that asks ``xent_epoch`` to stop after n steps."""

    def __init__(self, n):
        self.n = n

    @property
    def requested(self):
        self.n -= 1
        return self.n <= 0


def speed_worker(root: str, data: str, steps: int, image_size: int):
    """In a fresh process: import sat from ``root``, run warm-up steps, then time ``steps`` steps."""
    import sys

    import tempfile

    # the packages of that checkout, not the installed (editable) ones: plugins/ imports as sat_cli_plugins
    sys.meta_path = [f for f in sys.meta_path if "__editable__" not in (getattr(f, "__module__", "") or "")]
    links = Path(tempfile.mkdtemp())
    (links / "sat_cli").symlink_to(Path(root) / "sat_cli")
    (links / "sat_cli_plugins").symlink_to(Path(root) / "plugins")
    sys.path.insert(0, str(links))
    import sat_cli
    from sat_cli.training import TrainConfig
    from sat_cli.training.loop import xent_epoch
    from sat_cli.training.trainer import Trainer

    assert Path(sat_cli.__file__).resolve().is_relative_to(root), sat_cli.__file__
    from sat_cli.progress import NullProgress

    import os

    extra = {}
    if Path(root).resolve() == ROOT:  # options of this checkout only (the baseline may not have them)
        for option, env in (("batching", "SAT_BENCH_BATCHING"), ("precision", "SAT_BENCH_PRECISION"),
                            ("grid_dim", "SAT_BENCH_GRID_DIM")):
            if os.environ.get(env):
                extra[option] = int(os.environ[env]) if option == "grid_dim" else os.environ[env]
    cfg = TrainConfig(data=data, out=str(OUT / "speed_run"), cache_dir=str(CACHE), quiet=True, meteor=False,
                      image_size=image_size, **extra)
    t = Trainer(cfg)
    t.setup()
    xent_epoch(t, 0, StopAfter(3), NullProgress(), 0)  # warm-up
    start, cpu = time.perf_counter(), time.process_time()
    loss, samples, _ = xent_epoch(t, 0, StopAfter(steps), NullProgress(), 0)
    wall = time.perf_counter() - start
    print(json.dumps({"samples_per_s": samples / wall, "cpu_s_per_sample": (time.process_time() - cpu) / samples,
                      "loss": loss, "samples": samples}))


def part_speed(baseline: Path, photos: int, steps: int, rounds: int, image_size: int):
    import subprocess
    import sys

    data = json.loads(DATA.read_text())
    train = sorted((im for im in data["images"] if im["split"] == "train"), key=lambda im: (im["filepath"], im["filename"]))
    val = [im for im in data["images"] if im["split"] == "val"][:10]
    subset = OUT / f"speed_{photos}.json"
    OUT.mkdir(parents=True, exist_ok=True)
    images = [dict(im, filepath=str(DATA.parent / im["filepath"])) for im in train[:photos] + val]
    subset.write_text(json.dumps({"dataset": "subset", "images": images}))
    print(f"== training speed: {photos} train photos, image size {image_size}, {steps} steps a run, "
          f"{rounds} rounds, interleaved; {torch.get_num_threads()} threads ==")
    figures = {"baseline": [], "this": []}
    for r in range(rounds):
        for label, root in (("baseline", baseline.resolve()), ("this", ROOT)):
            out = subprocess.run([sys.executable, __file__, "--worker", str(root), str(subset), str(steps),
                                  str(image_size), "--cache-dir", str(CACHE)], capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(out.stderr[-3000:])
            fig = json.loads(out.stdout.strip().splitlines()[-1])
            figures[label].append(fig)
            print(f"round {r + 1} {label:8s}: {fig['samples_per_s']:6.1f} samples/s, "
                  f"{fig['cpu_s_per_sample'] * 1e3:5.1f} CPU ms/sample, loss {fig['loss']:.3f} ({fig['samples']} samples)",
                  flush=True)
    best = {k: max(f["samples_per_s"] for f in v) for k, v in figures.items()}
    cpu = {k: min(f["cpu_s_per_sample"] for f in v) for k, v in figures.items()}
    print(f"best of {rounds}: baseline {best['baseline']:.1f}, this {best['this']:.1f} samples/s: "
          f"{best['this'] / best['baseline']:.2f}x; CPU time per sample {cpu['baseline'] / cpu['this']:.2f}x")


def main():
    global CACHE
    import sys

    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        root, data, steps, size = sys.argv[2:6]
        if "--cache-dir" in sys.argv:
            CACHE = Path(sys.argv[sys.argv.index("--cache-dir") + 1])
        return speed_worker(root, data, int(steps), int(size))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["cache", "epoch", "speed"])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--baseline", type=Path, help="speed: the checkout to compare against (e.g. of db0e2c2).")
    ap.add_argument("--photos", type=int, default=300, help="speed: train photos used (their features are cached).")
    ap.add_argument("--rounds", type=int, default=3, help="speed: interleaved rounds.")
    ap.add_argument("--image-size", type=int, default=384, help="speed: encoder input size (384: a 12x12 grid).")
    ap.add_argument("--cache-dir", type=Path, default=CACHE, help="Feature cache (default: bench/out/cache).")
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"],
                    help="speed: `sat train --precision` of this checkout (bf16 on the CPU: bf16 matrix products)")
    ap.add_argument("--grid-dim", type=int,
                    help="speed: `sat train --grid-dim` of this checkout (the grid projected to this width)")
    args = ap.parse_args()
    if args.precision:
        os.environ["SAT_BENCH_PRECISION"] = args.precision
    if args.grid_dim is not None:
        os.environ["SAT_BENCH_GRID_DIM"] = str(args.grid_dim)
    CACHE = args.cache_dir
    from sat_cli.runtime import keep_freed_memory

    keep_freed_memory()  # as `sat train` does
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores")
    if args.only == "speed":
        if not args.baseline:
            ap.error("--only speed needs --baseline")
        return part_speed(args.baseline, args.photos, args.steps, args.rounds, args.image_size)
    if args.only in (None, "cache"):
        part_cache(args.steps)
    if args.only in (None, "epoch"):
        part_epoch()


if __name__ == "__main__":
    main()
