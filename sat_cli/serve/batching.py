"""Batching across requests: each request's decoded images wait in one bounded queue; the model
thread takes whatever arrived within ``max_wait_ms`` of the first, up to ``max_batch`` images,
and runs them through the one inference pipeline (``pipeline.caption_rows``, what `sat caption`
runs). JPEG decoding happens before, in the request's worker thread, so the model never waits on
it. Callers that send again as soon as they are answered share batches: after a model call, the
next batch waits (up to a quarter of that call, RETURN_SHARE) until as many images as the call
answered have come back, beside those that queued while it ran; and an image that queued behind a
busy model may wait a tenth of that time more (CATCH_UP). A full queue answers 503 with
Retry-After; a request whose caller gave up is dropped."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import threading
import time
from dataclasses import dataclass, field

from ..records import Result
from .inputs import BadRequest


CATCH_UP = 0.1  # share of its queue time a waiting image may wait more to fill its batch
LONGEST_CATCH_UP = 0.5  # seconds
RETURN_SHARE = 0.25  # share of the last model call a batch may wait for the callers it answered


@dataclass
class Job:
    results: list[Result]  # decoded: pixels set, or error
    attention: bool
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    queued: float = field(default_factory=time.monotonic)


@dataclass
class Stats:
    """Where served images spend their time and why batches stop growing; /healthz shows it as
    ``batching`` and bench/serve_bench.py prints it (the evidence for --max-wait-ms, --workers)."""

    sizes: collections.Counter = field(default_factory=collections.Counter)  # images per model call -> calls
    # why a batch stopped growing: "full" (--max-batch), "waited" (--max-wait-ms up and no image
    # being decoded), "grace" (images still being decoded when the grace ran out), "closing"
    closed: collections.Counter = field(default_factory=collections.Counter)
    decoding_at_close: int = 0  # images being decoded when batches closed, summed
    images: int = 0  # images decoded
    decode_wait_s: float = 0.0  # waiting for a decoding thread, summed over images
    decode_s: float = 0.0  # decoding (a thread's own time per image, summed)
    queued_s: float = 0.0  # from the queue to the model, summed over images
    model_s: float = 0.0  # model calls, summed over calls

    def as_dict(self) -> dict:
        """Running totals (a bench takes the difference of two readings)."""
        return {"sizes": {str(k): v for k, v in sorted(self.sizes.items())}, "closed": dict(self.closed),
                "decoding_at_close": self.decoding_at_close, "images_decoded": self.images,
                "seconds": {"decode_wait": round(self.decode_wait_s, 3), "decode": round(self.decode_s, 3),
                            "queued": round(self.queued_s, 3), "model": round(self.model_s, 3)}}


class Batcher:
    def __init__(self, model, settings, *, max_batch: int = 16, max_wait_ms: float = 5.0, max_queue: int = 64,
                 store_factory=None):
        self.model, self.settings = model, settings
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.store_factory = store_factory  # called in the model thread (SQLite connections stay in theirs)
        self.store = None
        self.queue: collections.deque[Job] = collections.deque()
        self.pending = 0  # images queued or in the model
        self.incoming = 0  # images of requests being decoded
        self.grace = max(4 * self.max_wait, 0.02)  # longest extra wait for them
        self.batches = self.images = 0  # counters for /healthz
        # the last model call: when it ended, how long it took and how many images it answered
        # (the next batch expects those back, beside the images that queued while it ran)
        self.last_done = self.last_call = 0.0
        self.last_answered = 0
        self.stats = Stats()
        self.closed = False
        self.cond = threading.Condition()
        self.ready = concurrent.futures.Future()  # the store is open (or failed to open)
        self.thread = threading.Thread(target=self._run, name="sat-model", daemon=True)

    def start(self) -> None:
        self.thread.start()
        self.ready.result()  # a database that cannot be opened fails the start-up, not the first request

    def submit(self, results: list[Result], attention: bool) -> concurrent.futures.Future:
        n = len(results)
        with self.cond:
            if self.closed:
                raise BadRequest("the server is shutting down", 503, {"Retry-After": "5"})
            if self.pending and self.pending + n > self.max_queue:
                raise BadRequest(f"the server is busy ({self.pending} images queued, --max-queue {self.max_queue}); "
                                 "retry shortly", 503, {"Retry-After": "1"})
            job = Job(results, attention)
            self.queue.append(job)
            self.pending += n
            self.cond.notify()
        return job.future

    @contextlib.contextmanager
    def arriving(self, n: int):
        """Around a request's decoding: the model thread, once its --max-wait-ms is up, still waits
        a little (``grace``) for images that are being decoded, so batches fill when many clients
        send at once."""
        with self.cond:
            self.incoming += n
        try:
            yield
        finally:
            with self.cond:
                self.incoming -= n
                self.cond.notify()

    async def wait(self, future: concurrent.futures.Future, timeout: float) -> list[Result]:
        """The captions of a submitted job; 504 after ``timeout`` seconds."""
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout)
        except asyncio.TimeoutError:
            future.cancel()  # still queued: dropped; already in the model: finished and discarded
            raise BadRequest(f"no caption within {timeout:g} s (--timeout); the server is overloaded", 504) from None

    def close(self, timeout: float | None = None) -> None:
        """Finish what is queued, then stop the model thread and close the store."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        if self.thread.is_alive():
            self.thread.join(timeout)

    def _take(self) -> list[Job] | None:
        with self.cond:
            while not self.queue and not self.closed:
                self.cond.wait()
            if not self.queue:
                return None
            now = time.monotonic()
            # Images that queued behind a busy model may wait a tenth of that time more for others:
            # the callers just answered (who often send again at once) join them, instead of
            # closed-loop clients splitting into two half-batches that take turns for ever.
            deadline = now + max(self.max_wait, min(LONGEST_CATCH_UP, CATCH_UP * (now - self.queue[0].queued)))
            # And the batch after a model call waits, a bounded time, until the images that call
            # answered are back beside those that queued while it ran (16 closed-loop clients: 16).
            before = sum(len(j.results) for j in self.queue if j.queued < self.last_done)
            expected = min(self.max_batch, before + self.last_answered)
            returning = self.last_done + min(LONGEST_CATCH_UP, RETURN_SHARE * self.last_call)
            while (queued := sum(len(j.results) for j in self.queue)) < self.max_batch and not self.closed:
                now = time.monotonic()
                end = max(deadline, returning) if queued < expected else deadline
                if now >= end + self.grace or (now >= end and not self.incoming):
                    break
                self.cond.wait((end if now < end else end + self.grace) - now)
            jobs, size = [], 0
            while self.queue and (not jobs or size + len(self.queue[0].results) <= self.max_batch):
                job = self.queue.popleft()
                jobs.append(job)
                size += len(job.results)
            self._closed(jobs, size)
            return jobs

    def _closed(self, jobs: list[Job], size: int) -> None:
        stats, now = self.stats, time.monotonic()
        if self.closed:
            why = "closing"
        elif size >= self.max_batch or self.queue:
            why = "full"
        else:
            why = "grace" if self.incoming else "waited"
        stats.closed[why] += 1
        stats.decoding_at_close += self.incoming
        stats.sizes[size] += 1
        stats.queued_s += sum((now - j.queued) * len(j.results) for j in jobs)

    def _run(self) -> None:
        from ..runtime import name_thread

        name_thread("sat-model")  # bench/serve_bench.py reads each thread's CPU by name
        try:
            self.store = self.store_factory() if self.store_factory else None
        except BaseException as exc:
            self.ready.set_exception(exc)
            return
        self.ready.set_result(True)
        try:
            while (jobs := self._take()) is not None:
                live = [j for j in jobs if j.future.set_running_or_notify_cancel()]
                try:
                    if live:
                        started = time.monotonic()
                        self._caption(live)
                        done = time.monotonic()
                        self.stats.model_s += done - started
                        with self.cond:  # before any caller hears back
                            self.last_done, self.last_call = done, done - started
                            self.last_answered = sum(len(j.results) for j in live)
                except Exception as exc:  # the model failed: these requests get a 500, the server goes on
                    for j in live:
                        j.future.set_exception(exc)
                else:
                    for j in live:
                        j.future.set_result(j.results)
                finally:
                    with self.cond:
                        self.pending -= sum(len(j.results) for j in jobs)
        finally:
            if self.store is not None:
                self.store.close()

    def _caption(self, jobs: list[Job]) -> None:
        import torch

        from ..pipeline import caption_rows
        from ..runtime import precision_scope

        items = [r for j in jobs for r in j.results if r.pixels is not None]
        if self.store is not None:
            known = self.store.lookup({r.sha256 for r in items})
            for r in items:
                if r.sha256 in known:
                    r.captions, r.pixels = known[r.sha256], None
        groups: dict[str, list[Result]] = {}
        for r in items:
            if r.pixels is not None:
                groups.setdefault(r.sha256, []).append(r)  # one photo sent twice in a batch: captioned once
        firsts = [g[0] for g in groups.values()]
        if firsts:
            pixels = torch.stack([r.pixels for r in firsts])
            for row, r in enumerate(firsts):
                r.row = row
            attention = self.store is not None or any(j.attention for j in jobs)
            with precision_scope(self.model.device, self.model.precision):
                caption_rows(self.model, firsts, pixels, self.settings, attention)
            for g in groups.values():
                for r in g[1:]:
                    r.captions, r.error = g[0].captions, g[0].error
            if self.store is not None:
                self.store.save(firsts)
        for r in items:
            r.pixels = None
        self.batches += 1
        self.images += len(items)
