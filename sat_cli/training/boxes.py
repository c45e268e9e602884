"""Attention supervision from person boxes: the attention of a person word is trained toward the
people in its photo (``--attention-boxes``).

A box file is ``coco/person_boxes.json``'s format: ``{"boxes": {file name: [[cx, cy, w, h], ...]}}``
with fractions of the photo's width and height. For every predicted person word
(``sat_cli.evaluation.grounding.PERSON_WORDS``) of a caption whose photo has boxes, the loss adds
``-log`` of the attention mass inside the boxes (each cell counts by the share of it they cover),
summed over those words and divided by all predicted words, so the term is per word like the
cross-entropy. Photos without boxes, and captions shown inside a mosaic, are not supervised.
"""

from __future__ import annotations

import json
from pathlib import Path


def load_box_cover(path: str, entries, grid: tuple[int, int]):
    """-> (cover (I, h*w) float32 tensor: the share of each cell inside the person boxes of training
    photo i, has (I,) bool: the photo has boxes), matching photos by file name."""
    import torch

    from ..errors import SatError
    from ..evaluation.grounding import box_coverage

    try:
        boxes = json.loads(Path(path).read_text())["boxes"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SatError(f"--attention-boxes {path}: not a person-box file ({exc})") from None
    gh, gw = grid
    cover = torch.zeros(len(entries), gh * gw)
    has = torch.zeros(len(entries), dtype=torch.bool)
    for i, e in enumerate(entries):
        photo_boxes = boxes.get(Path(e.path).name)
        if photo_boxes:
            cover[i] = torch.from_numpy(box_coverage(photo_boxes, gh, gw).reshape(-1)).float()
            has[i] = bool(cover[i].sum() > 0)
    return cover, has


def person_ids(vocab):
    """(K,) long tensor: the vocabulary ids of the person words."""
    import torch

    from ..evaluation.grounding import PERSON_WORDS

    return torch.tensor(sorted(vocab.stoi[w] for w in PERSON_WORDS if w in vocab.stoi), dtype=torch.long)


def box_loss(alphas, captions, cover, supervised, ids, pad):
    """alphas (B, T, P) from teacher forcing; captions (B, T+1..); cover (B, P) per caption;
    supervised (B,) bool -> (term, person words scored)."""
    import torch

    targets = captions[:, 1 : alphas.shape[1] + 1]
    words = torch.isin(targets, ids.to(targets.device)) & supervised.unsqueeze(1)
    n = int(words.sum())
    if not n:
        return alphas.new_zeros(()), 0
    inside = (alphas * cover.unsqueeze(1)).sum(-1)  # (B, T)
    return -inside[words].clamp_min(1e-6).log().sum() / (targets != pad).sum().clamp_min(1), n
