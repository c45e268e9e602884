"""The schedule: keep the best epoch by the validation metric, decay learning rates when it
stalls (ReduceLROnPlateau), stop early after ``early_stop`` epochs without improvement."""

from __future__ import annotations

import math


def new_state() -> dict:
    return {"epoch": 0, "step": 0, "best": -math.inf, "best_epoch": 0, "bad_epochs": 0, "fine_tuning": False,
            "scst": False, "train_seconds": 0.0, "running": (0.0, 0)}


def plateau(optimizer, cfg):
    import torch

    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=cfg.lr_decay,
                                                      patience=cfg.lr_patience)


def end_epoch(state: dict, scheduler, optimizer, encoder_optimizer, cfg, epoch: int, scores: dict) -> bool:
    """Record a finished epoch's validation ``scores``: step the plateau scheduler (the encoder's
    learning rate follows the decoder's decay), count epochs without improvement. True when the
    epoch is the best so far."""
    score = scores.get(cfg.metric, -math.inf)
    improved = score > state["best"]
    lr = optimizer.param_groups[0]["lr"]
    scheduler.step(score)
    if encoder_optimizer and optimizer.param_groups[0]["lr"] < lr:
        for g in encoder_optimizer.param_groups:
            g["lr"] *= cfg.lr_decay
    state.update(epoch=epoch + 1, step=0)
    if improved:
        state.update(best=score, best_epoch=epoch + 1, bad_epochs=0, best_metrics=scores)
    else:
        state["bad_epochs"] += 1
    return improved


def should_stop(state: dict, cfg) -> bool:
    return state["bad_epochs"] >= cfg.early_stop
