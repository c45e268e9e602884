"""``sat eval``: score a model on a split of a caption file, or score a caption database
against reference captions."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import SatError


def best_text(hyps, vocab) -> str:
    """The best hypothesis of one image as text; empty when the model produced none (NaN scores)."""
    return " ".join(vocab.decode(hyps[0].tokens)) if hyps else ""


def decode_split(checkpoint, entries, settings, device: str = "auto", precision: str = "auto",
                 cache_dir: str | None = None, use_cache: bool = True, batch_size: int = 64,
                 workers: int | None = None, quiet: bool = False) -> dict[str, str]:
    """Best caption (rank 1) for every entry's image, as path -> text."""
    import numpy as np
    import torch
    from torch.utils.data import DataLoader

    from .beam import beam_search
    from .devices import autocast, keep_freed_memory, resolve_device, resolve_precision
    from .features import FeatureCache
    from .images import ImageFiles, collate

    dev = resolve_device(device)
    keep_freed_memory()
    prec = resolve_precision(dev, precision)
    checkpoint.for_inference(dev)
    vocab, decoder, encoder = checkpoint.vocab, checkpoint.decoder, checkpoint.encoder
    blocked = (vocab.pad, vocab.start, vocab.unk)
    paths = [e.path for e in entries]
    workers = max(1, min(8, (os.cpu_count() or 2) - 1)) if workers is None else workers
    out: dict[str, str] = {}

    def decode(batch_paths, feats):
        for path, hyps in zip(batch_paths, beam_search(decoder, feats, settings, start=vocab.start, end=vocab.end,
                                                       blocked=blocked, attention=False)):
            out[path] = best_text(hyps, vocab)

    if use_cache:
        cache = FeatureCache(encoder, cache_dir)
        shas = cache.build(paths, dev, prec, batch_size=32, workers=workers, quiet=quiet)
        good = [p for p in paths if shas.get(p)]
        for i in range(0, len(good), batch_size):
            chunk = good[i : i + batch_size]
            feats = torch.from_numpy(np.stack([cache.load(shas[p]) for p in chunk])).to(dev).float()
            decode(chunk, feats)
        return out
    pre = encoder.preprocess
    loader = DataLoader(ImageFiles(paths, pre.size, pre.interpolation), batch_size=batch_size, num_workers=workers,
                        collate_fn=collate)
    for items, pixels in loader:
        good = [it.path for it in items if it.row is not None]
        if good:
            with torch.inference_mode(), autocast(dev, prec):
                feats = encoder(pixels.to(dev)).float()
            decode(good, feats)
    return out


def db_captions(db_path: str, run: int | None = None) -> dict[str, str]:
    """Best stored caption per image path (one model and settings: pick it with run)."""
    from .store import open_db

    db = open_db(db_path, must_exist=True)
    if run is None:
        sets = db.execute("SELECT COUNT(DISTINCT model_fingerprint || settings_key) FROM results").fetchone()[0]
        if sets > 1:
            raise SatError(f"{db_path} holds captions of {sets} models or decode settings: pick one with --run N")
    where = "AND results.run_id = :run" if run is not None else ""
    rows = db.query(f"""SELECT images.path, captions.text FROM images
                        JOIN results ON results.sha256 = images.sha256 {where}
                        JOIN captions ON captions.result_id = results.id AND captions.rank = 1""", {"run": run})
    return {r["path"]: r["text"] for r in rows}


def match_references(hypotheses: dict[str, str], entries) -> tuple[dict, dict]:
    """Pair stored captions with reference entries by full path, else by file name."""
    by_path = {e.path: e for e in entries}
    by_name: dict[str, list] = {}
    for e in entries:
        by_name.setdefault(Path(e.path).name, []).append(e)
    refs, hyps = {}, {}
    for path, text in hypotheses.items():
        entry = by_path.get(str(Path(path).resolve()))
        if entry is None and len(by_name.get(Path(path).name, [])) == 1:
            entry = by_name[Path(path).name][0]
        if entry is not None:
            refs[entry.path], hyps[entry.path] = entry.raw, text
    return refs, hyps
