"""sat's own limit on the requests served at once (``--max-in-flight``): an ASGI middleware that
counts the requests in flight (from their first byte of headers to the last byte of their answer:
reading, decoding, queued, captioned, answering) and answers any past the limit at once with 503
and Retry-After, in the caller's format (formats.caller_format), before its body is read, as the
batcher's full-queue 503 does. ``/healthz`` is never refused, so a monitor sees a busy server as
alive. uvicorn's ``limit_concurrency`` stays as a much higher backstop on open connections (idle
keep-alive connections count there)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from starlette.responses import JSONResponse

from . import formats

EXEMPT = frozenset({"/healthz"})


@dataclass
class Gate:
    """The counters the middleware keeps (one event loop: no lock needed); /healthz shows them."""

    limit: int
    active: int = 0  # requests in flight now
    peak: int = 0  # most in flight at once
    refused: int = 0  # answered 503 because ``active`` was at ``limit``
    served: int = 0  # requests let in and finished
    served_s: float = 0.0  # their time in the app (first byte of headers to last of the answer), summed


def connection_backstop(max_in_flight: int) -> int:
    """uvicorn's ``limit_concurrency`` under sat's limit: it counts open connections, idle
    keep-alive ones included, and answers plain text past it, so it sits well above ours."""
    return 2 * max_in_flight + 64


class InFlightLimit:
    """ASGI middleware: at most ``gate.limit`` HTTP requests in the app at once; more get 503."""

    def __init__(self, app, gate: Gate, retry_after: int = 1):
        self.app, self.gate, self.retry_after = app, gate, retry_after

    async def __call__(self, scope, receive, send):
        gate = self.gate
        if scope["type"] != "http" or scope["path"] in EXEMPT:
            return await self.app(scope, receive, send)
        if gate.active >= gate.limit:
            gate.refused += 1
            message = (f"the server is busy ({gate.active} requests in flight, --max-in-flight {gate.limit}); "
                       "retry shortly")
            body = formats.ERRORS[formats.caller_format(scope["path"])](message, 503)
            return await JSONResponse(body, 503, headers={"Retry-After": str(self.retry_after)})(scope, receive, send)
        gate.active += 1
        gate.peak = max(gate.peak, gate.active)
        started = time.monotonic()
        try:
            await self.app(scope, receive, send)
        finally:
            gate.active -= 1
            gate.served += 1
            gate.served_s += time.monotonic() - started
