"""The one inference pipeline: inputs (files or in-memory images) -> batches of (results, pixels)
decoded in DataLoader workers -> encoder features -> batched beam search -> ranked captions.

`sat caption`, `sat eval`, the feature cache, training validation, the benchmarks and the Python
API all run these functions; each adds only its own bookkeeping (database, cache, metrics)."""

from __future__ import annotations

import itertools
from typing import Iterable, Iterator

from .model.beam import DecodeSettings
from .records import Caption, Result

NO_CAPTION = ("the model produced no caption (non-finite scores: the encoder's features may overflow; "
              "try --precision fp32)")


def decode_settings(defaults: dict, beam: int | None = None, n_best: int | None = None,
                    max_len: int | None = None, length_penalty: float | None = None,
                    no_repeat_ngram: int | None = None) -> DecodeSettings:
    """Decode settings from what the caller gave, else the model's recommended ``defaults``, else
    sat's (beam 3, 50 words, no length penalty). Asking for more hypotheses than the model's beam
    (``n_best`` without ``beam``) widens the beam to ``n_best``. Raises ValueError on bad values."""
    default_beam = defaults.get("beam_size", 3)
    if beam is None and n_best is not None and n_best > default_beam:
        beam = n_best
    pick = lambda given, name, fallback: given if given is not None else defaults.get(name, fallback)  # noqa: E731
    return DecodeSettings(
        beam_size=beam if beam is not None else default_beam,
        n_best=n_best,
        max_len=pick(max_len, "max_len", 50),
        length_penalty=pick(length_penalty, "length_penalty", 0.0),
        no_repeat_ngram=pick(no_repeat_ngram, "no_repeat_ngram", 0),
    )


def load_batches(sources: Iterable, preprocess, batch_size: int | None, workers: int = 0,
                 skip: frozenset[str] = frozenset(), pin_memory: bool = False,
                 read_timeout: float | None = None) -> Iterator[tuple[list[Result], object]]:
    """Decode and resize ``sources`` (paths, PIL images or uint8 arrays; read lazily) in ``workers``
    processes, in order, ``batch_size`` at a time (None: ``sources`` is already an iterable of
    batches). Yields (results, pixels): ``pixels`` is (N, 3, H, W) uint8 for the results that have
    a ``row`` (None when none of the batch could be decoded); the others carry an ``error`` or are
    ``skipped`` (content in ``skip``). A file read that stalls for ``read_timeout`` seconds
    (default: ``images.READ_TIMEOUT``) is given up as an error."""
    from torch.utils.data import DataLoader

    from .inputs.images import READ_TIMEOUT, Sources, collate

    if batch_size is None:
        counter = itertools.count()
        batches = ([(next(counter), s) for s in group] for group in sources)
    else:
        keyed = enumerate(sources)
        batches = iter(lambda: list(itertools.islice(keyed, batch_size)), [])  # lazily: a million files are fine
    timeout = READ_TIMEOUT if read_timeout is None else read_timeout
    from .runtime import quiet_worker

    loader = DataLoader(Sources(preprocess.size, preprocess.interpolation, skip, timeout), batch_sampler=batches,
                        num_workers=workers, collate_fn=collate, pin_memory=pin_memory,
                        prefetch_factor=4 if workers else None, worker_init_fn=quiet_worker if workers else None)
    yield from loader


def encode(encoder, pixels, device, precision: str):
    """(N, 3, H, W) uint8 -> features (N, P, C) float32 on ``device`` (the encoder under autocast)."""
    import torch

    from .runtime import autocast

    with torch.inference_mode(), autocast(device, precision):
        return encoder(pixels.to(device, non_blocking=True)).float()


def decode(model, features, settings: DecodeSettings, attention: bool = True) -> list[list[Caption]]:
    """Beam-decode features (N, P, C) with ``model`` (anything with ``decoder``, ``vocab`` and, for
    attention maps, ``grid``): the ranked captions of each image, [] when it produced none."""
    from .model.beam import beam_search

    vocab = model.vocab
    block = getattr(model, "decode_defaults", dict)().get("block_specials", True)  # False: imported models
    hyps = beam_search(model.decoder, features, settings, start=vocab.start, end=vocab.end,
                       blocked=(vocab.pad, vocab.start, vocab.unk) if block else (), attention=attention,
                       half_maps=True)
    grid = model.grid if attention else None
    return [to_captions(h, vocab, grid) for h in hyps]


def to_captions(hyps, vocab, grid: tuple[int, int] | None) -> list[Caption]:
    """Beam hypotheses -> Captions (attention as float16 (words, grid_h, grid_w) when ``grid``)."""
    out = []
    for rank, hyp in enumerate(hyps, start=1):
        words = vocab.decode(hyp.tokens)
        maps = None
        if grid is not None and hyp.alphas is not None:
            maps = hyp.alphas.reshape(len(hyp.tokens), *grid).astype("float16")  # a copy: its own memory
        out.append(Caption(rank, " ".join(words), words, hyp.logprob, hyp.score, hyp.finished, maps))
    return out


def best_text(captions: list[Caption]) -> str:
    """The best caption's text; empty when the model produced none (non-finite scores)."""
    return captions[0].text if captions else ""


def caption_batches(model, sources: Iterable, settings: DecodeSettings, *, batch_size: int = 64,
                    workers: int = 0, attention: bool = True, skip: frozenset[str] = frozenset(),
                    dedupe: bool = False, read_timeout: float | None = None) -> Iterator[list[Result]]:
    """Caption ``sources`` a batch at a time with ``model`` (a :class:`~sat_cli.model.checkpoint.Checkpoint`
    ready for inference: device, precision). Every input gets a Result, in order: captioned, failed
    (``error``) or skipped (its content is in ``skip``, or with ``dedupe`` was captioned earlier in
    this call)."""
    seen: set[str] = set()
    for results, pixels in load_batches(sources, model.preprocess, batch_size, workers, skip,
                                        pin_memory=model.device.type == "cuda", read_timeout=read_timeout):
        fresh = []
        for r in results:
            if r.error or r.skipped:
                continue
            if dedupe and r.sha256 in seen:
                r.skipped = True
                continue
            seen.add(r.sha256)
            fresh.append(r)
        if fresh:
            caption_rows(model, fresh, pixels, settings, attention)
        yield results


def caption_rows(model, results: list[Result], pixels, settings: DecodeSettings, attention: bool = True) -> None:
    """Caption ``results`` whose pixels are rows (``Result.row``) of the (N, 3, H, W) uint8 batch
    ``pixels``: encode, beam-search, set each one's ``captions`` (or ``error`` when it produced
    none). ``caption_batches`` and `sat serve`'s batcher both end here."""
    rows = [r.row for r in results]
    if rows != list(range(len(rows))):  # some rows are not to be captioned: copy the others out
        pixels = pixels[rows]
    elif len(rows) < len(pixels):
        pixels = pixels[: len(rows)]  # a view: no copy, and pinned memory stays pinned
    features = encode(model.encoder, pixels, model.device, model.precision)
    for r, captions in zip(results, decode(model, features, settings, attention)):
        r.captions = captions
        if not captions:  # every score was NaN or -inf
            r.error = NO_CAPTION
