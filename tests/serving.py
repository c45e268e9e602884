"""Helpers for the `sat serve` tests: the real app on uvicorn, in this process, on a free port of
127.0.0.1."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from contextlib import contextmanager


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(make_app, attempts: int = 10):
    """Start ``make_app()`` on uvicorn in a thread; yields its base URL; stops it (gracefully) after.
    A port taken between choosing and binding it (EADDRINUSE) is retried on another."""
    import uvicorn

    for _ in range(attempts):
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(make_app(), host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started and thread.is_alive():
            time.sleep(0.02)
        if server.started:
            break
        thread.join()  # the bind failed: uvicorn shut the app down; try another port
    else:
        raise RuntimeError("could not start the server on a free port")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def tiny_app(tiny_model, db=None, **options):
    """A factory of the app over the tiny test model, with ServeOptions and batcher ``options``."""
    import sat_cli
    from sat_cli.serve import ServeOptions, create_app

    cap = sat_cli.load(str(tiny_model), device="cpu")
    batch = {k: options.pop(k) for k in ("max_batch", "max_wait_ms", "max_queue") if k in options}
    return lambda: create_app(cap.model, cap.settings(), ServeOptions(**options), db=db, **batch), cap


def data_url(data: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png_bytes(size=(40, 30), color=(200, 30, 30)) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, "PNG")
    return out.getvalue()


def photoprism_request(images: list[str], request_id: str = "3f6c0a1e-5b1d-4e6a-9a1e-1c2b3d4e5f60") -> dict:
    """The JSON PhotoPrism's Go client sends (ApiRequest marshalled by encoding/json, as
    NewApiRequestImages and captionInternal fill it): omitempty fields left out, ``suffix`` and
    ``stream`` always present."""
    return {"id": request_id, "model": "sat", "version": "latest", "prompt": "Create a caption with exactly one "
            "sentence in the active voice that describes the main visual content.", "suffix": "",
            "options": {"temperature": 0.1}, "stream": False, "images": images}
