"""Benchmark of `sat serve` on this machine. Prints its figures (with `uptime`, since the machine
may be shared); asserts nothing.

  python bench/serve_bench.py                         # 1, 4, 16 clients, then a 2-minute soak
  python bench/serve_bench.py --images 200 --soak 600 # the issue's 10-minute soak
  python bench/serve_bench.py --model runs/x/best --soak 0 --json

1. `sat caption` on the same real photos (../shared/data), steady state: a run of --images photos
   minus a run of a fifth of them (start-up cancels out), both real `sat caption` processes.
2. `sat serve` (a real server process, default options): 1, 4 and 16 concurrent clients posting
   one photo per request to /v1/caption; images/s, p50 and p99 latency per photo.
3. Soak: --soak seconds of --soak-clients clients sending mixed requests (PhotoPrism, Ollama and
   sat formats; about 1 in 5 bad: not an image, truncated JPEG, zero bytes, bad base64, a
   decompression bomb, a body over --max-body, a client that disconnects mid-upload). Counts any
   good request that did not get 200 and any bad one that did not get a 4xx; the server's RSS
   sampled every 5 s.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def photos(n: int) -> list[Path]:
    images = json.loads((DATA / "captions.json").read_text())["images"]
    return [DATA / im["filepath"] / im["filename"] for im in images if im["split"] == "val"][:n]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sat_caption_rate(paths: list[Path], model: str | None) -> tuple[float, float]:
    """`sat caption` on ``paths``: (steady-state images/s: (N - N/5) photos over the difference of
    the two runs' wall times, the rate the N-photo run reports itself, start-up excluded)."""
    import re

    def run(subset) -> tuple[float, float]:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "sat_cli", "caption", *map(str, subset), "--db", f"{tmp}/b.db"]
            started = time.perf_counter()
            done = subprocess.run(cmd + (["--model", model] if model else []), capture_output=True, text=True)
            seconds = time.perf_counter() - started
            reported = re.search(r"\(([\d.]+) images/s\)", done.stderr)
            return seconds, float(reported.group(1)) if reported else float("nan")

    small = paths[: max(1, len(paths) // 5)]
    (big_s, big_rate), (small_s, _) = run(paths), run(small)
    return (len(paths) - len(small)) / max(1e-9, big_s - small_s), big_rate


def start_server(model: str | None, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "sat_cli", "serve", "--port", str(port), "--log-level", "warning", *extra]
    proc = subprocess.Popen(cmd + (["--model", model] if model else []))
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/healthz").status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the server did not start")


def clients(url: str, paths: list[Path], n_clients: int) -> dict:
    """Each client posts its share of ``paths`` one at a time; images/s and per-photo latency."""
    blobs = [p.read_bytes() for p in paths]
    latencies: list[float] = []
    lock = threading.Lock()

    def client(k: int):
        with httpx.Client(timeout=120) as http:
            for i in range(k, len(blobs), n_clients):
                t = time.perf_counter()
                r = http.post(url + "/v1/caption", files=[("image", (f"{i}.jpg", blobs[i]))])
                r.raise_for_status()
                with lock:
                    latencies.append(time.perf_counter() - t)

    before = httpx.get(url + "/healthz").json()
    started = time.perf_counter()
    with ThreadPoolExecutor(n_clients) as pool:
        list(pool.map(client, range(n_clients)))
    seconds = time.perf_counter() - started
    after = httpx.get(url + "/healthz").json()
    latencies.sort()
    batches = after["batches"] - before["batches"]
    return {"clients": n_clients, "images": len(blobs), "images_per_s": round(len(blobs) / seconds, 2),
            "images_per_batch": round((after["images"] - before["images"]) / max(1, batches), 2),
            "p50_ms": round(1000 * statistics.median(latencies), 1),
            "p99_ms": round(1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 1),
            "uptime": uptime()}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def bad_inputs(good: bytes) -> dict[str, bytes]:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 40000, 40000, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + chunk(b"IEND", b""))
    return {"not-an-image": b"hello, not a photo", "truncated": good[: len(good) // 3], "zero": b"", "bomb": bomb}


def request(kind: str, data: bytes | None):
    """(path, json body) of one request in the format ``kind`` (``data`` None: bad base64)."""
    b64 = base64.b64encode(data).decode() if data is not None else "%%not-base64%%"
    if kind == "photoprism":
        return "/api/v1/vision/caption", {"id": "soak", "model": "sat", "stream": False,
                                          "images": [f"data:image/jpeg;base64,{b64}"]}
    if kind == "ollama":
        return "/api/generate", {"model": "sat", "prompt": "Describe the photo.", "images": [b64], "stream": False}
    return "/v1/caption", {"images": [b64]}


def soak(url: str, pid: int, paths: list[Path], seconds: float, n_clients: int, max_body: int) -> dict:
    blobs = [p.read_bytes() for p in paths]
    counts = {"good": 0, "good_failed": 0, "bad": 0, "bad_not_4xx": 0, "disconnects": 0}
    failures: list[str] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds
    host, port = url.removeprefix("http://").split(":")

    def client(k: int):
        rng = random.Random(k)
        with httpx.Client(timeout=120) as http:
            while time.monotonic() < stop:
                kind = rng.choice(["photoprism", "ollama", "sat"])
                roll = rng.random()
                if roll < 0.8:
                    path, body = request(kind, rng.choice(blobs))
                    r = http.post(url + path, json=body)
                    with lock:
                        counts["good"] += 1
                        if r.status_code != 200:
                            counts["good_failed"] += 1
                            failures.append(f"{kind} {r.status_code} {r.text[:200]}")
                elif roll < 0.95:
                    bad = rng.choice([*bad_inputs(rng.choice(blobs)).values(), None])
                    path, body = request(kind, bad)
                    r = http.post(url + path, json=body)
                    with lock:
                        counts["bad"] += 1
                        counts["bad_not_4xx"] += not 400 <= r.status_code < 500
                elif roll < 0.975:  # a body over --max-body
                    r = http.post(url + "/v1/caption", content=b"x" * (max_body + 1),
                                  headers={"content-type": "application/json"})
                    with lock:
                        counts["bad"] += 1
                        counts["bad_not_4xx"] += r.status_code != 413
                else:  # a client that disconnects mid-upload
                    with socket.create_connection((host, int(port))) as s:
                        s.sendall(b"POST /v1/caption HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{\"ima")
                    with lock:
                        counts["disconnects"] += 1

    samples = []
    with ThreadPoolExecutor(n_clients) as pool:
        futures = [pool.submit(client, k) for k in range(n_clients)]
        started = time.monotonic()
        while not all(f.done() for f in futures):
            samples.append((round(time.monotonic() - started), round(rss_mb(pid), 1)))
            time.sleep(5)
        for f in futures:
            f.result()
    return {"seconds": seconds, "clients": n_clients, **counts, "first_failures": failures[:5],
            "rss_mb_first": samples[0][1], "rss_mb_after_1min": next((m for t, m in samples if t >= 60), None),
            "rss_mb_last": samples[-1][1], "rss_mb_max": max(m for _, m in samples), "rss_samples": samples,
            "uptime": uptime()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder (default: the shipped model)")
    parser.add_argument("--images", type=int, default=120, help="real photos per measurement")
    parser.add_argument("--soak", type=float, default=120, help="soak seconds (0: none)")
    parser.add_argument("--soak-clients", type=int, default=8)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    paths = photos(args.images)
    out = {"machine": {"cpus": os.cpu_count(), "uptime_at_start": uptime()}}
    steady, reported = sat_caption_rate(paths, args.model)
    out["sat_caption_images_per_s"], out["sat_caption_reported_images_per_s"] = round(steady, 2), reported
    out["sat_caption_uptime"] = uptime()
    print(f"sat caption: steady state {steady:.2f} images/s ({len(paths)} minus {len(paths) // 5} photos), "
          f"{reported} images/s as the {len(paths)}-photo run reports it  [{out['sat_caption_uptime']}]",
          file=sys.stderr)
    max_body = 4 << 20
    proc, url = start_server(args.model, ["--max-body", str(max_body)])
    try:
        clients(url, paths[:8], 1)  # warm-up
        idle = clients(url, paths[:20], 1)
        out["idle_one_client"] = idle
        print(f"idle server, 1 client: p50 {idle['p50_ms']} ms per photo  [{idle['uptime']}]", file=sys.stderr)
        out["clients"] = []
        for n in (1, 4, 16):
            row = clients(url, paths, n)
            row["vs_sat_caption"] = round(row["images_per_s"] / out["sat_caption_images_per_s"], 2)
            out["clients"].append(row)
            print(f"{n:>2} clients: {row['images_per_s']} images/s ({row['vs_sat_caption']}x sat caption), "
                  f"p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms, {row['images_per_batch']} images per batch  "
                  f"[{row['uptime']}]", file=sys.stderr)
        if args.soak:
            s = out["soak"] = soak(url, proc.pid, paths, args.soak, args.soak_clients, max_body)
            print(f"soak {s['seconds']:g} s, {s['clients']} clients: {s['good']} good requests "
                  f"({s['good_failed']} failed), {s['bad']} bad ({s['bad_not_4xx']} not answered 4xx), "
                  f"{s['disconnects']} disconnects; RSS {s['rss_mb_first']} -> {s['rss_mb_last']} MB "
                  f"(after 1 min {s['rss_mb_after_1min']}, max {s['rss_mb_max']})  [{s['uptime']}]", file=sys.stderr)
            alive = httpx.get(url + "/healthz").status_code == 200
            out["alive_after_soak"] = alive
    finally:
        proc.terminate()
        out["exit_status"] = proc.wait(120)
    print(f"server exit status after SIGTERM: {out['exit_status']}", file=sys.stderr)
    if args.json:
        print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
