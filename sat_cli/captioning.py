"""``sat caption``: find images, decode them in DataLoader workers, encode and beam-decode them in
batches on the model's device, and store each batch in one transaction."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Callable

from .beam import DecodeSettings, beam_search
from .devices import autocast, keep_freed_memory, resolve_device, resolve_precision
from .errors import SatError
from .images import ImageFiles, collate, discover
from .progress import progress_bar
from .store import CaptionRecord, ImageRecord, Store, open_db


@dataclass
class CaptionOptions:
    batch_size: int = 64
    device: str = "auto"
    precision: str = "auto"  # of the encoder; the decoder runs in fp32
    workers: int | None = None  # DataLoader workers; None: one per spare core, 1 to 8
    force: bool = False  # redo images already captioned with this model and settings
    attention: bool = True  # store per-word attention maps
    recursive: bool = True
    quiet: bool = False


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


def default_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def distributed_shard() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Let SIGTERM (a scheduler's stop) end the run like Ctrl-C: finished batches stay stored."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def hypotheses_to_records(hyps, vocab, grid: tuple[int, int], attention: bool) -> list[CaptionRecord]:
    records = []
    for rank, hyp in enumerate(hyps, start=1):
        words = vocab.decode(hyp.tokens)
        maps = None
        if attention and hyp.alphas is not None:
            maps = hyp.alphas.reshape(len(hyp.tokens), *grid).astype("float16")
        records.append(CaptionRecord(rank, " ".join(words), words, hyp.logprob, hyp.score, hyp.finished, maps))
    return records


def caption_files(inputs: list[str], db_path: str, checkpoint, settings: DecodeSettings,
                  options: CaptionOptions, on_image: Callable[[ImageRecord], None] | None = None) -> Summary:
    import torch
    from torch.utils.data import DataLoader

    rank, world, local_rank = distributed_shard()
    device = resolve_device(options.device)
    keep_freed_memory()
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", local_rank)
    precision = resolve_precision(device, options.precision)
    checkpoint.for_inference(device)
    db = open_db(db_path)
    store = Store(db)
    fingerprint, key = checkpoint.fingerprint, settings.key()

    found = list(discover(inputs, options.recursive))
    missing = [f for f in found if f.error] if rank == 0 else []
    paths = [f.path for f in found if not f.error][rank::world]
    if not found:
        raise SatError("No image files found in " + ", ".join(inputs))

    run_id = store.start_run(
        model_path=checkpoint.path, model_fingerprint=fingerprint, encoder=checkpoint.encoder_spec,
        settings=json.dumps(settings.to_dict()), settings_key=key, device=str(device),
        precision=precision, batch_size=options.batch_size,
    )
    summary = Summary(run_id=run_id, total=len(paths) + len(missing))
    started = time.perf_counter()

    def fail(path: str, error: str):
        summary.failed += 1
        if len(summary.failures) < 1000:
            summary.failures.append((path, error))

    if missing:
        store.write_batch(run_id, [ImageRecord(f.path, error=f.error) for f in missing], fingerprint, key)
        for f in missing:
            fail(f.path, f.error)

    done = frozenset() if options.force else store.done_hashes(fingerprint, key)
    pre = checkpoint.preprocess
    workers = default_workers() if options.workers is None else options.workers
    loader = DataLoader(
        ImageFiles(paths, pre.size, pre.interpolation, skip=done),
        batch_size=options.batch_size,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None,
    )
    vocab, encoder, decoder = checkpoint.vocab, checkpoint.encoder, checkpoint.decoder
    blocked = (vocab.pad, vocab.start, vocab.unk)
    captioned_now: set[str] = set()  # content captioned in this run: duplicates are not redone
    status = "done"
    with sigterm_as_interrupt(), progress_bar("images", options.quiet) as progress:
        task = progress.add_task("Captioning", total=len(paths), status="")
        try:
            for items, pixels in loader:
                records, fresh = [], []
                for it in items:
                    rec = ImageRecord(it.path, it.sha256, it.size, it.width, it.height, it.error)
                    records.append(rec)
                    if it.error:
                        fail(it.path, it.error)
                    elif it.skipped or it.sha256 in captioned_now:
                        summary.skipped += 1
                    else:
                        captioned_now.add(it.sha256)
                        fresh.append((rec, it.row))
                if fresh:
                    batch = pixels[[row for _, row in fresh]].to(device, non_blocking=True)
                    with torch.inference_mode(), autocast(device, precision):
                        features = encoder(batch)  # (N, P, C)
                    grid = encoder.grid_shape()
                    hyps = beam_search(decoder, features.float(), settings, start=vocab.start, end=vocab.end,
                                       blocked=blocked, attention=options.attention)
                    for (rec, _), image_hyps in zip(fresh, hyps):
                        if not image_hyps:  # every score was NaN or -inf
                            rec.error = ("the model produced no caption (non-finite scores: the encoder's features "
                                         "may overflow; try --precision fp32)")
                            fail(rec.path, rec.error)
                            continue
                        rec.captions = hypotheses_to_records(image_hyps, vocab, grid, options.attention)
                store.write_batch(run_id, records, fingerprint, key)
                if on_image:
                    for rec in records:
                        on_image(rec)
                progress.update(task, advance=len(items),
                                status=f"[red]{summary.failed} failed" if summary.failed else "")
        except KeyboardInterrupt:
            status = "interrupted"
            summary.interrupted = True
        except BaseException:
            status = "failed"
            raise
        finally:
            summary.seconds = time.perf_counter() - started
            # What is stored, not what was counted: a signal can land between a batch's commit
            # and the count that follows it.
            summary.captioned = store.results_of_run(run_id)
            if status == "done" and summary.failed:
                status = "done_with_errors"
            store.finish_run(run_id, status, summary.captioned, summary.skipped, summary.failed)
            db.close()
    return summary
