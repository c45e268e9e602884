"""Straightforward per-image reference beam search for the benchmarks, written the way the
popular PyTorch tutorial (sgrvinod/a-PyTorch-Tutorial-to-Image-Captioning) writes it: one image
at a time, a Python list of finished sentences, the beam shrinking as sentences end.

Same rules as sat's batched search, so the captions must come out identical: <pad>, <start>
and <unk> are never generated; the beam keeps its best `width` expansions, width shrinks by one
for every finished sentence; the best finished sentence by log-probability wins (length penalty
0); an image with no finished sentence returns its best unfinished one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.inference_mode()
def reference_beam_search(decoder, features, beam_size, max_len, start, end, blocked, project_once=True, stats=None):
    """features (1, P, C) -> (word ids, logprob, finished) of the best hypothesis.

    stats, a dict, collects "hyp_steps": the number of (hypothesis, step) pairs decoded.

    project_once=False recomputes the encoder projection at every step, as the tutorial does.
    """
    att = decoder.attention
    enc_proj = att.encoder_att(features)  # (1, P, A)
    mean = features.mean(dim=1)
    h, c = decoder.init_h(mean), decoder.init_c(mean)  # (1, D)
    words = torch.full((1,), start, dtype=torch.long)
    seqs = torch.zeros(1, 0, dtype=torch.long)
    scores = torch.zeros(1)
    width = beam_size
    complete, complete_scores = [], []
    for _ in range(max_len):
        n = seqs.shape[0]
        if stats is not None:
            stats["hyp_steps"] = stats.get("hyp_steps", 0) + n
        proj = enc_proj if project_once else att.encoder_att(features)
        e = att.full_att(F.relu(proj + att.decoder_att(h).unsqueeze(1))).squeeze(2)  # (n, P)
        alpha = e.softmax(dim=1)
        context = (features * alpha.unsqueeze(2)).sum(dim=1)  # (n, C)
        context = torch.sigmoid(decoder.f_beta(h)) * context
        h, c = decoder.lstm(torch.cat([decoder.embedding(words), context], dim=1), (h, c))
        logp = F.log_softmax(decoder.fc(h), dim=1)  # (n, V)
        logp[:, list(blocked)] = float("-inf")
        V = logp.shape[1]
        cand = (scores.unsqueeze(1) + logp).view(-1)
        top, idx = cand.topk(min(width, cand.numel()))
        keep = torch.isfinite(top)
        top, idx = top[keep], idx[keep]
        prev, nxt = idx // V, idx % V
        seqs = torch.cat([seqs[prev], nxt.unsqueeze(1)], dim=1)
        live = []
        for i in range(len(nxt)):
            if nxt[i].item() == end:
                complete.append(seqs[i, :-1].tolist())
                complete_scores.append(top[i].item())
                width -= 1
            else:
                live.append(i)
        if width == 0 or not live:
            break
        seqs, scores, words = seqs[live], top[live], nxt[live]
        h, c = h[prev[live]], c[prev[live]]
    if complete:
        best = max(range(len(complete)), key=lambda i: complete_scores[i])
        return complete[best], complete_scores[best], True
    best = int(scores.argmax())
    return seqs[best].tolist(), scores[best].item(), False
