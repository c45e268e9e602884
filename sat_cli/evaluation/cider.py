"""CIDEr-D (Vedantam et al., 2015) with document frequencies fixed on a reference corpus, for
self-critical training rewards. Computes what pycocoevalcap's Cider computes (same tf-idf,
clipping, Gaussian length penalty with sigma 6, x10), but the corpus statistics and the
reference vectors are prepared once instead of at every call."""

from __future__ import annotations

import math
from collections import Counter, defaultdict

N = 4
SIGMA = 6.0


def ngrams(words: list[str]) -> Counter:
    counts: Counter = Counter()
    for n in range(1, N + 1):
        for i in range(len(words) - n + 1):
            counts[tuple(words[i : i + n])] += 1
    return counts


class CiderD:
    def __init__(self, references: list[list[list[str]]]):
        """references: per image, its reference captions as word lists."""
        self.df: Counter = Counter()
        for refs in references:
            self.df.update({g for ref in refs for g in ngrams(ref)})
        self.log_n = math.log(float(len(references)))
        self.refs = [[self._vector(ngrams(r)) for r in refs] for refs in references]

    def _vector(self, counts: Counter):
        vec = [defaultdict(float) for _ in range(N)]
        norm = [0.0] * N
        length = 0
        for gram, tf in counts.items():
            n = len(gram) - 1
            w = float(tf) * (self.log_n - math.log(max(1.0, self.df[gram])))
            vec[n][gram] = w
            norm[n] += w * w
            if n == 1:  # pycocoevalcap counts bigrams as the length
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    def score(self, words: list[str], image: int) -> float:
        """CIDEr-D of one candidate against the references of image ``image``."""
        vec, norm, length = self._vector(ngrams(words))
        refs = self.refs[image]
        total = 0.0
        for vec_r, norm_r, length_r in refs:
            penalty = math.exp(-((length - length_r) ** 2) / (2 * SIGMA**2))
            for n in range(N):
                ref_n = vec_r[n]
                val = sum(min(w, ref_n.get(g, 0.0)) * ref_n.get(g, 0.0) for g, w in vec[n].items())
                if norm[n] and norm_r[n]:
                    val /= norm[n] * norm_r[n]
                total += val * penalty
        return 10.0 * total / N / len(refs)
