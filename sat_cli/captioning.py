"""``sat caption`` (and ``Captioner.to_db``): find the files, caption them through the pipeline,
store each batch in one transaction, skip what is stored, and report the run."""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Callable

from .beam import DecodeSettings
from .errors import SatError
from .records import Result


@dataclass
class CaptionOptions:
    batch_size: int = 64
    workers: int | None = None  # DataLoader workers; None: one per spare core, 1 to 8
    force: bool = False  # redo images already captioned with this model and settings
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

    @property
    def exit_code(self) -> int:
        """sat caption's exit status: 130 interrupted, 1 some files failed, 0 otherwise."""
        return 130 if self.interrupted else 1 if self.failed else 0


def caption_to_db(model, inputs: list[str], db_path: str, settings: DecodeSettings, options: CaptionOptions,
                  on_result: Callable[[Result], None] | None = None, dist=None) -> Summary:
    """Caption ``inputs`` (files, folders, globs) with ``model`` (a checkpoint ready for inference)
    into the database at ``db_path``. Under torchrun each rank takes every WORLD_SIZE-th file."""
    from .images import discover
    from .pipeline import caption_batches
    from .progress import progress_bar
    from .queries import done_hashes, results_of_run
    from .runtime import Dist, StopSignal, default_workers
    from .store import Store, open_db

    dist = dist or Dist()
    found = list(discover(inputs, options.recursive))
    if not found:  # before the database exists: an empty folder leaves nothing behind
        raise SatError("No image files found in " + ", ".join(map(str, inputs)))
    missing = [f for f in found if f.error] if dist.rank == 0 else []
    paths = [f.path for f in found if not f.error][dist.rank :: dist.world]
    fingerprint, key = model.fingerprint, settings.key()
    db = open_db(db_path, timeout=options.db_timeout)
    store = Store(db)
    run_id = store.start_run(
        model_path=model.path, model_fingerprint=fingerprint, encoder=model.encoder_spec,
        settings=json.dumps(settings.to_dict()), settings_key=key, device=str(model.device),
        precision=model.precision, batch_size=options.batch_size,
    )
    summary = Summary(run_id=run_id, total=len(paths) + len(missing))
    started = time.perf_counter()

    def fail(path: str, error: str):
        summary.failed += 1
        if len(summary.failures) < 1000:
            summary.failures.append((path, error))

    if missing:
        store.write_batch(run_id, [Result(f.path, error=f.error) for f in missing], fingerprint, key)
        for f in missing:
            fail(f.path, f.error)

    done = frozenset() if options.force else done_hashes(db, fingerprint, key)
    workers = default_workers() if options.workers is None else options.workers
    status = "done"
    with StopSignal(interrupt=True), progress_bar("images", options.quiet) as progress:
        task = progress.add_task("Captioning", total=len(paths), status="")
        try:
            for results in caption_batches(model, paths, settings, batch_size=options.batch_size, workers=workers,
                                           attention=options.attention, skip=done, dedupe=True,
                                           read_timeout=options.read_timeout):
                for r in results:
                    if r.error:
                        fail(r.path, r.error)
                    elif r.skipped:
                        summary.skipped += 1
                store.write_batch(run_id, results, fingerprint, key)
                if on_result:
                    for r in results:
                        on_result(r)
                progress.update(task, advance=len(results),
                                status=f"[red]{summary.failed} failed" if summary.failed else "")
        except KeyboardInterrupt:
            status = "interrupted"
            summary.interrupted = True
        except BaseException:
            status = "failed"
            raise
        finally:
            summary.seconds = time.perf_counter() - started
            try:
                # What is stored, not what was counted: a signal can land between a batch's commit
                # and the count that follows it.
                summary.captioned = results_of_run(db, run_id)
                if status == "done" and summary.failed:
                    status = "done_with_errors"
                store.finish_run(run_id, status, summary.captioned, summary.skipped, summary.failed)
            except (SatError, sqlite3.Error):
                if status != "failed":  # the run itself went well: its end cannot be recorded
                    raise
                # already failing (a full disk, a lock): that error is the one to report; the run
                # row stays "running" and the next run resumes from what was stored
            finally:
                db.close()
    return summary


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

    from .paths import printable

    for path, error in summary.failures[:10]:
        console.print(f"  [red]failed[/] {escape(printable(path))}: {escape(printable(error))}", highlight=False)
    if summary.failed > 10:
        console.print(f"  ... and {summary.failed - 10} more: sat export {db_path} --format csv | grep failed")
