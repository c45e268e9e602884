"""The trainer's state file (optimizer, scheduler, epoch, step, RNG): written atomically at every
checkpoint, read with ``weights_only`` (tensors and numbers, never code)."""

from __future__ import annotations

import json
from pathlib import Path

KEYS = ("epoch", "step", "best", "best_epoch", "bad_epochs", "fine_tuning", "scst", "train_seconds")


def save_state(path: Path, state: dict, optimizer, scheduler, encoder_optimizer=None):
    import random

    import numpy as np
    import torch

    data = {
        **{k: v for k, v in state.items() if k != "best_metrics"},
        "best_metrics": json.dumps(state.get("best_metrics")),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "encoder_optimizer": encoder_optimizer.state_dict() if encoder_optimizer else None,
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python_rng": json.dumps(random.getstate()),
        "numpy_rng": json.dumps([x.tolist() if hasattr(x, "tolist") else x for x in np.random.get_state()]),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(data, tmp)
    tmp.replace(path)


def read_state(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)  # tensors and numbers only, no code


def restore_rng(saved: dict):
    """Put torch's, CUDA's, Python's and numpy's random generators back where they were."""
    import random

    import numpy as np
    import torch

    torch.set_rng_state(saved["torch_rng"])
    if saved["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda_rng"])
    py = json.loads(saved["python_rng"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    npy = json.loads(saved["numpy_rng"])
    np.random.set_state((npy[0], np.array(npy[1], dtype=np.uint32), *npy[2:]))


def restored_counters(saved: dict) -> dict:
    """The trainer's counters from a state file, for ``Trainer.state``."""
    out = {key: saved.get(key, False) for key in KEYS}
    out["running"] = tuple(saved.get("running", (0.0, 0)))
    out["hard_baseline"] = saved.get("hard_baseline")
    out["best_metrics"] = json.loads(saved["best_metrics"])
    return out
