"""Does the attention point where the word is? A pointing game on 2x2 mosaics of four photos.

Each mosaic is captioned like any photo. For each generated word that belongs to exactly one of
the four photos (it appears in that photo's human captions and in no other's; function words are
left out), the word's *share* is the attention mass on that photo's quadrant: 0.25 is chance, 1
is perfect. The maps' *entropy* is reported relative to a uniform map (1.0: no information;
0.0: one cell). Nothing here imports torch: the caller captions the mosaics.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np

# Closed-class words and words that name no region of a photo; they are never scored.
FUNCTION_WORDS = frozenset("""
a an the this that these those there here some any each every other another such own same
of on in at to into onto from with without by for over under above below near next beside behind
between through around across along up down off out about against among front top side back
and or but nor so than then as while if when where which who whom whose what how why
is are was were be been being am has have had having do does did doing can could will would
shall should may might must it its it's they them their theirs he him his she her hers we us our
you your i me my one two three four five several many few lot lots very just also still
not no yes all both most more much only
""".split())


def stem(word: str) -> str:
    """Fold simple plurals so 'dogs' owns 'dog' (enough for caption words; not a full stemmer)."""
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("es") and word[-3] in "sxz":
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def content_words(captions: list[list[str]]) -> frozenset[str]:
    """The stemmed non-function words of a photo's human captions (tokenized)."""
    return frozenset(stem(w) for caption in captions for w in caption if w not in FUNCTION_WORDS)


def owner(word: str, tiles: list[frozenset[str]]) -> int | None:
    """The one tile whose captions hold ``word``; None for function words and shared or unknown words."""
    if word in FUNCTION_WORDS:
        return None
    holders = [i for i, words in enumerate(tiles) if stem(word) in words]
    return holders[0] if len(holders) == 1 else None


def quadrant_shares(alpha: np.ndarray) -> np.ndarray:
    """(gh, gw) attention -> (4,) its mass on the top-left, top-right, bottom-left and bottom-right
    quadrants. On an odd grid the middle row/column is split between its two quadrants."""
    gh, gw = alpha.shape

    def halves(n: int) -> np.ndarray:  # (n, 2): share of each cell in the first and second half
        edges = np.arange(n + 1) / n
        first = np.clip(0.5 - edges[:-1], 0, None) - np.clip(0.5 - edges[1:], 0, None)
        first = first * n
        return np.stack([first, 1 - first], axis=1)

    rows, cols = halves(gh), halves(gw)  # (gh, 2), (gw, 2)
    shares = rows.T @ alpha @ cols  # (2, 2)
    return shares.reshape(4)


def entropy_ratio(alpha: np.ndarray) -> float:
    """Entropy of a map relative to a uniform map over the same cells (1.0 = uniform)."""
    p = np.asarray(alpha, dtype=np.float64).ravel()
    p = p / p.sum() if p.sum() > 0 else np.full_like(p, 1 / p.size)
    nz = p[p > 0]
    return max(0.0, float(-(nz * np.log(nz)).sum() / math.log(p.size))) if p.size > 1 else 0.0


def map_stats(alpha: np.ndarray) -> tuple[float, float]:
    """(peak weight, entropy relative to uniform) of one attention map: what `sat show` prints."""
    a = np.asarray(alpha, dtype=np.float64)
    return float(a.max()), entropy_ratio(a)


@dataclass
class WordScore:
    mosaic: int
    word: str
    tile: int  # the quadrant that owns the word
    shares: tuple[float, float, float, float]  # attention mass on each quadrant

    @property
    def share(self) -> float:
        return self.shares[self.tile]


@dataclass
class PointingResult:
    mosaics: int = 0
    words: int = 0  # generated words, all of them
    scored: list[WordScore] = field(default_factory=list)
    entropy: float = 0.0  # mean entropy ratio over every generated word's map
    peak: float = 0.0  # mean of each map's largest weight

    @property
    def share(self) -> float:
        """Mean attention share on the owning quadrant over the scored words (0.25 = chance)."""
        return float(np.mean([s.share for s in self.scored])) if self.scored else float("nan")

    @property
    def hits(self) -> float:
        """Share of scored words whose own quadrant gets the most attention of the four."""
        return float(np.mean([int(np.argmax(s.shares)) == s.tile for s in self.scored])) if self.scored else float("nan")

    def to_dict(self) -> dict:
        return {"mosaics": self.mosaics, "words": self.words, "scored_words": len(self.scored),
                "pointing_share": round(self.share, 4), "pointing_hits": round(self.hits, 4),
                "entropy_ratio": round(self.entropy, 4),
                "peak_weight": round(self.peak, 4)}


def score(captions: list[tuple[list[str], np.ndarray]], tiles: list[list[frozenset[str]]]) -> PointingResult:
    """captions[i] = (words, maps (len(words), gh, gw)) of mosaic i; tiles[i] = its four photos'
    content words (``content_words``). Returns the pointing share and map statistics."""
    result = PointingResult(mosaics=len(captions))
    entropies, peaks = [], []
    for m, ((words, maps), four) in enumerate(zip(captions, tiles)):
        for word, alpha in zip(words, maps):
            result.words += 1
            peak, ent = map_stats(alpha)
            entropies.append(ent)
            peaks.append(peak)
            tile = owner(word, four)
            if tile is not None:
                shares = quadrant_shares(alpha) / (float(np.sum(alpha)) or 1.0)
                result.scored.append(WordScore(m, word, tile, tuple(float(s) for s in shares)))
    result.entropy = float(np.mean(entropies)) if entropies else float("nan")
    result.peak = float(np.mean(peaks)) if peaks else float("nan")
    return result


def mosaic_sets(n_photos: int, n_mosaics: int, seed: int = 0) -> list[tuple[int, int, int, int]]:
    """``n_mosaics`` sets of four distinct photo indices, each photo used about equally often."""
    if n_photos < 4:
        raise ValueError("a mosaic needs four photos")
    rng = random.Random(seed)
    pool: list[int] = []  # shuffled passes over all photos, consumed in order
    sets = []
    while len(sets) < n_mosaics:
        if len(pool) < 8:
            fresh = list(range(n_photos))
            rng.shuffle(fresh)
            pool += fresh
        group: list[int] = []
        j = 0
        while len(group) < 4:
            if pool[j] in group:
                j += 1
            else:
                group.append(pool.pop(j))
        sets.append(tuple(group))
    return sets


def mosaic(images: list, size: tuple[int, int]):
    """Four PIL images -> one RGB PIL image of ``size`` (height, width), each squashed into a quadrant
    (the whole photo is kept, as sat's preprocessing keeps it)."""
    from PIL import Image

    height, width = size
    out = Image.new("RGB", (width, height))
    w2, h2 = width // 2, height // 2
    boxes = [(0, 0, w2, h2), (w2, 0, width, h2), (0, h2, w2, height), (w2, h2, width, height)]
    for im, (x0, y0, x1, y1) in zip(images, boxes):
        out.paste(im.convert("RGB").resize((x1 - x0, y1 - y0), Image.Resampling.BICUBIC), (x0, y0))
    return out
