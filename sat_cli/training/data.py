"""Training data as tensors: every caption padded into one tensor, batches of photos with all
their captions (or of captions of similar length), and (when the encoder is fine-tuned) the pixels of each batch."""

from __future__ import annotations


def tensor_captions(entries, vocab, max_len):
    """All training captions as one padded tensor, with lengths and image indices."""
    import torch

    rows, image_index = [], []
    for i, entry in enumerate(entries):
        for tokens in entry.captions:
            if tokens:
                rows.append(vocab.encode(tokens, max_len))
                image_index.append(i)
    longest = max(len(r) for r in rows)
    caps = torch.full((len(rows), longest), vocab.pad, dtype=torch.long)
    for j, r in enumerate(rows):
        caps[j, : len(r)] = torch.tensor(r)
    lengths = torch.tensor([len(r) for r in rows])
    return caps, lengths, torch.tensor(image_index)


def length_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, rank: int = 0,
                   world: int = 1) -> list[list[int]]:
    """This rank's batches of caption indices for an epoch.

    DistributedSampler shuffles (seeded by epoch) and shards; then captions of similar length
    are grouped into batches within pools of 50 batches, and the batch order is shuffled, so
    the recurrence runs ~12 steps a batch instead of the longest caption's ~20.
    """
    import random

    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(len(lengths)), num_replicas=world, rank=rank, shuffle=True, seed=seed,
                                 drop_last=world > 1)
    sampler.set_epoch(epoch)
    order = list(sampler)
    pool = batch_size * 50
    batches = []
    for i in range(0, len(order), pool):
        chunk = sorted(order[i : i + pool], key=lambda j: lengths[j])
        batches += [chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size)]
    random.Random(seed * 100003 + epoch).shuffle(batches)
    return batches


def photo_batches(image_index: list[int], lengths: list[int], batch_size: int, seed: int, epoch: int,
                  rank: int = 0, world: int = 1) -> list[list[int]]:
    """This rank's batches of caption indices for an epoch, every caption of a photo in the same
    batch (so its features are projected once per step, not once per caption).

    Photos are shuffled and sharded (DistributedSampler, seeded by epoch); within pools of 50
    batches, photos of similar mean caption length are grouped, about ``batch_size`` captions a
    batch, and the batch order is shuffled, so the recurrence runs few steps past most captions.
    """
    import random

    from torch.utils.data import DistributedSampler

    by_photo: dict[int, list[int]] = {}
    for j, i in enumerate(image_index):
        by_photo.setdefault(i, []).append(j)
    photos = sorted(by_photo)
    sampler = DistributedSampler(range(len(photos)), num_replicas=world, rank=rank, shuffle=True, seed=seed,
                                 drop_last=world > 1)
    sampler.set_epoch(epoch)
    order = [photos[i] for i in sampler]
    per_batch = max(1, round(batch_size * len(photos) / max(1, len(image_index))))  # photos a batch
    pool = per_batch * 50
    mean_length = {p: sum(lengths[j] for j in js) / len(js) for p, js in by_photo.items()}
    batches = []
    for i in range(0, len(order), pool):
        chunk = sorted(order[i : i + pool], key=lambda p: mean_length[p])
        batches += [[j for p in chunk[k : k + per_batch] for j in by_photo[p]] for k in range(0, len(chunk), per_batch)]
    random.Random(seed * 100003 + epoch).shuffle(batches)
    return batches


def pixel_batches(paths: list[str], preprocess, groups, workers: int):
    """The encoder's input for each group of image indices (fine-tuning: the encoder sees pixels)."""
    from ..pipeline import load_batches

    for _, pixels in load_batches(([paths[i] for i in g] for g in groups), preprocess, None, workers):
        yield pixels


def mosaic_features(tiles, own, generator=None, fill: int | None = None):
    """Feature grids of 2x2 mosaics: ``tiles`` (N, h*w, C) half-size grids of every training
    image, ``own`` (M,) the image each mosaic must contain; it lands in a random quadrant, the
    other three are random training images, or all the tile ``fill`` (a blank image's grid).
    -> (M, 4*h*w, C) laid out as a (2h, 2w) grid."""
    import torch

    M, n = len(own), tiles.shape[0]
    side = int(round(tiles.shape[1] ** 0.5))
    ids = torch.randint(n, (M, 4), generator=generator) if fill is None else torch.full((M, 4), fill)
    where = torch.randint(4, (M,), generator=generator)
    ids[torch.arange(M), where] = own
    grid = tiles[ids].view(M, 2, 2, side, side, -1)  # (M, row, col, h, w, C)
    return grid.permute(0, 1, 3, 2, 4, 5).reshape(M, 4 * side * side, -1)
