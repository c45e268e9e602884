"""Benchmark of `sat serve` on this machine. Prints its figures (with `uptime`, since the machine
may be shared); asserts nothing.

  python bench/serve_bench.py --images 120 --soak 600 --json   # every figure of issue 18 (quiet machine)
  python bench/serve_bench.py --images 8 --soak 10              # smoke test
  python bench/serve_bench.py --images 96 --clients 16 --no-sat-caption --soak 0 --server-arg=--max-wait-ms=50

1. `sat caption` on the same real photos (../shared/data), steady state: a run of --images photos
   minus a run of a fifth of them (start-up cancels out), both real `sat caption` processes,
   measured --baseline-rounds times (default 3; the ratios use the median) (--no-sat-caption skips it).
2. `sat serve` (a real server process, default options plus --server-arg): after a warm-up, one
   client on the idle server, one photo at a time (up to 40 photos): p50 and p90 ms per photo
   (target < 150 ms), once over a plain socket (as curl or PhotoPrism's Go client send it) and once
   with httpx over a kept-alive connection (until the server set TCP_NODELAY, 2026-12-07, that
   cost ~45 ms a request: docs/serving.md).
3. --clients (1, 4, 16) concurrent clients, each a process of its own (--client-threads: threads of
   this process), posting one photo per request to /v1/caption (with httpx, or with
   --plain-clients over kept-alive plain sockets, which cost the shared cores next to no CPU): images/s, p50/p90/p99 latency per
   photo; from /healthz: batch sizes, why batches closed, ms per image waiting for a decoding
   thread, decoding, queued; ms per model call; time in the server vs at the client; CPU ms per
   image of the server and of the clients.
4. Soak: --soak seconds of --soak-clients clients sending mixed requests (PhotoPrism, Ollama and
   sat formats; about 1 in 5 bad: not an image, truncated JPEG, zero bytes, bad base64, a
   decompression bomb, a body over --max-body, a client that disconnects mid-upload). Counts any
   good request that did not get 200 and any bad one that did not get a 4xx; the server's RSS
   sampled every 5 s (first, after 1 min, last, max).
5. The server's exit status after SIGTERM.
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


def plain_latencies(url: str, paths: list[Path]) -> dict:
    """One photo at a time over a plain socket (the request in one write, the whole answer read, as
    curl sends it, one connection per photo): p50/p90 ms per photo. Kept-alive connections (httpx,
    Go's client) used to add ~45 ms a request: the server's missing TCP_NODELAY (docs/serving.md)."""
    host, port = url.removeprefix("http://").split(":")
    times = []
    for p in paths:
        request = multipart_request(p.read_bytes(), "a.jpg", keep_alive=False)
        started = time.perf_counter()
        with socket.create_connection((host, int(port))) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.sendall(request)
            read_answer(s, b"")
        times.append(time.perf_counter() - started)
    q = statistics.quantiles([t * 1000 for t in times], n=10)
    return {"images": len(times), "p50_ms": round(statistics.median(times) * 1000, 1), "p90_ms": round(q[8], 1)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sat_caption_rate(paths: list[Path], model: str | None) -> tuple[float | None, float]:
    """`sat caption` on ``paths``: (steady-state images/s: (N - N/5) photos over the difference of
    the two runs' wall times, or None when that is not positive; the rate the N-photo run reports
    itself, start-up excluded)."""
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
    if big_s <= small_s:  # too few photos for the start-up to cancel out (a smoke test): no figure
        return None, big_rate
    return (len(paths) - len(small)) / (big_s - small_s), big_rate


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


def http_client() -> httpx.Client:
    """The benchmark's HTTP client: TCP_NODELAY set, as curl and Go's net/http (PhotoPrism) do. httpx
    and requests leave Nagle's algorithm on: their body, written after the headers, then waits for
    the server's delayed ACK, ~40 ms a request on Linux (--nagle measures that)."""
    if os.environ.get("SAT_BENCH_NAGLE"):
        return httpx.Client(timeout=120)
    nodelay = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
    return httpx.Client(timeout=120, transport=httpx.HTTPTransport(socket_options=nodelay))


def multipart_request(blob: bytes, name: str, keep_alive: bool) -> bytes:
    """A whole POST /v1/caption request of one photo, as one buffer (what curl or Go's client write)."""
    body = (b'--XX\r\nContent-Disposition: form-data; name="image"; filename="' + name.encode() + b'"\r\n'
            b"Content-Type: image/jpeg\r\n\r\n" + blob + b"\r\n--XX--\r\n")
    return (b"POST /v1/caption HTTP/1.1\r\nHost: x\r\nConnection: %s\r\nContent-Type: multipart/form-data; "
            b"boundary=XX\r\nContent-Length: %d\r\n\r\n" % (b"keep-alive" if keep_alive else b"close", len(body))) + body


def read_answer(s: socket.socket, pending: bytes) -> bytes:
    """Read one 200 answer from ``s`` by its Content-Length (``pending``: bytes already received
    past the previous answer); returns the bytes received past this one."""
    import re

    data = pending
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            raise SystemExit("plain client: the server closed the connection")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    if b" 200 " not in head.split(b"\r\n")[0]:
        raise SystemExit(f"plain client: {head[:200]!r}")
    size = int(re.search(rb"content-length: (\d+)", head, re.I).group(1))
    while len(rest) < size:
        rest += s.recv(65536)
    return rest[size:]


def _post_each_plain(url: str, blobs: list[bytes], indices: range) -> tuple[list[float], float]:
    """One client over one kept-alive plain socket (TCP_NODELAY, each request in one write, the
    answer read by its Content-Length): a client that costs next to no CPU, as a Go program on
    another machine would; (latencies in s, its CPU seconds)."""
    host, port = url.removeprefix("http://").split(":")
    latencies, cpu = [], time.process_time()
    with socket.create_connection((host, int(port))) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pending = b""
        for i in indices:
            request = multipart_request(blobs[i], f"{i}.jpg", keep_alive=True)
            t = time.perf_counter()
            s.sendall(request)
            pending = read_answer(s, pending)
            latencies.append(time.perf_counter() - t)
    return latencies, time.process_time() - cpu


def _post_each(url: str, blobs: list[bytes], indices: range) -> tuple[list[float], float]:
    """One client: posts its photos one at a time; (latencies in s, its CPU seconds)."""
    if os.environ.get("SAT_BENCH_PLAIN"):
        return _post_each_plain(url, blobs, indices)
    latencies, cpu = [], time.process_time()
    with http_client() as http:
        for i in indices:
            t = time.perf_counter()
            r = http.post(url + "/v1/caption", files=[("image", (f"{i}.jpg", blobs[i]))])
            r.raise_for_status()
            latencies.append(time.perf_counter() - t)
    return latencies, time.process_time() - cpu


def _client_process(url, blobs, indices, go, out) -> None:
    go.wait()
    out.put(_post_each(url, blobs, indices))


def cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of a process so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds so far of a process's threads, summed by OS thread name (`sat serve` names its
    model thread, which torch's OpenMP workers it starts inherit, and its decoding threads);
    "main" is the event loop (the thread whose id is the process's)."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            comm = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended meanwhile
        name = "main" if task.name == str(pid) else comm
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def clients(url: str, pid: int, paths: list[Path], n_clients: int, processes: bool = False) -> dict:
    """Each client posts its share of ``paths`` one at a time (threads of this process, or with
    ``processes`` one process each, so no client waits on another's GIL); images/s, per-photo
    latency, and from /healthz how the server batched them and where the images waited."""
    import multiprocessing

    blobs = [p.read_bytes() for p in paths]
    shares = [range(k, len(blobs), n_clients) for k in range(n_clients)]
    before, server_cpu, threads = httpx.get(url + "/healthz").json(), cpu_seconds(pid), thread_cpu(pid)
    started = time.perf_counter()
    if processes:
        ctx = multiprocessing.get_context("fork")
        go, out = ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=_client_process, args=(url, blobs, share, go, out)) for share in shares]
        for p in procs:
            p.start()
        started = time.perf_counter()
        go.set()
        done = [out.get() for _ in procs]
        for p in procs:
            p.join()
    else:
        with ThreadPoolExecutor(n_clients) as pool:
            cpu = time.process_time()
            done = [(lat, 0.0) for lat, _ in pool.map(lambda share: _post_each(url, blobs, share), shares)]
            done.append(([], time.process_time() - cpu))  # the threads' CPU is the whole process's
    seconds = time.perf_counter() - started
    after, server_cpu = httpx.get(url + "/healthz").json(), cpu_seconds(pid) - server_cpu
    threads = {k: v - threads.get(k, 0.0) for k, v in thread_cpu(pid).items()}
    latencies = sorted(x for lat, _ in done for x in lat)
    n = len(latencies)
    b0, b1 = before["batching"], after["batching"]
    sizes = {k: v - b0["sizes"].get(k, 0) for k, v in b1["sizes"].items() if v - b0["sizes"].get(k, 0)}
    taken = sum(int(k) * v for k, v in sizes.items())
    waits = {k: round(1000 * (v - b0["seconds"][k]) / max(1, taken), 1) for k, v in b1["seconds"].items()}
    waits["model"] = round(1000 * (b1["seconds"]["model"] - b0["seconds"]["model"]) / max(1, sum(sizes.values())), 1)
    requests = after["requests"] - before["requests"]  # /healthz is not counted
    return {"clients": n_clients, "client_processes": processes, "images": n,
            "images_per_s": round(n / seconds, 2),
            "images_per_batch": round(taken / max(1, sum(sizes.values())), 2),
            "batch_sizes": dict(sorted(sizes.items(), key=lambda kv: int(kv[0]))),
            "batch_closed": {k: v - b0["closed"].get(k, 0) for k, v in b1["closed"].items()
                             if v - b0["closed"].get(k, 0)},
            "decoding_at_close_per_batch": round((b1["decoding_at_close"] - b0["decoding_at_close"])
                                                 / max(1, sum(sizes.values())), 2),
            "ms_per_image_decode_wait": waits["decode_wait"], "ms_per_image_decode": waits["decode"],
            "ms_per_image_queued": waits["queued"], "ms_per_model_call": waits["model"],
            "ms_in_server_per_request": round(1000 * (after["request_seconds"] - before["request_seconds"])
                                              / max(1, requests), 1),
            "ms_at_client_per_request": round(1000 * sum(latencies) / max(1, n), 1),
            "server_cpu_ms_per_image": round(1000 * server_cpu / max(1, n), 1),
            "server_cpu_ms_per_image_by_thread": {k: round(1000 * v / max(1, n), 1)
                                                  for k, v in sorted(threads.items()) if v},
            "client_cpu_ms_per_image": round(1000 * sum(c for _, c in done) / max(1, n), 1),
            "p50_ms": round(1000 * statistics.median(latencies), 1),
            "p90_ms": round(1000 * latencies[min(n - 1, int(0.9 * n))], 1),
            "p99_ms": round(1000 * latencies[min(n - 1, int(0.99 * n))], 1),
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
        with http_client() as http:
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


def row_line(row: dict) -> str:
    kind = "processes" if row["client_processes"] else "threads"
    return (f"{row['clients']:>2} clients ({kind}): {row['images_per_s']} images/s, p50 {row['p50_ms']} ms, "
            f"p90 {row['p90_ms']} ms, p99 {row['p99_ms']} ms; {row['images_per_batch']} images per batch "
            f"{row['batch_sizes']} closed {row['batch_closed']}; per image: decode wait "
            f"{row['ms_per_image_decode_wait']} ms, decode {row['ms_per_image_decode']} ms, queued "
            f"{row['ms_per_image_queued']} ms; {row['ms_per_model_call']} ms per model call; "
            f"{row['ms_in_server_per_request']} ms in the server vs {row['ms_at_client_per_request']} ms at the client "
            f"per request; CPU per image: server {row['server_cpu_ms_per_image']} ms, "
            f"clients {row['client_cpu_ms_per_image']} ms; server by thread {row['server_cpu_ms_per_image_by_thread']}  [{row['uptime']}]")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder (default: the shipped model)")
    parser.add_argument("--images", type=int, default=120, help="real photos per measurement")
    parser.add_argument("--clients", default="1,4,16", help="concurrent clients of each row (comma-separated)")
    parser.add_argument("--client-threads", action="store_true",
                        help="clients as threads of this process (default: one process each)")
    parser.add_argument("--no-sat-caption", action="store_true", help="skip the `sat caption` comparison")
    parser.add_argument("--baseline-rounds", type=int, default=3, metavar="K",
                        help="measure `sat caption`'s steady state K times and compare with the median (one "
                             "measurement moved 20-39 images/s from run to run on the shared 2-core machine)")
    parser.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                        help="extra `sat serve` option, repeatable: --server-arg=--workers=4")
    parser.add_argument("--soak", type=float, default=120, help="soak seconds (0: none)")
    parser.add_argument("--soak-clients", type=int, default=8)
    parser.add_argument("--plain-clients", action="store_true",
                        help="the concurrent clients post over kept-alive plain sockets (next to no client CPU, "
                             "as clients on other machines) instead of httpx")
    parser.add_argument("--nagle", action="store_true",
                        help="clients keep Nagle's algorithm on (httpx's default): ~40 ms more per request")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.nagle:
        os.environ["SAT_BENCH_NAGLE"] = "1"  # client processes inherit it
    if args.plain_clients:
        os.environ["SAT_BENCH_PLAIN"] = "1"
    paths = photos(args.images)
    out = {"machine": {"cpus": os.cpu_count(), "uptime_at_start": uptime()}, "server_args": args.server_arg}
    if not args.no_sat_caption:
        rounds = [sat_caption_rate(paths, args.model) for _ in range(max(1, args.baseline_rounds))]
        steadies = [round(s, 2) for s, _ in rounds if s]
        steady = statistics.median(steadies) if steadies else None
        out["sat_caption_images_per_s"] = round(steady, 2) if steady else None
        out["sat_caption_rounds_images_per_s"] = steadies
        out["sat_caption_reported_images_per_s"] = [r if r == r else None for _, r in rounds]  # NaN: not printed
        out["sat_caption_uptime"] = uptime()
        print(f"sat caption: steady state {out['sat_caption_images_per_s']} images/s ({len(paths)} minus "
              f"{len(paths) // 5} photos; median of {steadies}), "
              f"{out['sat_caption_reported_images_per_s']} images/s as the {len(paths)}-photo runs report it  "
              f"[{out['sat_caption_uptime']}]", file=sys.stderr)
    max_body = 4 << 20
    proc, url = start_server(args.model, ["--max-body", str(max_body), *args.server_arg])
    try:
        clients(url, proc.pid, paths[:8], 1)  # warm-up
        plain = out["idle_plain_client"] = plain_latencies(url, paths[:40])
        print(f"idle server, 1 plain-socket client, {plain['images']} photos one at a time: p50 {plain['p50_ms']} ms, "
              f"p90 {plain['p90_ms']} ms per photo (target < 150 ms)", file=sys.stderr)
        idle = out["idle_one_client"] = clients(url, proc.pid, paths[:40], 1)
        print(f"idle server, 1 client, {idle['images']} photos one at a time: p50 {idle['p50_ms']} ms, "
              f"p90 {idle['p90_ms']} ms per photo (target < 150 ms); server CPU {idle['server_cpu_ms_per_image']} ms "
              f"per photo  [{idle['uptime']}]", file=sys.stderr)
        out["clients"] = []
        for n in map(int, args.clients.split(",")):
            row = clients(url, proc.pid, paths, n, processes=not args.client_threads)
            if out.get("sat_caption_images_per_s"):
                row["vs_sat_caption"] = round(row["images_per_s"] / out["sat_caption_images_per_s"], 2)
            out["clients"].append(row)
            print(row_line(row) + (f"; {row['vs_sat_caption']}x sat caption" if "vs_sat_caption" in row else ""),
                  file=sys.stderr)
        if args.soak:
            s = out["soak"] = soak(url, proc.pid, paths, args.soak, args.soak_clients, max_body)
            print(f"soak {s['seconds']:g} s, {s['clients']} clients: {s['good']} good requests "
                  f"({s['good_failed']} failed), {s['bad']} bad ({s['bad_not_4xx']} not answered 4xx), "
                  f"{s['disconnects']} disconnects; RSS {s['rss_mb_first']} -> {s['rss_mb_last']} MB "
                  f"(after 1 min {s['rss_mb_after_1min']}, max {s['rss_mb_max']})  [{s['uptime']}]", file=sys.stderr)
            out["alive_after_soak"] = httpx.get(url + "/healthz").status_code == 200
    finally:
        proc.terminate()
        out["exit_status"] = proc.wait(120)
    print(f"server exit status after SIGTERM: {out['exit_status']}", file=sys.stderr)
    if args.json:
        print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
