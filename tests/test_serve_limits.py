"""`sat serve` left running: every bad input gets a 4xx in the caller's format and the server goes
on; token, body size, queue, model failure, timeouts, URL fetching, SIGTERM."""

import http.server
import io
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib

import httpx
import pytest
from conftest import EXAMPLES
from serving import b64, data_url, free_port, photoprism_request, png_bytes, running, tiny_app

GOOD = png_bytes()


def bomb_png(width=40000, height=40000) -> bytes:
    """A PNG whose header declares width x height pixels (Pillow's bomb guard refuses it on open)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + chunk(b"IEND", b""))


def jpeg_bytes() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.open(EXAMPLES / "rocket.jpg").save(out, "JPEG")
    return out.getvalue()


BAD = {  # name: (what is sent as base64, the status)
    "not an image": (b"just some text, not a photo", 400),
    "truncated JPEG": (jpeg_bytes()[:600], 400),
    "decompression bomb": (bomb_png(), 413),
}


@pytest.fixture(scope="module")
def server(tiny_model):
    make, _ = tiny_app(tiny_model, max_body=200_000, max_images=3)
    with running(make) as url:
        yield url


def caption_ok(url):
    r = httpx.post(url + "/v1/caption", json={"images": [b64(GOOD)]})
    assert r.status_code == 200 and r.json()["results"][0]["caption"] is not None


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_images_get_4xx_in_each_callers_format(server, name):
    data, status = BAD[name]
    r = httpx.post(server + "/api/v1/vision/caption", json=photoprism_request([data_url(data)], "req-1"))
    assert r.status_code == status
    assert r.json()["code"] == status and r.json()["id"] == "req-1" and r.json()["error"]
    r = httpx.post(server + "/api/generate", json={"model": "sat", "images": [b64(data)], "stream": False})
    assert r.status_code == status and set(r.json()) == {"error"}
    r = httpx.post(server + "/v1/caption", files=[("image", ("x.jpg", data))])
    assert r.status_code == status and r.json()["error"]["status"] == status and "x.jpg" in r.json()["error"]["message"]
    caption_ok(server)


@pytest.mark.parametrize("body, message", [
    ({"images": []}, "no images"),
    ({"images": ["%%%not base64%%%"]}, "base64"),
    ({"images": [""]}, "zero bytes"),
    ({"images": "AAAA"}, "list"),
    ({"images": [b64(GOOD)] * 4}, "at most 3"),
    ({"images": [data_url(b"")]}, "zero bytes"),
])
def test_bad_requests(server, body, message):
    r = httpx.post(server + "/v1/caption", json=body)
    assert 400 <= r.status_code < 500 and message in r.json()["error"]["message"]
    r = httpx.post(server + "/v1/caption", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(server + "/v1/caption", files=[("image", ("empty.jpg", b""))])
    assert r.status_code == 400 and "zero bytes" in r.json()["error"]["message"]
    r = httpx.post(server + "/api/v1/vision/caption", json={"id": "x"})
    assert r.status_code == 400 and r.json()["code"] == 400
    caption_ok(server)


def test_body_size_limit(server):
    big = {"images": [b64(os.urandom(300_000))]}
    r = httpx.post(server + "/v1/caption", json=big)  # Content-Length over the limit: refused unread
    assert r.status_code == 413 and "--max-body" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(30):
            yield b"x" * 10_000

    r = httpx.post(server + "/api/v1/vision/caption", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["code"] == 413
    caption_ok(server)


def test_client_that_disconnects_mid_upload(server):
    host, port = server.removeprefix("http://").split(":")
    for _ in range(3):
        with socket.create_connection((host, int(port))) as s:
            s.sendall(b"POST /v1/caption HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100000\r\n\r\n{\"images\": [\"AAAA")
        time.sleep(0.05)
    caption_ok(server)


def test_unknown_endpoint_in_callers_format(server):
    assert httpx.get(server + "/api/nothing").json() == {"error": "GET /api/nothing: no such endpoint"}
    r = httpx.get(server + "/v1/caption")
    assert r.status_code == 405 and r.json()["error"]["status"] == 405


def test_token(tiny_model):
    import ollama

    make, _ = tiny_app(tiny_model, token="s3cret")
    with running(make) as url:
        assert httpx.get(url + "/healthz").status_code == 200
        for path, body in (("/api/v1/vision/caption", photoprism_request([data_url(GOOD)])),
                           ("/api/generate", {"model": "sat", "images": [b64(GOOD)], "stream": False}),
                           ("/v1/caption", {"images": [b64(GOOD)]})):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                r = httpx.post(url + path, json=body, headers=headers)
                assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer" and "token" in r.text
            assert httpx.post(url + path, json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(url + "/api/tags").status_code == 401
        with pytest.raises(ollama.ResponseError):
            ollama.Client(host=url).list()
        client = ollama.Client(host=url, headers={"Authorization": "Bearer s3cret"})
        assert client.generate(model="sat", prompt="", images=[GOOD]).response


def slow_model(monkeypatch, seconds=None, error=None):
    import sat_cli.pipeline as pipeline

    real = pipeline.caption_rows

    def patched(*args, **kwargs):
        if error:
            raise error
        time.sleep(seconds)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "caption_rows", patched)


def test_queue_full_answers_503_with_retry_after(tiny_model, monkeypatch):
    slow_model(monkeypatch, seconds=1.5)
    make, _ = tiny_app(tiny_model, max_queue=1, max_wait_ms=0)
    with running(make) as url:
        first = threading.Thread(target=httpx.post, args=(url + "/v1/caption",), kwargs={
            "json": {"images": [b64(GOOD)]}, "timeout": 30})
        first.start()
        time.sleep(0.5)  # the first is in the model
        r = httpx.post(url + "/api/v1/vision/caption", json=photoprism_request([data_url(GOOD)]))
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and "busy" in r.json()["error"]
        r = httpx.post(url + "/api/generate", json={"model": "sat", "images": [b64(GOOD)], "stream": False})
        assert r.status_code == 503 and "busy" in r.json()["error"]
        first.join()
        assert httpx.post(url + "/v1/caption", json={"images": [b64(GOOD)]}, timeout=30).status_code == 200


def test_requests_past_max_in_flight_get_503_in_the_callers_format(tiny_model, monkeypatch):
    """sat's own limit on requests in flight (not uvicorn's plain-text 503): past it every format
    gets its own error shape with Retry-After, /healthz still answers, and the server goes on."""
    slow_model(monkeypatch, seconds=1.5)
    make, _ = tiny_app(tiny_model, max_in_flight=2, max_wait_ms=0)
    with running(make) as url:
        busy = [threading.Thread(target=httpx.post, args=(url + "/v1/caption",),
                                 kwargs={"json": {"images": [b64(GOOD)]}, "timeout": 30}) for _ in range(2)]
        for t in busy:
            t.start()
        deadline = time.monotonic() + 10
        while httpx.get(url + "/healthz").json()["in_flight"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        r = httpx.post(url + "/api/v1/vision/caption", json=photoprism_request([data_url(GOOD)]))
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["code"] == 503 and "busy" in r.json()["error"] and r.json()["result"] == {}
        r = httpx.post(url + "/api/generate", json={"model": "sat", "images": [b64(GOOD)], "stream": False})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert set(r.json()) == {"error"} and "--max-in-flight 2" in r.json()["error"]
        r = httpx.post(url + "/v1/caption", files=[("image", ("x.png", GOOD))])
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and r.json()["error"]["status"] == 503
        assert httpx.get(url + "/api/tags").status_code == 503
        health = httpx.get(url + "/healthz")
        assert health.status_code == 200 and health.json()["refused_busy"] == 4
        for t in busy:
            t.join()
        assert httpx.get(url + "/healthz").json()["in_flight"] == 0
        r = httpx.post(url + "/api/v1/vision/caption", json=photoprism_request([data_url(GOOD)]), timeout=30)
        assert r.status_code == 200 and r.json()["result"]["caption"]["text"]
        assert httpx.post(url + "/api/generate", json={"model": "sat", "images": [b64(GOOD)], "stream": False},
                          timeout=30).json()["response"]
        caption_ok(url)


def test_max_in_flight_option_and_uvicorns_connection_backstop(tiny_model, monkeypatch):
    """`sat serve --max-in-flight N` sets sat's limit; uvicorn's limit_concurrency (open
    connections, plain text past it) is only a backstop well above it."""
    import uvicorn
    from click.testing import CliRunner

    from sat_cli.cli import cli

    seen = {}

    def run(self, sockets=None):
        seen["config"] = self.config
        self.started = True
        for s in sockets:
            s.close()

    monkeypatch.setattr(uvicorn.Server, "run", run)
    for extra, limit in ((["--max-in-flight", "3"], 3), (["--max-queue", "10"], 104)):
        res = CliRunner().invoke(cli, ["serve", "--model", str(tiny_model), "--device", "cpu", "--port", "0", *extra])
        assert res.exit_code == 0, res.output
        config = seen["config"]
        assert config.app.state.service.gate.limit == limit
        assert config.limit_concurrency >= 2 * limit + 64


def test_model_failure_is_500_and_the_server_goes_on(tiny_model, monkeypatch):
    make, _ = tiny_app(tiny_model)
    with running(make) as url:
        slow_model(monkeypatch, error=RuntimeError("CUDA out of memory"))
        r = httpx.post(url + "/api/v1/vision/caption", json=photoprism_request([data_url(GOOD)]))
        assert r.status_code == 500 and r.json()["code"] == 500 and "out of memory" in r.json()["error"]
        r = httpx.post(url + "/api/generate", json={"model": "sat", "images": [b64(GOOD)], "stream": True})
        assert r.status_code == 500 and "out of memory" in r.json()["error"]
        monkeypatch.undo()
        caption_ok(url)


def test_timeouts(tiny_model, monkeypatch):
    slow_model(monkeypatch, seconds=1.0)
    make, _ = tiny_app(tiny_model, timeout=0.3, read_timeout=0.5)
    with running(make) as url:
        r = httpx.post(url + "/v1/caption", json={"images": [b64(GOOD)]})
        assert r.status_code == 504 and "--timeout" in r.json()["error"]["message"]
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as s:  # a body that never comes
            s.sendall(b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"model\"")
            reply = ""
            while '"error"' not in reply and (chunk := s.recv(4096)):
                reply += chunk.decode()
        assert reply.startswith("HTTP/1.1 408") and '"error"' in reply


class _Images(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/photo.png":
            self.send_response(200)
            self.send_header("Content-Length", str(len(GOOD)))
            self.end_headers()
            self.wfile.write(GOOD)
        elif self.path == "/same-host":
            self.send_response(302)
            self.send_header("Location", "/photo.png")
            self.end_headers()
        elif self.path == "/elsewhere":
            self.send_response(302)
            self.send_header("Location", f"http://localhost:{self.server.server_port}/photo.png")
            self.end_headers()
        else:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"x" * 100_000)  # bigger than the fetch cap, no Content-Length

    def log_message(self, *args):
        pass


def test_url_fetching(tiny_model):
    from sat_cli.serve.inputs import FetchPolicy

    images = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    threading.Thread(target=images.serve_forever, daemon=True).start()
    origin = f"127.0.0.1:{images.server_port}"
    make, _ = tiny_app(tiny_model, fetch=FetchPolicy(hosts=frozenset({origin}), max_bytes=50_000))
    try:
        with running(make) as url:
            def ask(image_url):
                return httpx.post(url + "/api/v1/vision/caption", json={"id": "u", "model": "sat", "url": image_url})

            assert ask(f"http://{origin}/photo.png").json()["result"]["caption"]["text"]
            assert ask(f"http://{origin}/same-host").status_code == 200
            r = ask(f"http://{origin}/elsewhere")  # a redirect to a host not allowed
            assert r.status_code == 403 and "not one this server fetches from" in r.json()["error"]
            assert ask(f"http://{origin}/huge").status_code == 413
            assert ask("file:///etc/passwd").status_code == 400
            assert ask("/etc/passwd").status_code == 400
            assert ask(f"http://localhost:{images.server_port}/photo.png").status_code == 403
    finally:
        images.shutdown()


def test_sigterm_finishes_the_request_in_flight_then_exits_0(tiny_model):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sat_cli", "serve", "--model", str(tiny_model), "--port", str(port),
                             "--device", "cpu", "--log-level", "warning"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
                time.sleep(0.2)
        body = ('{"images": ["%s"]}' % b64(GOOD)).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(b"POST /v1/caption HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(body) + body[:10])
            time.sleep(0.3)
            proc.send_signal(signal.SIGTERM)  # mid-request: the server stops listening, then finishes it
            time.sleep(0.5)
            s.sendall(body[10:])
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 200") and b'"caption"' in reply
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
