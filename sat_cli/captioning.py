"""``sat caption`` (and ``Captioner.to_db``): find the files, caption them through the pipeline,
store each batch in one transaction, skip what is stored, and report the run."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Callable

from .errors import SatError
from .model.beam import DecodeSettings
from .records import Result


@dataclass
class CaptionOptions:
    batch_size: int = 64
    workers: int | None = None  # DataLoader workers; None: one per spare core, 1 to 8
    force: bool = False  # redo images already captioned with this model and settings
    rehash: bool = False  # read and hash every file, whatever the file index says
    attention: bool = True  # store per-word attention maps
    recursive: bool = True
    quiet: bool = False
    read_timeout: float | None = None  # seconds before a stalled file read is given up (None: 60)
    db_timeout: float = 60.0  # seconds to wait for another program's lock on the database


@dataclass
class Summary:
    run_id: int
    total: int = 0
    captioned: int = 0
    skipped: int = 0
    failed: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    interrupted: bool = False
    seconds: float = 0.0
    writer: bool = True  # under torchrun, rank 0: the process that stored the run and reports it

    @property
    def exit_code(self) -> int:
        """sat caption's exit status: 130 interrupted, 1 some files failed, 0 otherwise."""
        return 130 if self.interrupted else 1 if self.failed else 0


def caption_to_db(model, inputs: list[str], db_path: str, settings: DecodeSettings, options: CaptionOptions,
                  on_result: Callable[[Result], None] | None = None, dist=None) -> Summary:
    """Caption ``inputs`` (files, folders, globs) with ``model`` (a checkpoint ready for inference)
    into the database at ``db_path``.

    Under torchrun each rank captions every WORLD_SIZE-th file and sends its results to rank 0,
    the only process that opens the database (so ranks on other machines never touch the SQLite
    file). A rank that dies ends the run; what rank 0 stored stays, and a rerun does the rest."""
    from .inputs.images import discover
    from .pipeline import caption_batches
    from .runtime import Dist, StopSignal, default_workers
    from .store.writes import Store, open_db

    dist = dist or Dist()
    dist.init_objects()
    found = list(discover(inputs, options.recursive))
    if not found:  # before the database exists: an empty folder leaves nothing behind
        raise SatError("No image files found in " + ", ".join(map(str, inputs)))
    good = [f.path for f in found if not f.error]
    paths = good[dist.rank :: dist.world]
    fingerprint, key = model.fingerprint, settings.key()
    summary = Summary(run_id=0, total=len(good) + sum(1 for f in found if f.error), writer=dist.main)
    db = store = None
    if dist.main:
        db = open_db(db_path, timeout=options.db_timeout)
        store = Store(db)
        summary.run_id = store.start_run(
            model_path=model.path, model_fingerprint=fingerprint, encoder=model.encoder_spec,
            settings=json.dumps(settings.to_dict()), settings_key=key, batch_size=options.batch_size,
            **_run_device(model),
        )
    started = time.perf_counter()
    writer = _Writer(summary, store, fingerprint, key, on_result) if dist.main else None
    if writer:
        writer.write([Result(f.path, error=f.error) for f in found if f.error])
    from .store.queries import done_hashes

    done = dist.broadcast(frozenset() if options.force or not dist.main else done_hashes(db, fingerprint, key))
    if dist.world == 1:  # one process: trust the file index for files unchanged since they were hashed
        paths, known = _unchanged(db, paths, done, writer.stats, options.rehash)
        for i in range(0, len(known), 1000):
            writer.write(known[i : i + 1000])
    workers = default_workers() if options.workers is None else options.workers
    status = "done"
    with StopSignal(interrupt=True), _progress(options.quiet or not dist.main or not paths, len(paths)) as advance, \
            contextlib.ExitStack() as scope:
        try:
            if not paths and dist.world == 1:  # nothing to read: no model, no workers
                raise _NothingToDo
            if getattr(model, "lazy", False):  # built now: the first file that needs reading
                model = model.build()
                from .runtime import precision_scope

                scope.enter_context(precision_scope(model.device, model.precision))
                if store:
                    store.db.execute("UPDATE runs SET device = ?, precision = ? WHERE id = ?",
                                     [str(model.device), model.precision, summary.run_id])
            batches = caption_batches(model, paths, settings, batch_size=options.batch_size, workers=workers,
                                      attention=options.attention, skip=done, dedupe=True,
                                      read_timeout=options.read_timeout)
            if dist.world == 1:  # batches are stored in a writer thread while the next ones are captioned
                writer.start()
                for results in batches:
                    writer.put(results)
                    advance(len(results), summary.failed)
                writer.drain()
            else:
                _gather_rounds(dist, batches, writer, advance, summary)
                # Every rank left the rounds together: tear the gloo group down now. A rank that
                # exits with the group alive can abort in gloo's threads at interpreter exit
                # ("terminate called without an active exception"; pytorch/pytorch#190489), which
                # torchrun reports as a failed run. Not on failure: a barrier would wait for a dead rank.
                dist.close()
        except _NothingToDo:
            pass
        except KeyboardInterrupt:
            status = "interrupted"
            summary.interrupted = True
        except BaseException:
            status = "failed"
            raise
        finally:
            summary.seconds = time.perf_counter() - started
            if writer:
                writer.stop()
                writer.finish(status)
    return summary


class _NothingToDo(Exception):
    pass


def _run_device(model) -> dict:
    """The runs row's device and precision: those asked for while a lazy model is not built yet."""
    if getattr(model, "lazy", False) and not model.built:
        return {"device": model.run_device, "precision": model.run_precision}
    return {"device": str(model.device), "precision": model.precision}


class _Writer:
    """Rank 0's side: stores each batch in one transaction and keeps the run's counts."""

    def __init__(self, summary: Summary, store, fingerprint: str, key: str, on_result):
        self.summary, self.store, self.fingerprint, self.key, self.on_result = summary, store, fingerprint, key, on_result
        self.stats: dict = {}  # path -> its stat taken before it was read (the file index)

    def write(self, results: list[Result]):
        """Count and store ``results`` now, in this thread."""
        if results:
            self._count(results)
            self._store(results)

    def _count(self, results: list[Result]):
        for r in results:
            if r.error:
                self.summary.failed += 1
                if len(self.summary.failures) < 1000:
                    self.summary.failures.append((r.path, r.error))
            elif r.skipped:
                self.summary.skipped += 1

    def _store(self, results: list[Result]):
        self.store.write_batch(self.summary.run_id, results, self.fingerprint, self.key, after=self._index)
        if self.on_result:
            for r in results:
                self.on_result(r)

    # The writer thread: the caption loop hands it each batch (put) and goes on with the next one;
    # SQLite's work (indexes, full-text index, the WAL) runs beside it. The database connection
    # belongs to that thread from start() until drain() or stop() has joined it.
    def start(self):
        import queue
        import threading

        self._queue, self._error = queue.Queue(maxsize=4), None
        self._thread = threading.Thread(target=self._run, name="sat-writer", daemon=True)
        self._thread.start()

    def _run(self):
        while (results := self._queue.get()) is not None:
            if self._error is None:  # after a failure: drain the queue, store nothing more
                try:
                    self._store(results)
                except BaseException as exc:  # handed to the caption loop (a full disk, an interrupt)
                    self._error = exc

    def put(self, results: list[Result]):
        """Queue a batch for storage (waits while 4 are queued); raises the writer's error, if any."""
        self._raise()
        if results:
            self._count(results)
            self._queue.put(results)

    def drain(self):
        """Wait until every queued batch is stored; raises the writer's error, if any."""
        self.stop()
        self._raise()

    def stop(self):
        """Store what is queued and end the thread (no error raised: see drain)."""
        thread = getattr(self, "_thread", None)
        if thread is not None:
            self._queue.put(None)
            thread.join()
            self._thread = None

    def _raise(self):
        error, self._error = getattr(self, "_error", None), None
        if error is not None:
            raise error

    def _index(self, results: list[Result]):
        """File index rows for this batch's files, in its transaction (a failed file loses its row)."""
        from .store.file_index import forget, record
        from .inputs.paths import to_bytes

        if not self.stats:
            return
        ok, failed = [], []
        for r in results:
            key = self.stats.get(r.path) if r.path is not None else None
            if key is None:
                continue
            if r.error:
                failed.append(to_bytes(r.path))
            elif r.sha256:
                ok.append((to_bytes(r.path), key, r.sha256))
        record(self.store.db, ok)
        forget(self.store.db, failed)

    def finish(self, status: str):
        from .store.queries import results_of_run

        summary, db = self.summary, self.store.db
        try:
            # What is stored, not what was counted: a signal can land between a batch's commit
            # and the count that follows it.
            summary.captioned = results_of_run(db, summary.run_id)
            if status == "done" and summary.failed:
                status = "done_with_errors"
            self.store.finish_run(summary.run_id, status, summary.captioned, summary.skipped, summary.failed)
        except (SatError, sqlite3.Error):
            if status != "failed":  # the run itself went well: its end cannot be recorded
                raise
            # already failing (a full disk, a lock): that error is the one to report; the run
            # row stays "running" and the next run resumes from what was stored
        finally:
            db.close()


def _unchanged(db, paths: list[str], done: frozenset[str], stats: dict, rehash: bool):
    """Split ``paths`` into those to read and skipped Results for the files the file index vouches
    for (unchanged since they were hashed, that content already captioned). ``stats`` gets each
    path's stat, taken now, before any read."""
    from .store.file_index import lookup, stat_key, trusted
    from .inputs.paths import to_bytes

    names = [to_bytes(p) for p in paths]
    index = {} if rehash or not done else lookup(db, names)
    rest, known = [], []
    for path, name in zip(paths, names):
        stats[path] = key = stat_key(path)
        entry = index.get(name)
        if entry is not None and entry[5] in done and trusted(entry, key):
            known.append(Result(path, sha256=entry[5], size=key[2], skipped=True))
        else:
            rest.append(path)
    return rest, known


def _gather_rounds(dist, batches, writer, advance, summary):
    """torchrun: in each round every rank sends its next batch (None when it has no more) to rank
    0, which writes them all; the rounds end when every rank is out of batches."""
    mine = iter(batches)
    while True:
        batch = next(mine, None)
        if batch is not None:
            for r in batch:
                r.pixels = None  # decoded pixels stay here; results travel
        gathered = dist.gather_to_main(batch)
        if dist.main:
            for results in gathered:
                if results:
                    writer.write(results)
                    advance(len(results), summary.failed)
        if dist.broadcast(dist.main and all(b is None for b in gathered)):
            break


@contextlib.contextmanager
def _progress(quiet: bool, total: int):
    """advance(n, failed) for the run's progress bar (rank 0 only)."""
    from .progress import progress_bar

    with progress_bar("images", quiet) as progress:
        task = progress.add_task("Captioning", total=total, status="")

        def advance(n: int, failed: int):
            progress.update(task, advance=n, status=f"[red]{failed} failed" if failed else "")

        yield advance


def report(summary: Summary, db_path: str, console) -> None:
    """The closing lines of `sat caption` (stderr): counts, speed, the first failures."""
    rate = summary.captioned / summary.seconds if summary.seconds else 0.0
    console.print(
        f"{'Interrupted: ' if summary.interrupted else ''}[bold]{summary.captioned}[/] captioned, "
        f"{summary.skipped} skipped (already stored), "
        f"[{'red' if summary.failed else 'green'}]{summary.failed} failed[/] "
        f"in {summary.seconds:.1f}s ({rate:.1f} images/s) -> {db_path} (run {summary.run_id})"
    )
    from rich.markup import escape

    from .inputs.paths import printable

    for path, error in summary.failures[:10]:
        console.print(f"  [red]failed[/] {escape(printable(path))}: {escape(printable(error))}", highlight=False)
    if summary.failed > 10:
        console.print(f"  ... and {summary.failed - 10} more: sat export {db_path} --format csv | grep failed")
