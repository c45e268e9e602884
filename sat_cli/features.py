"""On-disk cache of frozen-encoder features, keyed by encoder (spec, weights, preprocessing)
and image content (sha256). Later epochs and later runs read features instead of re-running the CNN."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np


def default_cache_dir() -> Path:
    if os.environ.get("SAT_CACHE_DIR"):
        return Path(os.environ["SAT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sat" / "features"


def encoder_key(encoder) -> str:
    """Digest of everything that changes an encoder's output: spec, grid, preprocessing, weights."""
    h = hashlib.sha256()
    described = {"spec": encoder.spec, "grid": encoder.grid, "pre": encoder.preprocess.to_dict()}
    if getattr(encoder, "layers", None):  # absent for the last map, so older caches keep their keys
        described["layers"] = list(encoder.layers)
    h.update(json.dumps(described, sort_keys=True).encode())
    for name, tensor in sorted(encoder.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:20]


class FeatureCache:
    def __init__(self, encoder, root: str | Path | None = None):
        self.encoder = encoder
        self.key = encoder_key(encoder)
        self.dir = Path(root or default_cache_dir()) / self.key
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "meta.json"
        if not meta.exists():
            meta.write_text(json.dumps({"encoder": encoder.spec, "grid": encoder.grid,
                                        "preprocess": encoder.preprocess.to_dict()}, indent=1))

    def file(self, sha: str) -> Path:
        return self.dir / sha[:2] / f"{sha}.npy"

    def known(self) -> frozenset[str]:
        found = set()
        for sub in self.dir.iterdir():
            if sub.is_dir():
                found.update(p.name[:-4] for p in sub.iterdir() if p.name.endswith(".npy"))
        return frozenset(found)

    def save(self, sha: str, features: np.ndarray):
        """Atomically write one image's features (P, C): float16, or float32 where float16 would
        overflow (an encoder with very large activations)."""
        target = self.file(sha)
        target.parent.mkdir(exist_ok=True)
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        with np.errstate(over="ignore"):  # detected just below
            half = features.astype(np.float16)
        overflow = np.isfinite(features).all() and not np.isfinite(half).all()
        with open(tmp, "wb") as f:
            np.save(f, features.astype(np.float32) if overflow else half)
        os.replace(tmp, target)

    def load(self, sha: str) -> np.ndarray:
        return np.load(self.file(sha))

    def build(self, paths: list[str], device, precision: str, batch_size: int = 32, workers: int = 1,
              quiet: bool = False, rank: int = 0, world: int = 1) -> dict[str, str | None]:
        """Make sure every readable image has cached features. Returns path -> sha256 (None when
        the file could not be read; those are left out of training)."""
        from .pipeline import encode, load_batches
        from .progress import progress_bar

        known = self.known()
        mine = paths[rank::world]
        result: dict[str, str | None] = {}
        self.encoder.to(device).eval()
        with progress_bar("images", quiet) as progress:
            task = progress.add_task("Caching features", total=len(mine), status=f"[dim]{self.dir}")
            for items, pixels in load_batches(mine, self.encoder.preprocess, batch_size, workers, skip=known):
                if pixels is not None:
                    feats = encode(self.encoder, pixels, device, precision).cpu().numpy()
                    for it in items:
                        if it.row is not None:
                            self.save(it.sha256, feats[it.row])
                for it in items:
                    result[it.path] = None if it.error else it.sha256
                progress.advance(task, len(items))
        return result
