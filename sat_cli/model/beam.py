"""Batched beam search: every image of a batch and every beam advance in one tensor program
per step, on the model's device.

Each image keeps a beam of ``beam_size`` slots. At each step the best ``width`` expansions of
its live hypotheses are kept (``width`` starts at ``beam_size``); an expansion that ends with
<end> is set aside as finished and the image's width shrinks by one. An image is done when its
width reaches zero; decoding stops when every image is done or after ``max_len`` words. An image
with no finished hypothesis returns its best unfinished ones (``finished=False``).

When fewer hypotheses are kept than the beam holds (``n_best`` < ``beam_size``) and the length
penalty is 0, an image is also done as soon as its ``n_best`` best finished hypotheses all score
above every live one: scores are summed log-probabilities, which only fall as words are added, so
no live hypothesis could still enter the kept list. The result is the one the full search gives;
only the steps that could not change it are skipped.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass(frozen=True)
class DecodeSettings:
    beam_size: int = 3
    n_best: int | None = None  # hypotheses kept per image; None: the whole beam
    max_len: int = 50  # most words per caption
    length_penalty: float = 0.0  # final score = logprob / length ** length_penalty
    no_repeat_ngram: int = 0  # forbid repeating any n-gram of this size (0: off)

    def __post_init__(self):
        if self.beam_size < 1:
            raise ValueError("beam size must be at least 1")
        if self.n_best is not None and not 1 <= self.n_best <= self.beam_size:
            raise ValueError(f"n-best must be between 1 and the beam size ({self.beam_size})")
        if self.max_len < 1:
            raise ValueError("max length must be at least 1")
        if self.no_repeat_ngram < 0:
            raise ValueError("no-repeat-ngram must be 0 (off) or a positive n-gram size")

    @property
    def keep(self) -> int:
        return self.n_best or self.beam_size

    def to_dict(self) -> dict:
        return {**asdict(self), "n_best": self.keep}

    def key(self) -> str:
        """A short digest of the settings that change the output, for resumable runs."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Hypothesis:
    tokens: list[int]  # word ids, without <start> and <end>
    logprob: float  # summed log-probability of the words (and of <end> when finished)
    score: float  # logprob / length ** length_penalty; length counts <end> when finished
    finished: bool  # reached <end> within max_len
    alphas: np.ndarray | None = field(default=None, repr=False)  # (len(tokens), P) float32 (float16: half_maps)


def normalized_score(logprob: float, length: int, length_penalty: float) -> float:
    return logprob / (max(length, 1) ** length_penalty) if length_penalty else logprob


def rank_hypotheses(hyps: list[Hypothesis], keep: int) -> list[Hypothesis]:
    """Finished hypotheses first, best score first; then unfinished ones."""
    return sorted(hyps, key=lambda h: (not h.finished, -h.score))[:keep]


def ngram_ban(tokens, n: int, vocab_size: int):
    """(B, K, t) generated words -> (B, K, V) mask of words that would repeat an n-gram."""
    import torch

    B, K, t = tokens.shape
    ban = torch.zeros(B, K, vocab_size, device=tokens.device)
    if t < n:
        return ban.bool()
    windows = tokens.unfold(2, n, 1)  # (B, K, W, n)
    prefix = tokens[:, :, t - n + 1 :].unsqueeze(2)  # last n-1 words (B, K, 1, n-1)
    match = (windows[..., :-1] == prefix).all(-1)  # (B, K, W)
    return ban.scatter_add_(2, windows[..., -1], match.float()) > 0


def beam_search(decoder, features, settings: DecodeSettings, *, start: int, end: int,
                blocked: tuple[int, ...] = (), attention: bool = True,
                half_maps: bool = False) -> list[list[Hypothesis]]:
    """Decode a batch. features (B, P, C) on the decoder's device; returns ranked hypotheses per image.
    ``half_maps``: attention maps come back as float16 (converted on the device, in one go: half
    the bytes to copy to the host), each a view of the batch's array."""
    import torch

    with torch.inference_mode():
        return _beam_search(torch, decoder, features.float(), settings, start, end, blocked, attention, half_maps)


def _beam_search(torch, decoder, features, settings, start, end, blocked, attention, half_maps=False):
    B0, P, _ = features.shape
    K, L, V = settings.beam_size, settings.max_len, decoder.config.vocab_size
    dev = features.device
    neg_inf = float("-inf")

    from .decoder import InferenceStep

    # About a dozen words per caption: the expected hypothesis-steps decide whether a word table pays.
    step = decoder.step if decoder.training else InferenceStep(decoder, expected_steps=B0 * K * min(L, 12))
    features = decoder.prepare(features)
    h, c, enc_proj = decoder.init_state(features)
    D = h.shape[-1]
    # One hypothesis per image at the first step, then K slots: (B, K, ...) from the first topk on.
    h, c = h.unsqueeze(1), c.unsqueeze(1)  # (B, 1, D)
    last = torch.full((B0, 1), start, dtype=torch.long, device=dev)
    scores = torch.zeros(B0, 1, device=dev)  # summed log-probs; -inf marks an empty slot
    width = torch.full((B0,), K, dtype=torch.long, device=dev)
    tokens = torch.zeros(B0, 1, 0, dtype=torch.long, device=dev)  # (B, K, t)
    alpha_hist = torch.zeros(B0, 1, 0, P, device=dev)  # (B, K, t, P)
    rows = torch.arange(B0, device=dev)  # original image of each row still decoding
    ranks = torch.arange(K, device=dev)

    fin_tokens = torch.zeros(B0, K, L, dtype=torch.long, device=dev)
    fin_len = torch.zeros(B0, K, dtype=torch.long, device=dev)
    fin_logprob = torch.full((B0, K), neg_inf, device=dev)
    fin_alpha = torch.zeros(B0, K, L, P, device=dev) if attention else None
    fin_count = torch.zeros(B0, dtype=torch.long, device=dev)
    blocked_ids = torch.tensor(sorted(set(blocked)), dtype=torch.long, device=dev)
    # Log-probabilities only fall as words are added, so with no length penalty a live hypothesis
    # can never overtake a finished one that already scores better.
    settle = settings.length_penalty == 0 and settings.keep < K

    # Hard attention with argmax inference reads one cell per word: that cell is the word's map.
    one_hot = attention and getattr(getattr(decoder, "config", None), "argmax_context", False)
    for t in range(L):
        logits, h_new, c_new, alpha = step(features, enc_proj, last, h, c)
        if one_hot:
            alpha = torch.zeros_like(alpha).scatter_(-1, alpha.argmax(dim=-1, keepdim=True), 1.0)
        logp = logits.float().log_softmax(dim=-1)  # (B, K, V)
        if blocked_ids.numel():
            logp.index_fill_(2, blocked_ids, neg_inf)
        if settings.no_repeat_ngram:
            logp.masked_fill_(ngram_ban(tokens, settings.no_repeat_ngram, V), neg_inf)
        B, slots = scores.shape
        cand = (scores.unsqueeze(-1) + logp).view(B, slots * V)
        if cand.shape[1] < K:  # a beam wider than the first step's vocabulary
            cand = torch.nn.functional.pad(cand, (0, K - cand.shape[1]), value=neg_inf)
        top_val, top_idx = cand.topk(K, dim=1)  # sorted
        parent, word = (top_idx // V).clamp_max(slots - 1), top_idx % V  # (B, K)
        selected = (ranks < width.unsqueeze(1)) & torch.isfinite(top_val)
        ended = selected & (word == end)
        alive = selected & ~ended

        tokens = torch.cat([tokens.gather(1, parent.unsqueeze(-1).expand(B, K, t)), word.unsqueeze(-1)], dim=2)
        if attention:
            step_alpha = alpha.gather(1, parent.unsqueeze(-1).expand(B, K, P))
            alpha_hist = torch.cat(
                [alpha_hist.gather(1, parent[:, :, None, None].expand(B, K, t, P)), step_alpha.unsqueeze(2)], dim=2
            )
        n_end = ended.sum(dim=1)
        scores = torch.where(alive, top_val, torch.full_like(top_val, neg_inf))
        h = h_new.gather(1, parent.unsqueeze(-1).expand(B, K, D))
        c = c_new.gather(1, parent.unsqueeze(-1).expand(B, K, D))
        last = word
        keep = (width - n_end > 0) & alive.any(dim=1)
        if settle:  # an image whose n-best can no longer change is done (see the module docstring)
            new_fin = torch.where(ended, top_val, torch.full_like(top_val, neg_inf))
            kth = torch.cat([fin_logprob[rows], new_fin], dim=1).topk(settings.keep, dim=1).values[:, -1]
            settled = kth > scores.max(dim=1).values
            keep &= ~settled
            scores.masked_fill_(settled.unsqueeze(1), neg_inf)
        any_end, n_done = torch.stack([n_end.any().long(), (~keep).sum()]).tolist()  # one sync per step

        if any_end:  # set finished hypotheses aside, per image, in rank order
            pos = fin_count[rows].unsqueeze(1) + ended.long().cumsum(dim=1) - 1  # (B, K)
            b, k = ended.nonzero(as_tuple=True)
            orig, slot = rows[b], pos[b, k]
            fin_tokens[orig, slot, :t] = tokens[b, k, :t]
            fin_len[orig, slot] = t
            fin_logprob[orig, slot] = top_val[b, k]
            if attention:
                fin_alpha[orig, slot, :t] = alpha_hist[b, k, :t]
            fin_count[rows] += n_end
            width = width - n_end

        # Drop images that are done from the batch once they are a quarter of it: each drop copies
        # the batch's features, and a done image left in costs only its share of a step (its
        # scores are all -inf, so it selects nothing).
        if n_done and 4 * n_done >= B:
            idx = keep.nonzero().squeeze(1)
            rows = rows[idx]
            if idx.numel() == 0:
                break
            features, enc_proj = features[idx], enc_proj[idx]
            h, c, last, scores, width = h[idx], c[idx], last[idx], scores[idx], width[idx]
            tokens, alpha_hist = tokens[idx], alpha_hist[idx]

    return _collect(settings, fin_tokens, fin_len, fin_logprob, fin_alpha, fin_count,
                    tokens, alpha_hist if attention else None, scores, rows, B0, half_maps)


def _collect(settings, fin_tokens, fin_len, fin_logprob, fin_alpha, fin_count,
             tokens, alpha_hist, scores, rows, n_images, half_maps=False) -> list[list[Hypothesis]]:
    """Move the results to the CPU once and build the ranked hypotheses of each image."""
    lp = settings.length_penalty
    fin_tokens, fin_len, fin_logprob, fin_count = (x.cpu().numpy() for x in (fin_tokens, fin_len, fin_logprob, fin_count))
    if half_maps and fin_alpha is not None:
        fin_alpha, alpha_hist = fin_alpha.half(), alpha_hist.half()
    own = (lambda a: a) if half_maps else (lambda a: a.copy())  # views of the batch's float16 array, or copies
    fin_alpha = fin_alpha.cpu().numpy() if fin_alpha is not None else None
    results: list[list[Hypothesis]] = [[] for _ in range(n_images)]
    for i in range(n_images):
        for j in range(int(fin_count[i])):
            n = int(fin_len[i, j])
            logprob = float(fin_logprob[i, j])
            results[i].append(Hypothesis(
                tokens=fin_tokens[i, j, :n].tolist(), logprob=logprob,
                score=normalized_score(logprob, n + 1, lp), finished=True,
                alphas=own(fin_alpha[i, j, :n]) if fin_alpha is not None else None,
            ))
    if rows.numel():  # hypotheses still open at max_len
        tokens, scores, rows = tokens.cpu().numpy(), scores.cpu().numpy(), rows.cpu().numpy()
        alpha_hist = alpha_hist.cpu().numpy() if alpha_hist is not None else None
        for r, i in enumerate(rows):
            for k in np.flatnonzero(np.isfinite(scores[r])):
                logprob = float(scores[r, k])
                results[i].append(Hypothesis(
                    tokens=tokens[r, k].tolist(), logprob=logprob,
                    score=normalized_score(logprob, tokens.shape[2], lp), finished=False,
                    alphas=own(alpha_hist[r, k]) if alpha_hist is not None else None,
                ))
    return [rank_hypotheses(h, settings.keep) for h in results]
