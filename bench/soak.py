"""Soak test of `sat caption`: a generated folder of images of every kind plus 5% broken or
hostile entries, captioned while the run is killed with SIGKILL at random moments and resumed.
Prints the counts, the time lost to the kills and the peak memory of each run; asserts nothing
(`tests/test_soak.py` runs a small version and checks the figures).

    python bench/soak.py                         # 5,000 images, 5 kills, the shipped model
    python bench/soak.py --images 300 --kills 2 --tiny --json
    python bench/soak.py --images 240 --kills 2 --tiny --kill-after-batches 2   # deterministic kills

--kill-after-batches N makes each killed run SIGKILL itself right after its N-th batch is committed,
so the number of kills asked for is the number delivered whatever the machine's speed (the tests use it).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

from PIL import Image

from sat_cli.store.queries import stored_results

HOSTILE_KINDS = ("random-bytes", "empty", "truncated-png", "text", "named-pipe", "socket", "broken-link", "link-loop",
                 "png-bomb", "gif-garbage")


def image_of_kind(i: int, rng: random.Random) -> tuple[str, bytes]:
    """(file name, bytes) of the i-th good image: every format and mode sat reads, many sizes."""
    w, h = rng.randint(8, 400), rng.randint(8, 400)
    base = Image.new("RGB", (w, h), (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
    base.putpixel((i % w, (i // w) % h), (i % 251, i % 241, i % 239))  # distinct content
    kind = i % 12
    buf = io.BytesIO()
    if kind == 0:
        base.save(buf, "JPEG", quality=85)
        ext = "jpg"
    elif kind == 1:
        base.convert("L").save(buf, "JPEG", quality=80)
        ext = "jpeg"
    elif kind == 2:
        base.convert("CMYK").save(buf, "JPEG")
        ext = "jpg"
    elif kind == 3:
        exif = Image.Exif()
        exif[0x0112] = 6  # rotated
        base.save(buf, "JPEG", exif=exif.tobytes(), progressive=True)
        ext = "jpg"
    elif kind == 4:
        base.save(buf, "PNG")
        ext = "png"
    elif kind == 5:
        base.convert("RGBA").save(buf, "PNG")
        ext = "png"
    elif kind == 6:
        base.convert("P").save(buf, "PNG")
        ext = "png"
    elif kind == 7:
        Image.new("I;16", (w, h), i % 65536).save(buf, "PNG")
        ext = "png"
    elif kind == 8:
        base.save(buf, "WEBP")
        ext = "webp"
    elif kind == 9:
        frames = [base, base.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
        frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
        ext = "gif"
    elif kind == 10:
        base.save(buf, "BMP")
        ext = "bmp"
    else:
        base.save(buf, "TIFF")
        ext = "tif"
    name = f"img{i:05d}.{ext}"
    if i % 97 == 0:
        name = f"weird \t\n name {i:05d}.{ext}"
    if i % 89 == 0:
        name = os.fsdecode(b"caf\xe9-" + f"{i:05d}.{ext}".encode())  # not UTF-8
    return name, buf.getvalue()


def png_bomb() -> bytes:
    """A valid 1x1 PNG whose header claims 30000 x 30000 pixels: Pillow's bomb guard refuses it."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = struct.pack(">II", 30000, 30000) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def build(folder: Path, n: int, hostile_share: float = 0.05, seed: int = 0) -> dict:
    """The folder: n good images in 20 subfolders plus about n*hostile_share hostile entries."""
    rng = random.Random(seed)
    good, bad = [], []
    sockets = []
    for i in range(n):
        sub = folder / f"d{i % 20:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        name, data = image_of_kind(i, rng)
        (sub / name).write_bytes(data)
        good.append(str(sub / name))
    n_bad = max(len(HOSTILE_KINDS), round(n * hostile_share))
    for j in range(n_bad):
        kind = HOSTILE_KINDS[j % len(HOSTILE_KINDS)]
        sub = folder / f"d{j % 20:02d}"
        path = sub / f"bad{j:04d}-{kind}.{'png' if 'png' in kind else 'jpg'}"
        if kind == "random-bytes":
            path.write_bytes(os.urandom(rng.randint(1, 5000)))
        elif kind == "empty":
            path.write_bytes(b"")
        elif kind == "truncated-png":
            buf = io.BytesIO()
            Image.new("RGB", (200, 200), (1, 2, 3)).save(buf, "PNG")
            path.write_bytes(buf.getvalue()[:100])
        elif kind == "text":
            path.write_text("this is not a photo\n" * 10)
        elif kind == "named-pipe":
            os.mkfifo(path)
        elif kind == "socket":
            s = socket.socket(socket.AF_UNIX)
            s.bind(str(path))
            sockets.append(s)
        elif kind == "broken-link":
            os.symlink(path.with_suffix(".gone"), path)
        elif kind == "link-loop":
            os.symlink(path, path)
        elif kind == "png-bomb":
            path.write_bytes(png_bomb())
        else:
            path.write_bytes(b"GIF89a" + os.urandom(64))
        bad.append(str(path))
    (folder / "d00" / "folder-named-like.jpg").mkdir()  # walked, not an entry
    return {"good": good, "bad": bad, "sockets": sockets}


def peak_rss_mib(pid: int) -> float:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def tiny_model(out: Path) -> str:
    code = ("import sys; from sat_cli.model.checkpoint import save_checkpoint; from sat_cli.model.encoders import EncoderOptions, "
            "create_encoder; from sat_cli.model.decoder import Decoder, DecoderConfig; from sat_cli.model.vocab import SPECIALS, Vocab; "
            "import torch; torch.manual_seed(0); e = create_encoder('timm:test_efficientnet', EncoderOptions("
            "pretrained=False, image_size=64)); v = Vocab([*SPECIALS, *'a dog cat on the grass man red'.split()]); "
            "d = Decoder(DecoderConfig(vocab_size=len(v), encoder_dim=e.out_dim, embed_dim=16, attention_dim=16, "
            "decoder_dim=32)); save_checkpoint(sys.argv[1], e, d, v, include_encoder=True, decode={'max_len': 8})")
    subprocess.run([sys.executable, "-c", code, str(out)], check=True)
    return str(out)


# Runs `sat` with Store.write_batch wrapped to SIGKILL the process right after its N-th committed batch
# that stored captions (batches of only failed entries do not count).
KILL_AFTER = """import os, runpy, signal, sys
from sat_cli.store.writes import Store
n, write = int(sys.argv.pop(1)), Store.write_batch
def write_batch(self, run_id, records, *args, **kwargs):
    write(self, run_id, records, *args, **kwargs)
    write_batch.done += any(r.captions for r in records)
    if write_batch.done >= n:
        os.kill(os.getpid(), signal.SIGKILL)
write_batch.done = 0
Store.write_batch = write_batch
sys.argv[0] = "sat"
runpy.run_module("sat_cli", run_name="__main__")
"""


def soak(n: int, kills: int, model: str | None, workers: int, seed: int,
         kill_window: tuple[float, float] = (5.0, 30.0), kill_after_batches: int | None = None) -> dict:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        made = build(tmp / "photos", n, seed=seed)
        build_s = time.perf_counter() - started
        model = model or tiny_model(tmp / "tiny")
        db = tmp / "soak.db"
        cmd = [sys.executable, "-m", "sat_cli", "caption", str(tmp / "photos"), "--db", str(db), "--model", model,
               "--workers", str(workers), "--batch-size", "32", "-q"]
        runs, kills_done, lost = [], 0, 0.0

        while True:
            t0 = time.perf_counter()
            before = stored_results(db, timeout=5) if db.exists() else 0
            kill_at = rng.uniform(*kill_window) if kills_done < kills else None
            run_cmd = cmd
            if kill_after_batches and kill_at is not None:
                run_cmd, kill_at = [sys.executable, "-c", KILL_AFTER, str(kill_after_batches), *cmd[3:]], None
            proc = subprocess.Popen(run_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            peak, count, last_commit, first_commit, tick = 0.0, before, t0, None, 0
            while proc.poll() is None:
                time.sleep(0.1)
                tick += 1
                peak = max(peak, peak_rss_mib(proc.pid))
                if tick % 5 == 0 and db.exists():
                    now_count = stored_results(db, timeout=5)
                    if now_count != count:
                        count, last_commit = now_count, time.perf_counter()
                        first_commit = first_commit or last_commit
                if kill_at is not None and time.perf_counter() - t0 >= kill_at:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    break
            end = time.perf_counter()
            killed = proc.returncode == -signal.SIGKILL
            after = stored_results(db, timeout=5)
            if runs and runs[-1]["killed"]:  # the restart: start-up until this run's first commit
                lost += ((first_commit or end) - t0)
            if killed:
                kills_done += 1
                lost += end - last_commit  # work since the last commit: redone by the next run
            runs.append({"killed": killed, "seconds": round(end - t0, 1), "results_after": after,
                         "new_results": after - before, "peak_rss_mib": round(peak, 1), "returncode": proc.returncode})
            if not killed:
                break
        for s in made["sockets"]:
            s.close()
        return {"images": n, "hostile": len(made["bad"]), "build_seconds": round(build_s, 1), "runs": runs,
                "kills": kills_done, "seconds_lost_to_kills": round(lost, 1), **check(db, made)}


def check(db: Path, made: dict) -> dict:
    conn = sqlite3.connect(db)
    integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
    rows = {os.fsdecode(r[0]): (r[1], r[2]) for r in conn.execute("SELECT path_bytes, status, sha256 FROM images")}
    good_ok = sum(1 for p in made["good"] if rows.get(p, ("missing",))[0] == "ok")
    bad_failed = sum(1 for p in made["bad"] if rows.get(p, ("missing",))[0] == "failed")
    sets = conn.execute("SELECT COUNT(DISTINCT model_fingerprint || settings_key) FROM results").fetchone()[0]
    best = dict(conn.execute("""SELECT images.sha256, COUNT(*) FROM images JOIN results USING (sha256)
                                JOIN captions ON captions.result_id = results.id AND captions.rank = 1
                                WHERE images.status = 'ok' GROUP BY images.id""").fetchall())
    one_best = sum(1 for p in made["good"] if best.get(rows.get(p, (None, None))[1]) == sets)
    extra = len(rows) - len(made["good"]) - len(made["bad"])
    return {"integrity_check": integrity, "good_captioned": good_ok, "good_with_one_best_caption": one_best,
            "hostile_failed_once": bad_failed, "unexpected_rows": extra, "model_settings_sets": sets}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--model", help="checkpoint (default: the shipped model; --tiny: a small random one)")
    ap.add_argument("--tiny", action="store_true", help="caption with a small random model (fast)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kill-window", type=float, nargs=2, default=(5.0, 30.0), metavar=("MIN", "MAX"),
                    help="seconds into a run at which it is killed (uniform)")
    ap.add_argument("--kill-after-batches", type=int, metavar="N",
                    help="instead of --kill-window: each killed run dies right after its N-th committed batch with captions")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    model = None if args.tiny else (args.model or str(Path(__file__).resolve().parent.parent / "sat_cli" / "models"
                                                      / "default"))
    out = soak(args.images, args.kills, model, args.workers, args.seed, tuple(args.kill_window), args.kill_after_batches)
    if args.json:
        print(json.dumps(out))
        return
    print(f"{out['images']} images + {out['hostile']} hostile entries (built in {out['build_seconds']} s)")
    for i, r in enumerate(out["runs"], 1):
        print(f"run {i}: {'killed' if r['killed'] else 'finished'} after {r['seconds']} s, +{r['new_results']} results "
              f"({r['results_after']} stored), peak RSS {r['peak_rss_mib']} MiB, exit {r['returncode']}")
    total = sum(r["seconds"] for r in out["runs"])
    print(f"{out['kills']} kills; wall time in all {total:.1f} s, of which lost to the kills {out['seconds_lost_to_kills']} s "
          f"(work after each kill's last commit, redone, plus each restart's time to its first commit)")
    print(f"integrity_check {out['integrity_check']}; good images captioned {out['good_captioned']}/{out['images']}, "
          f"with exactly one best caption per model and settings {out['good_with_one_best_caption']}; hostile entries "
          f"with exactly one failed row {out['hostile_failed_once']}/{out['hostile']}; unexpected rows "
          f"{out['unexpected_rows']}")
    peaks = [r["peak_rss_mib"] for r in out["runs"] if r["peak_rss_mib"]]
    print(f"peak RSS per run: min {min(peaks):.0f} MiB, max {max(peaks):.0f} MiB (ratio {max(peaks) / min(peaks):.3f})")
    working = [(r["new_results"], r["peak_rss_mib"]) for r in out["runs"] if r["peak_rss_mib"] and r["new_results"]]
    if len(working) > 1:  # runs killed before their first commit never reached the steady state
        (few, low), (many, high) = min(working), max(working)
        print(f"peak RSS of runs that stored results: {low:.0f} MiB after {few} results, {high:.0f} MiB after {many} "
              f"(ratio {high / low:.3f})")


if __name__ == "__main__":
    main()
