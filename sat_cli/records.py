"""What captioning produces and the database stores: one input's :class:`Result` with its ranked
:class:`Caption` list. The pipeline fills them, the store writes them, the Python API returns them."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Caption:
    """One hypothesis of the n-best list."""

    rank: int  # 1 = best
    text: str
    words: list[str]
    logprob: float  # summed log-probability of the words (and of <end> when finished)
    score: float  # logprob / length ** length_penalty
    finished: bool  # reached <end> within max_len
    attention: np.ndarray | None = field(default=None, repr=False)  # (len(words), grid_h, grid_w)


@dataclass
class Result:
    """One input image: where it came from, its content hash and size, and its captions or error.

    >>> result.text, result.score, result.nbest[1].text, result.attention.shape
    ('a cat lying on a bed', -6.1, 'a cat on a bed', (6, 12, 12))
    """

    path: str | None  # the file, or None for an in-memory image (see ``index``)
    sha256: str | None = None
    size: int | None = None  # bytes of the file (or of the in-memory pixels)
    width: int | None = None  # original size, EXIF orientation applied
    height: int | None = None
    error: str | None = None  # why there is no caption; None when captioned (or skipped)
    captions: list[Caption] = field(default_factory=list)  # the n-best list, best first
    index: int | None = None  # position among the inputs of the call
    skipped: bool = field(default=False, repr=False)  # already stored (sat caption / to_db)
    pixels: object = field(default=None, repr=False)  # (3, H, W) uint8 tensor until collated
    row: int | None = field(default=None, repr=False)  # its row in the collated pixel batch

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.captions)

    @property
    def best(self) -> Caption | None:
        return self.captions[0] if self.captions else None

    @property
    def text(self) -> str | None:
        """The best caption, or None when the image failed."""
        return self.captions[0].text if self.captions else None

    @property
    def score(self) -> float | None:
        return self.captions[0].score if self.captions else None

    @property
    def words(self) -> list[str]:
        return self.captions[0].words if self.captions else []

    @property
    def nbest(self) -> list[Caption]:
        return self.captions

    @property
    def attention(self) -> np.ndarray | None:
        """The best caption's maps (words, grid_h, grid_w), or None (failed, or attention off)."""
        return self.captions[0].attention if self.captions else None
