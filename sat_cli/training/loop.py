"""The cross-entropy epoch: teacher forcing on batches of captions of similar length, from cached
features (or pixels while the encoder is fine-tuned), with hard attention's REINFORCE term."""

from __future__ import annotations

from .losses import caption_loss, distill_loss, hard_attention_loss


def freeze_batchnorm(module):
    from torch import nn

    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def xent_epoch(t, epoch: int, stop, progress, task) -> tuple[float, int, bool]:
    """One epoch of trainer ``t``, resumable at ``t.state["step"]``. Returns (mean cross-entropy,
    samples seen by all ranks, stopped)."""
    import torch
    from torch.nn.utils import clip_grad_norm_

    from ..runtime import autocast
    from .data import length_batches, photo_batches, pixel_batches

    cfg, device, dist = t.cfg, t.device, t.dist
    t.decoder.train()
    tuning = t.state["fine_tuning"]
    if tuning:
        t.encoder.train()
        freeze_batchnorm(t.encoder)
    if cfg.batching == "photo":
        batches = photo_batches(t.image_index.tolist(), t.lengths.tolist(), cfg.batch_size, cfg.seed, epoch,
                                dist.rank, dist.world)
    else:
        batches = length_batches(t.lengths.tolist(), cfg.batch_size, cfg.seed, epoch, dist.rank, dist.world)
    # captions of one photo share its features (hard attention and mosaics change them per caption)
    shared = cfg.attention == "soft" and not cfg.mosaic
    start_step = t.state["step"]
    if tuning:
        index = t.image_index.tolist()
        groups = ([index[i] for i in b] for b in batches[start_step:])
        if shared:  # each photo once
            groups = (sorted(set(g)) for g in groups)
        pixels_iter = pixel_batches([e.path for e in t.train_entries], t.encoder.preprocess, groups, t.workers)
    total, count = t.state["running"] if start_step else (0.0, 0)  # an interrupted epoch's mean so far
    samples = 0
    world = dist.world
    progress.update(task, total=sum(len(b) for b in batches) * world,
                    completed=sum(len(b) for b in batches[:start_step]) * world)
    for step in range(start_step, len(batches)):
        idx = torch.tensor(batches[step])
        lengths = t.lengths[idx]
        order = lengths.argsort(descending=True, stable=True)
        idx, lengths = idx[order], lengths[order]
        caps = t.caps[idx, : int(lengths.max())].to(device, non_blocking=True)
        images = t.image_index[idx]
        photo = None
        if shared:  # features of each photo once; photo[b]: caption b's row among them
            images, photo = torch.unique(images, return_inverse=True)
            photo = photo.to(device, non_blocking=True)
        chosen = ()  # captions shown inside a mosaic
        with autocast(device, t.precision if device.type == "cuda" else "fp32"):
            if tuning:
                pixels = next(pixels_iter)
                pixels = (pixels if shared else pixels[order]).to(device, non_blocking=True)
                feats = t.encoder(pixels)
            else:
                feats = t.train_feats[images]
                if cfg.mosaic:  # some captions see their photo as one quadrant of a mosaic
                    from .data import mosaic_features

                    chosen = (torch.rand(len(idx)) < cfg.mosaic).nonzero().squeeze(1)
                    if len(chosen):
                        feats = feats.clone()
                        fill = len(t.tile_feats) - 1 if cfg.mosaic_fill == "blank" else None  # the blank tile is last
                        feats[chosen] = mosaic_features(t.tile_feats if fill is not None else t.tile_feats[:-1],
                                                        images[chosen], fill=fill).to(feats.dtype)
                feats = feats.to(device, non_blocking=True).float()
            # hard attention: each caption reads sampled locations with probability 0.5, else
            # the expected context (Xu et al. 2015, section 4.1)
            sampled = (torch.rand(len(idx)) < 0.5).to(device) if cfg.attention == "hard" else None
            logits, alphas, loc_logp = t.model(feats, caps, lengths.tolist(), sampled, photo, products=t.products)
            loss, ce = caption_loss(logits.float(), alphas.float(), caps, lengths, cfg.attention_lambda,
                                    cfg.label_smoothing, t.vocab.pad)
            if t.teacher is not None and cfg.distill_weight:  # (1 - w) x cross-entropy + w x KL(teacher)
                with torch.no_grad():
                    taught, _, _ = t.teacher(feats, caps, lengths.tolist(), None, photo, products=t.products)
                loss = loss + cfg.distill_weight * (distill_loss(logits.float(), taught.float()) - ce)
            if t.box_cover is not None and cfg.box_weight:
                from .boxes import box_loss

                rows = t.image_index[idx]
                supervised = t.box_has[rows]
                if len(chosen):
                    supervised[chosen] = False  # a mosaic moves the photo: its boxes no longer apply
                term, _ = box_loss(alphas.float(), caps, t.box_cover[rows].to(device), supervised.to(device),
                                   t.person_ids, t.vocab.pad)
                loss = loss + cfg.box_weight * term
            if sampled is not None and bool(sampled.any()):
                baseline = t.state.get("hard_baseline")
                term, rewards = hard_attention_loss(logits.float(), alphas.float(), loc_logp.float(), sampled, caps,
                                                    t.vocab.pad, baseline, cfg.hard_reinforce, cfg.hard_entropy)
                loss = loss + term
                mean = float(rewards.mean())  # the moving-average baseline b_k = 0.9 b_k-1 + 0.1 reward
                t.state["hard_baseline"] = mean if baseline is None else 0.9 * baseline + 0.1 * mean
        t.optimizer.zero_grad(set_to_none=True)
        if t.encoder_optimizer:
            t.encoder_optimizer.zero_grad(set_to_none=True)
        params = list(t.decoder.parameters()) + (list(t.encoder.parameters()) if tuning else [])
        if t.scaler:
            t.scaler.scale(loss).backward()
            if tuning:
                dist.average_gradients(t.encoder.parameters())  # DDP wraps the decoder only
            t.scaler.unscale_(t.optimizer)
            if tuning:
                t.scaler.unscale_(t.encoder_optimizer)
            clip_grad_norm_(params, cfg.grad_clip)
            t.scaler.step(t.optimizer)
            if tuning:
                t.scaler.step(t.encoder_optimizer)
            t.scaler.update()
        else:
            loss.backward()
            if tuning:
                dist.average_gradients(t.encoder.parameters())  # DDP wraps the decoder only
            clip_grad_norm_(params, cfg.grad_clip)
            t.optimizer.step()
            if tuning:
                t.encoder_optimizer.step()
        total += float(ce.detach()) * len(idx)
        count += len(idx)
        samples += len(idx) * world
        t.state["step"] = step + 1
        t.state["running"] = (total, count)
        progress.update(task, advance=len(idx) * world, status=f"loss {total / count:.3f}")
        if dist.any(stop.requested, device):
            return total / max(count, 1), samples, True
    return total / max(count, 1), samples, False
