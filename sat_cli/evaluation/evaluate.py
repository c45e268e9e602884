"""``sat eval``: score a model on a split of a caption file, or a caption database against
reference captions; per collection (COCO, Flickr8k, ...) as well as in all."""

from __future__ import annotations

from pathlib import Path

from ..errors import SatError


def decode_split(model, entries, settings, cache_dir: str | None = None, use_cache: bool = True,
                 batch_size: int = 64, workers: int | None = None, quiet: bool = False) -> dict[str, str]:
    """Best caption (rank 1) for every entry's image, as path -> text. ``model``: a checkpoint
    ready for inference; features go through the feature cache unless ``use_cache`` is False."""
    import numpy as np
    import torch

    from ..features import FeatureCache
    from ..pipeline import best_text, caption_batches, decode
    from ..runtime import default_workers

    paths = [e.path for e in entries]
    workers = default_workers() if workers is None else workers
    out: dict[str, str] = {}
    if use_cache:
        cache = FeatureCache(model.encoder, cache_dir)
        shas = cache.build(paths, model.device, model.precision, batch_size=32, workers=workers, quiet=quiet)
        good = [p for p in paths if shas.get(p)]
        for i in range(0, len(good), batch_size):
            chunk = good[i : i + batch_size]
            feats = torch.from_numpy(np.stack([cache.load(shas[p]) for p in chunk])).to(model.device).float()
            for path, captions in zip(chunk, decode(model, feats, settings, attention=False)):
                out[path] = best_text(captions)
        return out
    for results in caption_batches(model, paths, settings, batch_size=batch_size, workers=workers, attention=False):
        for r in results:
            if r.row is not None:  # decoded (a model that produced nothing scores as an empty caption)
                out[r.path] = best_text(r.captions)
    return out


def match_references(hypotheses: dict[str, str], entries) -> tuple[dict, dict, dict]:
    """Pair stored captions with reference entries by full path, else by file name.
    Returns (references, hypotheses, sources), keyed by the entries' paths."""
    by_path = {e.path: e for e in entries}
    by_name: dict[str, list] = {}
    for e in entries:
        by_name.setdefault(Path(e.path).name, []).append(e)
    refs, hyps, sources = {}, {}, {}
    for path, text in hypotheses.items():
        entry = by_path.get(str(Path(path).resolve()))
        if entry is None and len(by_name.get(Path(path).name, [])) == 1:
            entry = by_name[Path(path).name][0]
        if entry is not None:
            refs[entry.path], hyps[entry.path], sources[entry.path] = entry.raw, text, entry.source
    return refs, hyps, sources


def score_parts(refs: dict, hyps: dict, sources: dict, meteor: bool = True, warn=None) -> list[dict]:
    """Metrics over all images, then per collection when there are several: rows of
    {"part", "images", metric: value}. Each part is scored on its own (CIDEr's document
    frequencies come from that part's references)."""
    from .metrics import score_captions

    rows = [{"part": "all", "images": len(hyps), **score_captions(refs, hyps, meteor=meteor, warn=warn)}]
    parts = sorted({s for s in sources.values() if s})
    if len(parts) > 1:
        for part in parts:
            ids = [k for k in hyps if sources.get(k) == part]
            rows.append({"part": part, "images": len(ids), **score_captions(
                {k: refs[k] for k in ids}, {k: hyps[k] for k in ids}, meteor=meteor, warn=warn)})
    return rows


def evaluate(db_path: str | None, *, model_path=None, data=None, images=None, split="val", references=None,
             run=None, settings_from=None, device="auto", precision="auto", cache_dir=None, use_cache=True,
             meteor=True, quiet=False) -> tuple[str, list[dict]]:
    """`sat eval`: (a description of what was scored, metric rows from :func:`score_parts`).
    ``settings_from(checkpoint)`` gives the decode settings for a model."""
    from ..progress import console
    from .datasets import load_captions

    warn = (lambda m: None) if quiet else (lambda m: console.print(f"[yellow]{m}"))
    if db_path:
        from ..store.queries import best_captions
        from ..store.writes import open_db

        if not references:
            raise SatError("scoring a database needs --references CAPTION_FILE")
        refs_data = load_captions(references, images, need_images=False)  # matched by name: no photos needed
        refs, hyps, sources = match_references(best_captions(open_db(db_path, must_exist=True), run),
                                               refs_data.entries)
        if not hyps:
            raise SatError(f"none of the images in {db_path} appear in {references}")
        source = f"{db_path} ({len(hyps)} images matched)"
    else:
        if not data:
            raise SatError("give a DB_PATH with --references, or --data with a split to decode")
        from ..model.checkpoint import load_checkpoint
        from ..runtime import precision_scope, resolve_device, resolve_precision

        entries = load_captions(data, images).split(split)
        if not entries:
            raise SatError(f"{data} has no images in split {split!r}")
        dev = resolve_device(device)
        checkpoint = load_checkpoint(model_path).for_inference(dev, resolve_precision(dev, precision))
        settings = settings_from(checkpoint)
        with precision_scope(dev, checkpoint.precision):
            hyps = decode_split(checkpoint, entries, settings, cache_dir, use_cache, quiet=quiet)
        refs = {e.path: e.raw for e in entries}
        sources = {e.path: e.source for e in entries}
        source = f"{checkpoint.path} on {data} [{split}] ({len(hyps)} images, beam {settings.beam_size})"
    return source, score_parts(refs, hyps, sources, meteor=meteor, warn=warn)


def print_scores(source: str, rows: list[dict], as_json: bool = False) -> None:
    """The table of `sat eval` (stderr), or one JSON object on stdout: the whole set's metrics at
    the top level and each collection's under "parts"."""
    import json
    import sys

    if as_json:
        top = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in rows[0].items() if k != "part"}
        parts = {r["part"]: {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if k != "part"}
                 for r in rows[1:]}
        sys.stdout.write(json.dumps({"source": source, **top, **({"parts": parts} if parts else {})}) + "\n")
        return
    from ..progress import console
    from .metrics import metrics_table

    console.print(metrics_table(rows if len(rows) > 1 else [{k: v for k, v in rows[0].items() if k != "part"}],
                                title=source, width=console.width))
