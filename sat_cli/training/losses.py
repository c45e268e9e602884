"""Training objectives: cross-entropy with the doubly stochastic attention regularizer, and the
REINFORCE term of hard attention."""

from __future__ import annotations


def caption_loss(logits, alphas, captions, lengths, attention_lambda, label_smoothing, pad):
    """Cross-entropy over the predicted words plus the attention regularizer; returns (loss, ce).

    logits (N, V): the decoder's predictions at the N non-padding positions of captions[:, 1:].
    """
    import torch.nn.functional as F

    from ..model.decoder import attention_regularizer

    targets = captions[:, 1 : alphas.shape[1] + 1]
    mask = targets != pad
    ce = F.cross_entropy(logits, targets[mask], label_smoothing=label_smoothing)
    loss = ce + attention_lambda * attention_regularizer(alphas, mask) if attention_lambda else ce
    return loss, ce


def distill_loss(logits, teacher_logits):
    """Knowledge distillation (Hinton et al. 2015, temperature 1): the KL divergence from the
    teacher's word distribution to the student's, averaged over the N predicted positions.
    Both (N, V), the same positions in the same order."""
    import torch.nn.functional as F

    return F.kl_div(F.log_softmax(logits, -1), F.log_softmax(teacher_logits, -1), log_target=True,
                    reduction="batchmean")


def hard_attention_loss(logits, alphas, loc_logp, sampled, captions, pad, baseline: float | None,
                        reinforce: float, entropy: float):
    """The REINFORCE part of hard attention (Xu et al. 2015, eq. 12), per predicted word.

    Rows in ``sampled`` (B,) read a location drawn from alpha at every step, with log-probability
    ``loc_logp`` (B, T); their reward is the caption's mean log-likelihood per word (length-
    normalized, so the moving-average ``baseline`` does not just track caption length). Returns
    (loss term, rewards of the sampled rows): -reinforce * (reward - baseline) * log p(locations)
    - entropy * H(alpha), averaged over the predicted words. A ``baseline`` of None (the first
    batch) stands for the mean reward of this batch.
    """
    import torch
    import torch.nn.functional as F

    targets = captions[:, 1 : alphas.shape[1] + 1]
    mask = targets != pad  # (B, T)
    loglik = torch.zeros(mask.shape, device=logits.device)
    loglik[mask] = -F.cross_entropy(logits.detach(), targets[mask], reduction="none")
    reward = loglik.sum(1) / mask.sum(1).clamp_min(1)  # (B,)
    if baseline is None:
        baseline = float(reward[sampled].mean())
    words = mask & sampled.unsqueeze(1)
    advantage = (reward - baseline) * sampled
    policy = -(advantage.unsqueeze(1) * loc_logp * words).sum()
    ent = -(alphas * alphas.clamp_min(1e-30).log()).sum(-1)  # (B, T)
    bonus = (ent * words).sum()
    n = mask.sum().clamp_min(1)
    return (reinforce * policy - entropy * bonus) / n, reward[sampled]
