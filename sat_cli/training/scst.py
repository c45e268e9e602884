"""Self-critical sequence training (Rennie et al., 2017): sample captions, reward each with CIDEr-D
against the image's references, baseline = the mean reward of the image's other samples."""

from __future__ import annotations


def sample_captions(decoder, feats, vocab, samples: int, max_len: int):
    """Sample ``samples`` captions per image (with gradients). -> (word ids (B, K, T) as lists, with
    <pad> after the end; summed log-probabilities (B, K))."""
    import torch

    device = feats.device
    blocked = torch.tensor([vocab.pad, vocab.start, vocab.unk], device=device)
    B, K = feats.shape[0], samples
    feats = decoder.prepare(feats)
    h, c, enc_proj = decoder.init_state(feats)
    h = h.unsqueeze(1).expand(B, K, -1).contiguous()
    c = c.unsqueeze(1).expand(B, K, -1).contiguous()
    tokens = torch.full((B, K), vocab.start, dtype=torch.long, device=device)
    alive = torch.ones(B, K, dtype=torch.bool, device=device)
    logprob = torch.zeros(B, K, device=device)
    words = []
    for _ in range(max_len):
        logits, h, c, _ = decoder.step(feats, enc_proj, tokens, h, c)
        logp = logits.float().index_fill(2, blocked, float("-inf")).log_softmax(-1)
        tokens = torch.multinomial(logp.detach().exp().view(B * K, -1), 1).view(B, K)
        logprob = logprob + logp.gather(2, tokens.unsqueeze(-1)).squeeze(-1) * alive
        words.append(torch.where(alive, tokens, torch.full_like(tokens, vocab.pad)))
        alive = alive & (tokens != vocab.end)
        if not alive.any():
            break
    return torch.stack(words, dim=2).tolist(), logprob


def scst_epoch(t, epoch: int, stop, progress, task) -> tuple[float, int, bool]:
    """One self-critical epoch of trainer ``t`` over its training images (cached features).
    Returns (mean reward, samples seen by all ranks, stopped)."""
    import torch
    from torch.nn.utils import clip_grad_norm_
    from torch.utils.data import DistributedSampler

    from ..evaluation.cider import CiderD

    cfg, device, vocab, dist = t.cfg, t.device, t.vocab, t.dist
    if t.cider is None:
        t.cider = CiderD([[[*c, "<end>"] for c in e.captions] for e in t.train_entries])
    t.decoder.train()
    sampler = DistributedSampler(range(len(t.train_entries)), num_replicas=dist.world, rank=dist.rank,
                                 shuffle=True, seed=cfg.seed, drop_last=dist.world > 1)
    sampler.set_epoch(epoch)
    order = list(sampler)
    batches = [order[i : i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    world = dist.world
    progress.update(task, total=len(order) * world, completed=sum(len(b) for b in batches[: t.state["step"]]) * world)
    K = cfg.scst_samples
    total, count = t.state["running"] if t.state["step"] else (0.0, 0)
    for step in range(t.state["step"], len(batches)):
        images = torch.tensor(batches[step])
        feats = t.train_feats[images].to(device).float()
        B = len(images)
        sampled, logprob = sample_captions(t.decoder, feats, vocab, K, cfg.scst_max_len)
        rewards = torch.tensor([[t.cider.score([*vocab.decode(seq), "<end>"] if vocab.end in seq else vocab.decode(seq),
                                               int(images[b]))
                                 for seq in sampled[b]] for b in range(B)], device=device)
        baseline = (rewards.sum(1, keepdim=True) - rewards) / (K - 1)
        loss = -((rewards - baseline) * logprob).mean()
        t.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        dist.average_gradients(t.decoder.parameters())  # sampled outside DDP's forward
        clip_grad_norm_(t.decoder.parameters(), cfg.grad_clip)
        t.optimizer.step()
        total += float(rewards.mean()) * B
        count += B
        t.state["step"] = step + 1
        t.state["running"] = (total, count)
        progress.update(task, advance=B * world, status=f"reward {total / count:.3f}")
        if dist.any(stop.requested, device):
            return total / max(count, 1), count * world, True
    return total / max(count, 1), count * world, False
