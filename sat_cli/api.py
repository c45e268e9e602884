"""The Python API: ``sat_cli.load(...)`` gives a :class:`Captioner`; call it on files, folders,
PIL images or numpy arrays and get :class:`~sat_cli.records.Result` objects back.

    >>> import sat_cli
    >>> cap = sat_cli.load()                                  # the shipped model, on the best device
    >>> out = cap(["photos/cat.jpg", Image.open("dog.png"), pixels_hwc_uint8], beam=3, n_best=3)
    >>> out[0].text, out[0].score, out[0].nbest[1].text, out[0].attention.shape
    ('a cat lying on a bed', -6.12, 'a cat laying on a bed', (6, 12, 12))
    >>> for result in cap.stream(["big/folder"], batch_size=64, workers=4):   # lazily
    ...     print(result.path, result.error or result.text)
    >>> cap.to_db("out.db", ["photos/"])                      # what `sat caption` does

It is the same pipeline as the command line: the same captions, scores and maps.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .model.beam import DecodeSettings
from .records import Caption, Result

__all__ = ["Captioner", "Caption", "Result", "load"]


def _as_list(inputs) -> list:
    from .inputs.images import is_image_object

    if isinstance(inputs, (str, bytes, os.PathLike)) or is_image_object(inputs):
        return [inputs]
    return list(inputs)


def expand(inputs: Iterable, recursive: bool = True) -> Iterator:
    """Inputs in order, folders and glob patterns expanded in place to their image files
    (lazily, as the walk goes); in-memory images pass through; an entry that cannot be opened (a
    path that names nothing, a special file, an unreadable folder, an object that is neither an
    image nor a path) stays, to fail as a Result with its reason."""
    from .inputs.images import Found, discover, is_image_object

    for source in inputs:
        if is_image_object(source):
            yield source
            continue
        try:
            arg = os.fsdecode(source)  # str, bytes (exact file-name bytes) or os.PathLike
        except TypeError:
            yield Found(None, f"not an image or a path: {type(source).__name__} (give a path, a PIL image "
                              "or a uint8 numpy array)")
            continue
        for found in discover([arg], recursive, unique=False):
            yield found if found.error else found.path


def _check_counts(batch_size: int, workers: int | None) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a whole number of at least 1, not {batch_size!r}")
    if workers is not None and (not isinstance(workers, int) or workers < 0):
        raise ValueError(f"workers must be a whole number of at least 0, not {workers!r}")


class Captioner:
    """A loaded model with its device and precision, ready to caption. Build it with :func:`load`."""

    def __init__(self, checkpoint):
        self.model = checkpoint  # a Checkpoint prepared for inference

    def __repr__(self) -> str:
        return f"Captioner({self.path!r}, device={str(self.device)!r}, precision={self.precision!r})"

    @property
    def path(self) -> str:
        return self.model.path

    @property
    def device(self):
        return self.model.device

    @property
    def precision(self) -> str:
        return self.model.precision

    @property
    def fingerprint(self) -> str:
        """sha256 of the weights and the model's config: the key of its stored results."""
        return self.model.fingerprint

    @property
    def preprocess(self):
        """Input size (height, width), mean/std and interpolation of the encoder."""
        return self.model.preprocess

    @property
    def grid(self) -> tuple[int, int]:
        """(h, w) of the attention maps."""
        return self.model.grid

    def settings(self, beam: int | None = None, n_best: int | None = None, max_len: int | None = None,
                 length_penalty: float | None = None, no_repeat_ngram: int | None = None) -> DecodeSettings:
        """Decode settings: what is given, else the model's recommended ones, else beam 3; an
        ``n_best`` above the model's beam widens the beam. Raises ValueError on bad values."""
        from .pipeline import decode_settings

        return decode_settings(self.model.decode_defaults(), beam, n_best, max_len, length_penalty, no_repeat_ngram)

    def __call__(self, inputs, *, beam: int | None = None, n_best: int | None = None, max_len: int | None = None,
                 length_penalty: float | None = None, no_repeat_ngram: int | None = None,
                 settings: DecodeSettings | None = None, batch_size: int = 64, workers: int = 0,
                 attention: bool = True, recursive: bool = True, read_timeout: float | None = None) -> list[Result]:
        """Caption ``inputs`` (one or a list of: file paths, folders, glob patterns, PIL images,
        uint8 numpy arrays (H, W[, 3|4])) and return one Result per image, in input order (a
        folder gives its images in place). A file that cannot be read gives a Result with
        ``error`` set; nothing raises for one bad input.

        >>> out = cap(["a.jpg", "folder/"], beam=5, n_best=2)
        >>> [(r.path, r.text) for r in out if not r.error]
        """
        return list(self.stream(inputs, beam=beam, n_best=n_best, max_len=max_len, length_penalty=length_penalty,
                                no_repeat_ngram=no_repeat_ngram, settings=settings, batch_size=batch_size,
                                workers=workers, attention=attention, recursive=recursive,
                                read_timeout=read_timeout))

    def stream(self, inputs, *, beam: int | None = None, n_best: int | None = None, max_len: int | None = None,
               length_penalty: float | None = None, no_repeat_ngram: int | None = None,
               settings: DecodeSettings | None = None, batch_size: int = 64, workers: int = 0,
               attention: bool = True, recursive: bool = True, read_timeout: float | None = None) -> Iterator[Result]:
        """Like calling the captioner, but lazily: inputs are read and results yielded a batch at
        a time, so a million files never sit in memory. ``workers`` > 0 decodes images in that
        many processes while the model runs. A file whose read stalls for ``read_timeout`` seconds
        (default 60) is given up as an error.

        >>> for r in cap.stream(Path("archive").rglob("*.jpg"), batch_size=64, workers=4):
        ...     print(r.path, r.text)
        """
        _check_counts(batch_size, workers)  # bad arguments raise here, not at the first result
        settings = settings or self.settings(beam, n_best, max_len, length_penalty, no_repeat_ngram)
        sources = expand(_as_list(inputs) if not isinstance(inputs, Iterator) else inputs, recursive)
        return self._results(sources, settings, batch_size, workers, attention, read_timeout)

    def _results(self, sources, settings, batch_size, workers, attention, read_timeout) -> Iterator[Result]:
        from .pipeline import caption_batches
        from .runtime import precision_scope

        with precision_scope(self.device, self.precision):
            for batch in caption_batches(self.model, sources, settings, batch_size=batch_size, workers=workers,
                                         attention=attention, read_timeout=read_timeout):
                yield from batch

    def to_db(self, db: str | Path, inputs, *, beam: int | None = None, n_best: int | None = None,
              max_len: int | None = None, length_penalty: float | None = None, no_repeat_ngram: int | None = None,
              settings: DecodeSettings | None = None, batch_size: int = 64, workers: int | None = None,
              attention: bool = True, recursive: bool = True, force: bool = False, progress: bool = False,
              on_result: Callable[[Result], None] | None = None, read_timeout: float | None = None,
              db_timeout: float = 60.0, rehash: bool = False):
        """What `sat caption` does: caption files, folders and globs into the SQLite database ``db``
        (created if missing), skipping content already captioned with this model and settings
        (``force`` redoes it). A file unchanged since it was hashed (same device, inode, size, mtime
        and ctime) is not read again; ``rehash`` reads every file. Returns the run's Summary (run_id, captioned, skipped, failed...).
        ``db_timeout``: seconds to wait for another program's lock on the database before giving
        up with a StorageError (nothing is lost; run again). ``on_result(result)`` is called for
        each input once its batch is stored, from the thread that stores batches.

        >>> summary = cap.to_db("out.db", ["photos/"], beam=3)
        >>> summary.captioned, summary.failed
        """
        from .captioning import CaptionOptions, caption_to_db
        from .errors import SatError
        from .inputs.images import is_image_object
        from .runtime import precision_scope

        _check_counts(batch_size, workers)
        paths = _as_list(inputs)
        if any(is_image_object(p) for p in paths):
            raise SatError("to_db stores files by path: give files, folders or globs (call the captioner "
                           "itself for in-memory images)")
        settings = settings or self.settings(beam, n_best, max_len, length_penalty, no_repeat_ngram)
        options = CaptionOptions(batch_size=batch_size, workers=workers, force=force, attention=attention,
                                 recursive=recursive, quiet=not progress, read_timeout=read_timeout,
                                 db_timeout=db_timeout, rehash=rehash)
        if getattr(self.model, "lazy", False) and not self.model.built:
            scope = contextlib.nullcontext()  # caption_to_db enters it once the model is built
        else:
            scope = precision_scope(self.device, self.precision)
        with scope:
            return caption_to_db(self.model, [os.fsdecode(p) for p in paths], str(db), settings, options,
                                 on_result=on_result)


def load(model: str | Path | None = None, device: str = "auto", precision: str = "auto",
         encoder_weights: str | None = None, lazy: bool = False) -> Captioner:
    """Load a checkpoint folder (default: the model shipped with sat) for captioning.

    ``device``: auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps. ``precision`` of the
    encoder: auto (fp16 autocast on CUDA, fp32 elsewhere), fp32, fp16, bf16; beam search always
    runs in fp32. ``encoder_weights``: a local file with the encoder's pretrained weights, for
    checkpoints that reference downloadable ones. Under torchrun each rank takes its own GPU.
    ``lazy``: read the checkpoint's config and fingerprint now, build the model (torch, encoder,
    weights, device) only when something needs it: a ``to_db`` rerun with nothing new never does.

    On Linux, CPU captioning is about twice as fast after ``sat_cli.runtime.keep_freed_memory()``
    (a process-wide malloc setting that `sat caption` applies; call it yourself if you want it).
    """
    if lazy:
        from .model.lazy import LazyCheckpoint

        return Captioner(LazyCheckpoint(model, encoder_weights, device, precision))
    from .model.checkpoint import load_checkpoint
    from .runtime import Dist, resolve_device, resolve_precision

    dist = Dist()
    dev = resolve_device(device, dist.local_rank if dist.world > 1 else None)
    checkpoint = load_checkpoint(model, encoder_weights=encoder_weights)
    return Captioner(checkpoint.for_inference(dev, resolve_precision(dev, precision)))

