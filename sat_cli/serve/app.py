"""The routes of `sat serve` (Starlette): PhotoPrism's Vision API, the Ollama API, sat's own
/v1/caption, /healthz. Every error, from a bad token to a failed model, is answered in the
caller's format (formats.ERRORS); docs/serving.md is the reference."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from . import formats
from .batching import Batcher
from .inputs import BadRequest, FetchPolicy, Upload, check_pixels, decode_base64, fetch
from .limits import Gate, InFlightLimit

log = logging.getLogger("sat.serve")


@dataclass
class ServeOptions:
    token: str | None = None
    max_body: int = 32 << 20  # bytes of one request body
    max_images: int = 16  # images in one request
    max_pixels: int = 89_478_485  # pixels of one image (Pillow's own default limit)
    timeout: float = 60.0  # seconds a request may wait for its captions
    read_timeout: float = 30.0  # seconds to receive a request body
    workers: int = 2  # image-decoding threads
    max_in_flight: int | None = None  # requests served at once (None: 4 x max_queue + 64); more get 503
    fetch: FetchPolicy = field(default_factory=FetchPolicy)


class Service:
    """What the routes share: the model's description, the batcher, the decoding threads."""

    def __init__(self, model, batcher: Batcher, options: ServeOptions, gate: Gate):
        from ..inputs.images import Sources

        self.model, self.batcher, self.options, self.gate = model, batcher, options, gate
        self.sources = Sources(model.preprocess.size, model.preprocess.interpolation)
        from ..runtime import name_thread

        self.pool = ThreadPoolExecutor(max(1, options.workers), thread_name_prefix="sat-decode",
                                       initializer=name_thread, initargs=("sat-decode",))
        self.info = model_info(model)

    def decode(self, upload: Upload, sent: float):
        """-> (Result, seconds it waited for a thread, seconds it took)."""
        started = time.monotonic()
        check_pixels(upload, self.options.max_pixels)
        return self.sources.from_bytes(None, upload.data), started - sent, time.monotonic() - started

    async def caption(self, uploads: list[Upload], attention: bool = False):
        """Decode in the worker threads, caption through the batcher; a bad image is a 4xx."""
        if not uploads:
            raise BadRequest("no images in the request")
        if len(uploads) > self.options.max_images:
            raise BadRequest(f"{len(uploads)} images in one request; this server takes at most "
                             f"{self.options.max_images} (--max-images)", 413)
        loop = asyncio.get_running_loop()
        with self.batcher.arriving(len(uploads)):
            sent = time.monotonic()
            timed = await asyncio.gather(*(loop.run_in_executor(self.pool, self.decode, u, sent) for u in uploads))
            results = [r for r, _, _ in timed]
            stats = self.batcher.stats
            stats.images += len(timed)
            stats.decode_wait_s += sum(w for _, w, _ in timed)
            stats.decode_s += sum(d for _, _, d in timed)
            for u, r in zip(uploads, results):
                if r.error:
                    raise BadRequest(f"{u.name}: {r.error}", 413 if "decompression-bomb" in r.error else 400)
            future = self.batcher.submit(results, attention)
        results = await self.batcher.wait(future, self.options.timeout)
        for u, r in zip(uploads, results):
            if r.error or not r.captions:
                raise RuntimeError(f"{u.name}: {r.error or 'no caption'}")
        return results

    async def body(self, request: Request) -> bytes:
        """The whole body, refused (413) past --max-body before it is all read, 408 when it does
        not arrive within --read-timeout."""
        limit = self.options.max_body
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise BadRequest(f"request body of {declared} bytes is over the limit of {limit} (--max-body)", 413)

        async def read() -> bytes:
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise BadRequest(f"request body over the limit of {limit} bytes (--max-body)", 413)
                chunks.append(chunk)
            return b"".join(chunks)

        try:
            return await asyncio.wait_for(read(), self.options.read_timeout)
        except asyncio.TimeoutError:
            raise BadRequest(f"request body not received within {self.options.read_timeout:g} s", 408) from None

    async def json(self, request: Request) -> dict:
        try:
            data = json.loads(await self.body(request))
        except (ValueError, UnicodeDecodeError):
            raise BadRequest("the request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise BadRequest("the request body must be a JSON object")
        return data

    async def uploads(self, images, url: str | None = None) -> list[Upload]:
        if images is not None and not isinstance(images, list):
            raise BadRequest("images must be a list")
        out = [Upload(decode_base64(s, f"images[{i}]"), f"images[{i}]") for i, s in enumerate(images or [])]
        if url:
            out.append(Upload(await fetch(url, self.options.fetch, "url"), "url"))
        return out


def model_info(model) -> dict:
    import os
    from datetime import datetime, timezone

    params = sum(p.numel() for m in (model.encoder, model.decoder) for p in m.parameters())
    size = sum(p.numel() * p.element_size() for m in (model.encoder, model.decoder) for p in m.parameters())
    try:
        mtime = os.path.getmtime(os.path.join(model.path, "model.safetensors"))
    except (OSError, TypeError):
        mtime = time.time()
    return {"version": model.fingerprint[:12], "fingerprint": "sha256:" + model.fingerprint,
            "resolution": model.preprocess.size[0], "path": str(model.path), "encoder": model.encoder_spec,
            "parameter_size": f"{params / 1e6:.1f}M", "size": size, "quantization": "F32",
            "modified_at": datetime.fromtimestamp(mtime, timezone.utc).isoformat().replace("+00:00", "Z")}


def endpoint(fn):
    """Authentication and errors in the caller's format around a route."""

    async def wrapped(request: Request):
        service: Service = request.app.state.service
        fmt = formats.caller_format(request.url.path)
        state = {"id": ""}
        try:
            token = service.options.token
            if token and fn.__name__ != "healthz":
                given = request.headers.get("authorization", "")
                if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                    raise BadRequest("missing or wrong bearer token", 401, {"WWW-Authenticate": "Bearer"})
            return await fn(request, service, state)
        except BadRequest as exc:
            status, message, headers = exc.status, str(exc), exc.headers
        except ClientDisconnect:
            log.info("%s: the client disconnected mid-request", request.url.path)
            return Response(status_code=400)
        except Exception as exc:  # the model or the store failed: this request fails, the server goes on
            log.exception("%s failed", request.url.path)
            status, message, headers = 500, f"captioning failed: {type(exc).__name__}: {exc}", {}
        body = formats.photoprism_error(message, status, state["id"]) if fmt == "photoprism" \
            else formats.ERRORS[fmt](message, status)
        return JSONResponse(body, status, headers=headers)

    wrapped.__name__ = fn.__name__
    return wrapped


@endpoint
async def healthz(request, service: Service, state):
    b, gate = service.batcher, service.gate
    return JSONResponse({"status": "ok", "model": "sat:latest", "fingerprint": service.info["fingerprint"],
                         "queued": b.pending, "batches": b.batches, "images": b.images,
                         "in_flight": gate.active, "refused_busy": gate.refused, "requests": gate.served,
                         "request_seconds": round(gate.served_s, 3), "batching": b.stats.as_dict()})


@endpoint
async def photoprism_caption(request, service: Service, state):
    data = await service.json(request)
    state["id"] = str(data.get("id") or "")
    images = data.get("images") or []
    if not isinstance(images, list):
        raise BadRequest("images must be a list of data URLs")
    # PhotoPrism sends one photo per request (data URLs in images, or a download url): its caption
    uploads = await service.uploads(images[:1], None if images else data.get("url"))
    results = await service.caption(uploads)
    return JSONResponse(formats.photoprism_caption(state["id"], service.info, results[0]))


def _check_model(name) -> None:
    if str(name or "").lower() not in formats.OLLAMA_NAMES:
        raise BadRequest(f'model "{name}" not found, try pulling it first (this server has "sat")', 404)


@endpoint
async def ollama_generate(request, service: Service, state):
    data = await service.json(request)
    _check_model(data.get("model"))
    started = time.perf_counter()
    if not data.get("images"):
        if data.get("prompt"):
            raise BadRequest("sat captions images: send at least one base64 image in images")
        return JSONResponse({"model": "sat:latest", "created_at": formats.now_iso(), "response": "", "done": True,
                             "done_reason": "load"})  # Ollama's answer to a request that only loads the model
    results = await service.caption(await service.uploads(data.get("images")))
    text = formats.ollama_text(results, data.get("format"))
    seconds = time.perf_counter() - started
    if data.get("stream", True) is False:
        return JSONResponse(formats.ollama_generate(text, results, seconds))
    lines = (json.dumps(chunk) + "\n" for chunk in formats.ollama_chunks(text, results, seconds))
    return StreamingResponse(lines, media_type="application/x-ndjson")


@endpoint
async def ollama_chat(request, service: Service, state):
    """/api/chat: the images of the last user message that has any are captioned; the text is ignored."""
    data = await service.json(request)
    _check_model(data.get("model"))
    started = time.perf_counter()
    messages = data.get("messages") or []
    if not isinstance(messages, list):
        raise BadRequest("messages must be a list")
    images = next((m.get("images") for m in reversed(messages) if isinstance(m, dict) and m.get("images")), None)
    if not images:
        if messages:
            raise BadRequest("sat captions images: send at least one base64 image in a message's images")
        return JSONResponse({"model": "sat:latest", "created_at": formats.now_iso(),
                             "message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "load"})
    results = await service.caption(await service.uploads(images))
    text = formats.ollama_text(results, data.get("format"))
    chunks = formats.ollama_chunks(text, results, time.perf_counter() - started)
    chunks = [formats.as_chat(c) for c in chunks]
    if data.get("stream", True) is False:
        final = chunks[-1]
        final["message"]["content"] = text
        return JSONResponse(final)
    return StreamingResponse((json.dumps(c) + "\n" for c in chunks), media_type="application/x-ndjson")


@endpoint
async def ollama_tags(request, service: Service, state):
    return JSONResponse(formats.ollama_tags(service.info))


@endpoint
async def ollama_version(request, service: Service, state):
    from .. import __version__

    return JSONResponse({"version": __version__})


@endpoint
async def ollama_show(request, service: Service, state):
    data = await service.json(request)
    _check_model(data.get("model") or data.get("name"))
    return JSONResponse(formats.ollama_show(service.info))


def _flag(value) -> bool:
    return value is True or str(value).lower() in ("1", "true", "yes", "on")


@endpoint
async def sat_caption(request, service: Service, state):
    kind = request.headers.get("content-type", "")
    if kind.startswith("multipart/form-data"):
        body = await service.body(request)

        async def replay():
            return {"type": "http.request", "body": body, "more_body": False}

        from starlette.datastructures import UploadFile
        from starlette.formparsers import MultiPartException

        try:
            form = await Request(request.scope, replay).form(max_files=service.options.max_images, max_fields=50)
        except MultiPartException as exc:
            raise BadRequest(f"bad multipart upload: {exc.message}") from None
        files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
        uploads = [Upload(await f.read(), f.filename or f"file[{i}]") for i, f in enumerate(files)]
        attention = _flag(form.get("attention"))
        await form.close()
        for u in uploads:
            if not u.data:
                raise BadRequest(f"{u.name}: empty image (zero bytes)")
    else:
        data = await service.json(request)
        uploads = await service.uploads(data.get("images"))
        attention = _flag(data.get("attention"))
    results = await service.caption(uploads, attention)
    return JSONResponse({"model": {"name": "sat", "version": service.info["version"],
                                   "fingerprint": service.info["fingerprint"]},
                         "results": [formats.sat_result(u.name, r, attention) for u, r in zip(uploads, results)]})


def create_app(model, settings, options: ServeOptions, *, max_batch: int = 16, max_wait_ms: float = 5.0,
               max_queue: int = 64, db: str | None = None) -> Starlette:
    """The ASGI app: the model thread starts with the app and, on shutdown, finishes what is
    queued before it stops (uvicorn first lets the requests in flight complete)."""
    from .store import ServeStore

    store_factory = (lambda: ServeStore(db, model, settings)) if db else None
    batcher = Batcher(model, settings, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue,
                      store_factory=store_factory)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        try:
            yield
        finally:
            batcher.close(timeout=options.timeout)
            app.state.service.pool.shutdown(wait=False)

    routes = [
        Route("/healthz", healthz), Route("/api/v1/vision/caption", photoprism_caption, methods=["POST"]),
        Route("/api/generate", ollama_generate, methods=["POST"]), Route("/api/chat", ollama_chat, methods=["POST"]),
        Route("/api/tags", ollama_tags),
        Route("/api/version", ollama_version), Route("/api/show", ollama_show, methods=["POST"]),
        Route("/v1/caption", sat_caption, methods=["POST"]),
    ]
    async def not_found(request: Request, exc):  # unknown paths and methods: an error in the caller's format
        status = getattr(exc, "status_code", 404)
        fmt = formats.caller_format(request.url.path)
        message = f"{request.method} {request.url.path}: {'no such endpoint' if status == 404 else 'method not allowed'}"
        return JSONResponse(formats.ERRORS[fmt](message, status), status)

    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware

    gate = Gate(options.max_in_flight or 4 * max_queue + 64)
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: not_found},
                    middleware=[Middleware(InFlightLimit, gate=gate)])
    app.state.service = Service(model, batcher, options, gate)
    return app
