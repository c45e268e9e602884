"""`sat serve`: options in, the model loaded once, uvicorn running the app (sat_cli/serve/)."""

from __future__ import annotations

import ipaddress
import re

import click

from .options import DEVICE, PRECISION, decode_options, settings_for

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "g": 1 << 30, "gb": 1 << 30}


class Size(click.ParamType):
    """A byte count: 1048576, 500k, 32MB, 1g."""

    name = "size"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
        if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
            self.fail(f"{value!r} is not a size (examples: 1048576, 500k, 32MB)", param, ctx)
        return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; another than loopback needs --token or --no-auth.")
@click.option("--port", default=8765, show_default=True, type=click.IntRange(0, 65535))
@click.option("--model", "model_path", type=click.Path(), help="Checkpoint folder. Default: the model shipped with sat.")
@click.option("--encoder-weights", type=click.Path(exists=True, dir_okay=False),
              help="Local file with the encoder's pretrained weights, for machines without internet.")
@decode_options
@click.option("--token", envvar="SAT_SERVE_TOKEN", help="Bearer token every endpoint but /healthz requires "
              "(or the SAT_SERVE_TOKEN environment variable, which other users cannot see in ps).")
@click.option("--no-auth", is_flag=True, help="Serve a non-loopback --host without a token (a trusted network only).")
@click.option("--db", "db_path", type=click.Path(dir_okay=False),
              help="Also store every served photo's result in this SQLite database (by content: a photo served "
                   "twice is captioned once); sat export, search and metadata read it.")
@click.option("--max-batch", default=16, show_default=True, type=click.IntRange(1),
              help="Most images the model takes at once, across requests.")
@click.option("--max-wait-ms", default=5.0, show_default=True, type=click.FloatRange(0),
              help="How long the first queued image waits for others to join its batch.")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(1),
              help="Images waiting for the model; more get 503 with Retry-After.")
@click.option("--max-in-flight", type=click.IntRange(1), metavar="N",
              help="Requests served at once (reading, decoding, queued, answering); more get 503 with Retry-After "
                   "in the caller's format.  [default: 4 x --max-queue + 64]")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1),
              help="Image-decoding threads (the model never waits on JPEG decoding).")
@click.option("--max-body", default="32MB", show_default=True, type=Size(), help="Largest request body.")
@click.option("--max-images", default=16, show_default=True, type=click.IntRange(1), help="Most images in one request.")
@click.option("--max-pixels", default=89_478_485, show_default=True, type=click.IntRange(1),
              help="Most pixels in one image (Pillow's decompression-bomb guard stays on as well).")
@click.option("--timeout", default=60.0, show_default=True, type=click.FloatRange(0, min_open=True),
              help="Seconds a request may wait for its captions before a 504.")
@click.option("--read-timeout", default=30.0, show_default=True, type=click.FloatRange(0, min_open=True),
              help="Seconds a client has to send its request body before a 408.")
@click.option("--fetch-from", multiple=True, metavar="HOST",
              help="Fetch image URLs (PhotoPrism's download links) from this host (or host:port); repeat for "
                   "more. Without it no URL is fetched.")
@click.option("--fetch-max", default="32MB", show_default=True, type=Size(), help="Largest image fetched from a URL.")
@click.option("--device", default="auto", show_default=True, type=DEVICE)
@click.option("--precision", default="auto", show_default=True, type=PRECISION)
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
def serve(host, port, model_path, encoder_weights, token, no_auth, db_path, max_batch, max_wait_ms, max_queue,
          max_in_flight, workers, max_body, max_images, max_pixels, timeout, read_timeout, fetch_from, fetch_max,
          device, precision, log_level, **decode):
    """Serve captions over HTTP: PhotoPrism's Vision API, the Ollama API and sat's own.

    \b
    POST /api/v1/vision/caption   PhotoPrism (vision.yml: RequestFormat/ResponseFormat vision)
    POST /api/generate            Ollama clients (model "sat"); also GET /api/tags, /api/version, POST /api/show
    POST /v1/caption              sat's own: multipart files or JSON base64; n-best, attention maps
    GET  /healthz                 liveness (no token needed)

    Requests arriving within --max-wait-ms are captioned together, up to --max-batch images,
    through the same pipeline as `sat caption` (same captions). Ctrl-C or SIGTERM finish the
    requests in flight, then stop (exit status 0). See docs/serving.md.

    \b
    Examples:
      sat serve
      SAT_SERVE_TOKEN=secret sat serve --host 0.0.0.0 --db served.db
      curl -F image=@photo.jpg localhost:8765/v1/caption
    """
    import signal

    import uvicorn

    from ..api import load
    from ..runtime import keep_freed_memory
    from ..serve import ServeOptions, create_app
    from ..serve.inputs import FetchPolicy
    from ..serve.limits import connection_backstop

    if not is_loopback(host) and not token and not no_auth:
        raise click.UsageError(f"--host {host} is reachable from other machines: give --token (or SAT_SERVE_TOKEN), "
                               "or --no-auth to serve without one.")
    sock = _bind(host, port)  # before the model loads: a port in use fails at once
    if db_path:  # a database that cannot be opened is a start-up error, not a failure of every request
        from ..store.writes import open_db

        open_db(db_path).close()
    keep_freed_memory()
    cap = load(model_path, device=device, precision=precision, encoder_weights=encoder_weights)
    settings = settings_for(cap.model.decode_defaults(), decode)
    hosts = frozenset(h.lower() for h in fetch_from)
    max_in_flight = max_in_flight or 4 * max_queue + 64
    options = ServeOptions(token=token, max_body=max_body, max_images=max_images, max_pixels=max_pixels,
                           timeout=timeout, read_timeout=read_timeout, workers=workers, max_in_flight=max_in_flight,
                           fetch=FetchPolicy(hosts=hosts, max_bytes=fetch_max))
    app = create_app(cap.model, settings, options, max_batch=max_batch, max_wait_ms=max_wait_ms,
                     max_queue=max_queue, db=db_path)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=timeout,
                            limit_concurrency=connection_backstop(max_in_flight), server_header=False)
    # uvicorn re-raises the stop signal once it has shut down gracefully; a no-op handler makes
    # that a plain return, so Ctrl-C and SIGTERM end with exit status 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    server = uvicorn.Server(config)
    server.run(sockets=[sock])
    if not server.started:
        raise click.ClickException("the server could not start (see the message above)")


def _bind(host: str, port: int):
    import socket

    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, address = infos[0]
        # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on connections whose socket says
        # TCP, and without it every answer on a kept-alive connection (PhotoPrism's Go client,
        # httpx, requests) waited ~40 ms for the client's delayed ACK
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return sock
