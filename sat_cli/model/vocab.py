"""Vocabulary: words <-> ids, with the four special tokens first."""

from __future__ import annotations

import re
from collections import Counter
from typing import Iterable

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)
_TOKEN = re.compile(r"[a-z0-9]+")


def tokenize(text: str) -> list[str]:
    """Lowercase ``[a-z0-9]+`` runs: the tokenization of the Karpathy-split files."""
    return _TOKEN.findall(text.lower())


class Vocab:
    def __init__(self, words: Iterable[str]):
        words = list(words)
        if tuple(words[:4]) != SPECIALS:
            raise ValueError(f"a vocabulary starts with {SPECIALS}")
        self.itos = words
        self.stoi = {w: i for i, w in enumerate(words)}
        self.pad, self.start, self.end, self.unk = range(4)

    def __len__(self) -> int:
        return len(self.itos)

    @classmethod
    def build(cls, captions: Iterable[list[str]], min_freq: int = 5) -> "Vocab":
        """From tokenized training captions: words seen at least ``min_freq`` times, most frequent first."""
        counts = Counter(tok for caption in captions for tok in caption)
        words = sorted((w for w, n in counts.items() if n >= min_freq and w not in SPECIALS), key=lambda w: (-counts[w], w))
        return cls([*SPECIALS, *words])

    def encode(self, tokens: list[str], max_len: int | None = None) -> list[int]:
        """<start> w1 ... wn <end>, words past ``max_len`` dropped, unknown words as <unk>."""
        tokens = tokens[:max_len] if max_len else tokens
        return [self.start, *(self.stoi.get(t, self.unk) for t in tokens), self.end]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Ids -> words, stopping at <end> and leaving out the other special tokens."""
        if isinstance(ids, list) and (not ids or min(ids) > self.unk):  # no special token: one lookup each
            return [self.itos[i] for i in ids]
        words = []
        for i in ids:
            if i == self.end:
                break
            if i > self.unk:
                words.append(self.itos[i])
            elif i == self.unk:
                words.append(UNK)
        return words
