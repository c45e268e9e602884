"""Benchmark of `sat caption` on this machine. Prints its figures; asserts nothing.

  python bench/caption_bench.py                      # everything, with the shipped default model
  python bench/caption_bench.py --model runs/x/best  # another checkpoint
  python bench/caption_bench.py --only decode        # one part: decode | e2e | resnet | rss | chunks

Parts (issue 2):
1. decode: batched beam search vs a per-image reference beam search (bench/reference.py), beam 3,
   on the same features; the captions must be identical. Also counts the decoder's arithmetic
   and compares with this CPU's measured matrix-multiply rate.
2. e2e: `sat caption` on real photos (../shared/data), steady state (a 60-image run subtracted
   from a 300-image run), vs the per-image pipeline (load, resize, encode, decode one image at a
   time) and vs the encoder-only work (load + resize + forward) with the same encoder.
3. resnet: the same end-to-end comparison with torchvision:resnet101 at 14x14 (its ImageNet
   weights are not available offline, so the encoder has random weights and the decoder is
   trained briefly on those features: the arithmetic is the real one, the captions are not).
4. rss: peak resident memory captioning 2,000 images vs 200.
5. chunks: the encoder's wall time per image on 64 real photos taken in chunks of 1, 2, 4, 8 and
   64 images (Encoder.CPU_CHUNK, what `sat caption` and `sat serve` use on the CPU), interleaved
   rounds; features checked equal across chunk sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
OUT = ROOT / "bench" / "out"
sys.path.insert(0, str(Path(__file__).parent))

from reference import reference_beam_search  # noqa: E402

from sat_cli.model.beam import DecodeSettings  # noqa: E402
from sat_cli.model.checkpoint import load_checkpoint  # noqa: E402
from sat_cli.pipeline import decode, encode, load_batches  # noqa: E402
from sat_cli.runtime import keep_freed_memory  # noqa: E402

CPU = torch.device("cpu")


def photos(n: int, offset: int = 0) -> list[str]:
    images = json.loads((DATA / "captions.json").read_text())["images"]
    return [str(DATA / im["filepath"] / im["filename"]) for im in images[offset : offset + n]]


def gemm_gflops() -> float:
    """This CPU's fp32 matrix-multiply rate (1024^3 products), the ceiling for the decoder's GEMMs."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    for _ in range(3):
        a @ b
    t = time.perf_counter()
    for _ in range(20):
        a @ b
    return 20 * 2 * 1024**3 / (time.perf_counter() - t) / 1e9


def decoder_macs(ck, hyp_steps: int, images: int) -> float:
    """Multiply-adds of the decoder: per image (encoder projection, h0/c0) + per hypothesis-step."""
    c = ck.decoder.config
    P = int(np.prod(ck.encoder.grid_shape()))
    C, A, D, E, V = c.encoder_dim, c.attention_dim, c.decoder_dim, c.embed_dim, c.vocab_size
    per_image = P * C * A + 2 * C * D + P * C
    per_step = D * A + 2 * P * A + P * C + D * C + (E + C + D) * 4 * D + D * V
    return images * per_image + hyp_steps * per_step


def pixel_batch(paths, preprocess) -> torch.Tensor:
    """uint8 images (B, 3, H, W), loaded and resized by sat's pipeline (in this process)."""
    return next(load_batches(paths, preprocess, len(paths)))[1]


def encode_all(ck, paths, batch=32):
    return torch.cat([encode(ck.encoder, pixels, CPU, "fp32") for _, pixels in load_batches(paths, ck.preprocess, batch)])


def part_decode(ck, n: int, rounds: int = 3):
    print(f"\n== decode only: {n} real photos, beam 3, features given ==")
    print(f"(this CPU's speed drifts by up to a third from minute to minute: each round times the reference and"
          f" every batch size back to back; ratios are medians over {rounds} rounds)")
    feats = encode_all(ck, photos(n))
    v = ck.vocab
    blocked = (v.pad, v.start, v.unk)
    settings = DecodeSettings(beam_size=3, n_best=1, max_len=50)
    sizes = (16, 32, 64, 128)
    reference_beam_search(ck.decoder, feats[:1], 3, 50, v.start, v.end, blocked)  # warm-up
    for bs in sizes:
        decode(ck, feats[:bs], settings, attention=False)
    t_ref, t_tut, t_sat, same = [], [], {bs: [] for bs in sizes}, {}
    for r in range(rounds):
        stats = {}
        t = time.perf_counter()
        ref = [reference_beam_search(ck.decoder, feats[i : i + 1], 3, 50, v.start, v.end, blocked, stats=stats)
               for i in range(n)]
        t_ref.append(time.perf_counter() - t)
        m = min(n, 50)
        t = time.perf_counter()
        for i in range(m):
            reference_beam_search(ck.decoder, feats[i : i + 1], 3, 50, v.start, v.end, blocked, project_once=False)
        t_tut.append((time.perf_counter() - t) / m * n)
        for bs in sizes:
            t = time.perf_counter()
            out = []
            for i in range(0, n, bs):
                out += decode(ck, feats[i : i + bs], settings, attention=False)  # what sat caption runs
            t_sat[bs].append(time.perf_counter() - t)
            same[bs] = min(same.get(bs, n), sum(o[0].words == v.decode(r[0]) for o, r in zip(out, ref)))
    med = lambda xs: float(np.median(xs))  # noqa: E731
    print(f"reference, one image at a time:        {n / med(t_ref):7.1f} images/s"
          f"   (recomputing the encoder projection every step, as the tutorial does: {n / med(t_tut):.1f})")
    best = 0.0
    for bs in sizes:
        ratio = med([a / b for a, b in zip(t_ref, t_sat[bs])])
        print(f"sat batched, batch {bs:3d}:              {n / med(t_sat[bs]):7.1f} images/s  = {ratio:5.2f}x the reference"
              f" (rounds: {', '.join(f'{a / b:.2f}' for a, b in zip(t_ref, t_sat[bs]))}); identical captions {same[bs]}/{n}")
        best = max(best, ratio)
    macs = decoder_macs(ck, stats["hyp_steps"], n)
    peak = gemm_gflops()
    bound = peak * 1e9 / (2 * macs / n)
    ref_rate = n / med(t_ref)
    print(f"decoder arithmetic: {2 * macs / n / 1e6:.0f} MFLOP per image ({stats['hyp_steps'] / n:.1f} hypothesis-steps"
          f" in the reference); this CPU multiplies matrices at {peak:.0f} GFLOP/s")
    print(f"arithmetic bound: {bound:.0f} images/s = {bound / ref_rate:.1f}x the reference; "
          f"best batched run reaches {best:.2f}x = {100 * best / (bound / ref_rate):.0f}% of that bound")


def sat_caption_seconds(model: str, paths: list[str], extra=()) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        listing = Path(tmp) / "imgs"
        listing.mkdir()
        for i, p in enumerate(paths):
            os.symlink(p, listing / f"{i:05d}{Path(p).suffix}")
        cmd = [sys.executable, "-m", "sat_cli", "caption", str(listing), "--db", str(Path(tmp) / "b.db"), "--model",
               model, "--beam", "3", "-q", *extra]
        t = time.perf_counter()
        subprocess.run(cmd, check=True)
        return time.perf_counter() - t


def per_image_pipeline(ck, paths) -> float:
    """Seconds per image: load, resize, encode and decode one image at a time."""
    v, pre = ck.vocab, ck.preprocess
    blocked = (v.pad, v.start, v.unk)

    def one(p):
        f = encode(ck.encoder, pixel_batch([p], pre), CPU, "fp32")
        return reference_beam_search(ck.decoder, f, 3, 50, v.start, v.end, blocked)

    one(paths[0])
    t = time.perf_counter()
    for p in paths:
        one(p)
    return (time.perf_counter() - t) / len(paths)


def encoder_only(ck, paths, batch=64) -> float:
    """Seconds per image of the encoder's own work: load + resize + forward, in batches of 64 as
    `sat caption` takes them (the encoder runs them in chunks of Encoder.CPU_CHUNK on the CPU)."""
    pre = ck.preprocess

    def run(ps):
        for _, pixels in load_batches(ps, pre, batch):
            encode(ck.encoder, pixels, CPU, "fp32")

    run(paths[:batch])
    t = time.perf_counter()
    run(paths)
    return (time.perf_counter() - t) / len(paths)


def part_e2e(model: str, label: str, big: int = 300, small: int = 60, per_image_n: int = 40,
             encoder_weights: str | None = None):
    # as `sat caption` prepares it: the per-image pipeline and the encoder-only work get the same encoder
    ck = load_checkpoint(model, encoder_weights=encoder_weights).for_inference(CPU)
    extra = ("--encoder-weights", encoder_weights) if encoder_weights else ()
    print(f"\n== end to end, {label}: `sat caption` on {big} real photos, beam 3 ==")
    paths = photos(big)
    t_big = sat_caption_seconds(model, paths, extra)
    t_small = sat_caption_seconds(model, paths[:small], extra)
    steady = (t_big - t_small) / (big - small)
    print(f"sat caption: {big} images {t_big:.1f}s, {small} images {t_small:.1f}s -> steady state "
          f"{1000 * steady:.1f} ms/image ({1 / steady:.1f} images/s; start-up {t_small - small * steady:.1f}s)")
    t_pipe = per_image_pipeline(ck, paths[:per_image_n])
    print(f"per-image pipeline (load, resize, encode, decode one at a time): {1000 * t_pipe:.1f} ms/image "
          f"-> sat is {t_pipe / steady:.2f}x faster")
    t_enc = encoder_only(ck, paths[:200])
    print(f"encoder-only work (load + resize + forward, batches of 64): {1000 * t_enc:.1f} ms/image "
          f"-> sat caption costs {steady / t_enc:.2f}x the encoder-only work")
    print(f"(even with free decoding, sat caption could be at most {t_pipe / t_enc:.2f}x faster than the per-image "
          f"pipeline: the pipeline over the encoder-only work)")


def resnet_model() -> tuple[str, str]:
    """(checkpoint, encoder weights) of a decoder trained briefly on ResNet-101 features of 200
    photos. ResNet-101's ImageNet weights are not available offline: the network has random
    weights whose batch-norm statistics are set on 64 photos, so its features have a sane scale.
    The arithmetic is the real one and the captions have natural lengths; they do not describe
    the photos."""
    out = OUT / "resnet101_timing"
    weights = out / "resnet101_random_bn.safetensors"
    if not (out / "best" / "model.safetensors").exists():
        out.mkdir(parents=True, exist_ok=True)
        images = json.loads((DATA / "captions.json").read_text())["images"]
        subset = {"images": [dict(im, split="train") for im in images[:200]] +
                            [dict(im, split="val") for im in images[-20:]]}
        (out / "subset.json").write_text(json.dumps(subset))
        if not weights.exists():
            import torchvision
            from safetensors.torch import save_file

            torch.manual_seed(0)
            net = torchvision.models.resnet101()
            for m in net.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.momentum = None  # cumulative average over the calibration batches
            net.train()
            mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
            std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
            with torch.no_grad():
                paths = photos(64, offset=1000)
                from sat_cli.model.encoders import Preprocess

                for _, x in load_batches(paths, Preprocess((224, 224), interpolation="bilinear"), 16):
                    x = x.float() / 255
                    net((x - mean) / std)
            save_file(net.state_dict(), str(weights))
        subprocess.run([sys.executable, "-m", "sat_cli", "train", "--data", str(out / "subset.json"), "--images",
                        str(DATA), "--encoder", "torchvision:resnet101", "--encoder-weights", str(weights),
                        "--out", str(out), "--epochs", "2", "--no-meteor", "--cache-dir", str(OUT / "cache"),
                        "--lr", "1e-3", "-q"], check=True)
    return str(out / "best"), str(weights)


def peak_rss_kb(model: str, paths: list[str]) -> int:
    code = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    with tempfile.TemporaryDirectory() as tmp:
        listing = Path(tmp) / "imgs"
        listing.mkdir()
        for i, p in enumerate(paths):
            os.symlink(p, listing / f"{i:05d}{Path(p).suffix}")
        out = subprocess.run([sys.executable, "-c", code, sys.executable, "-m", "sat_cli", "caption", str(listing),
                              "--db", str(Path(tmp) / "r.db"), "--model", model, "-q"],
                             check=True, capture_output=True, text=True)
        return int(out.stdout.strip().splitlines()[-1])


def part_chunks(ck, n: int = 64, rounds: int = 4, sizes=(1, 2, 4, 8, 64)):
    print(f"\n== encoder chunks: {n} real photos, wall ms per image by Encoder.CPU_CHUNK, {rounds} interleaved rounds ==")
    pixels = pixel_batch(photos(n), ck.preprocess)
    shipped, enc = ck.encoder.CPU_CHUNK, ck.encoder
    ref = encode(enc, pixels, CPU, "fp32")  # warm-up, and the features every chunk size must give
    times = {c: [] for c in sizes}
    try:
        for _ in range(rounds):
            for c in sizes:
                enc.CPU_CHUNK = c
                t = time.perf_counter()
                got = encode(enc, pixels, CPU, "fp32")
                times[c].append(1000 * (time.perf_counter() - t) / n)
                assert torch.allclose(got, ref, atol=1e-3 * float(ref.abs().max())), f"chunks of {c} changed the features"
    finally:
        enc.CPU_CHUNK = shipped
    for c in sizes:
        note = " (the shipped Encoder.CPU_CHUNK)" if c == shipped else ""
        print(f"chunks of {c:>2}: best {min(times[c]):.1f} ms/image, rounds {[round(x, 1) for x in times[c]]}{note}")


def part_rss(model: str):
    print("\n== peak memory ==")
    small, big = peak_rss_kb(model, photos(200)), peak_rss_kb(model, photos(2000))
    print(f"peak RSS: 200 images {small / 1024:.0f} MiB, 2000 images {big / 1024:.0f} MiB -> ratio {big / small:.3f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "sat_cli" / "models" / "default"))
    ap.add_argument("--only", choices=["decode", "e2e", "resnet", "rss", "chunks"])
    ap.add_argument("--decode-images", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    keep_freed_memory()  # as `sat caption` does; the reference runs in this same process
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores")
    if args.only in (None, "decode"):
        part_decode(load_checkpoint(args.model).for_inference(CPU), args.decode_images)
    if args.only in (None, "e2e"):
        part_e2e(args.model, load_checkpoint(args.model).encoder_spec)
    if args.only in (None, "resnet"):
        model, weights = resnet_model()
        part_e2e(model, "torchvision:resnet101 14x14 (random weights, calibrated batch norm)", big=200, small=50,
                 per_image_n=15, encoder_weights=weights)
    if args.only in (None, "rss"):
        part_rss(args.model)
    if args.only in (None, "chunks"):
        part_chunks(load_checkpoint(args.model).for_inference(CPU))


if __name__ == "__main__":
    main()
