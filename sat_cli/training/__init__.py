"""``sat train``: teach the attention decoder to caption, on cached frozen-encoder features (or
with the encoder fine-tuned), validating every epoch by real beam decoding.

Parts: ``config`` (the options and their defaults), ``data`` (caption tensors, length-grouped
batches), ``losses``, ``loop`` (the cross-entropy epoch), ``scst`` (self-critical epochs),
``schedule`` (best epoch, learning-rate decay, early stop), ``state`` (resume), ``trainer``.
"""

from __future__ import annotations

from .config import CONFIG_FILE, METRICS_FILE, STATE, TrainConfig, read_metrics

__all__ = ["TrainConfig", "train", "report", "read_metrics", "CONFIG_FILE", "METRICS_FILE", "STATE"]


def train(cfg: TrainConfig, resume: bool = False, stop=None) -> dict:
    """Run (or with ``resume`` continue) the training that ``cfg`` describes; returns the summary
    (best score and epoch, whether it was stopped). ``stop``: a StopSignal-like object whose
    ``requested`` ends the run cleanly (default: Ctrl-C / SIGTERM)."""
    from .trainer import Trainer

    trainer = Trainer(cfg, resume)
    try:
        trainer.setup()
        return trainer.run(stop)
    finally:
        trainer.close()


def report(cfg: TrainConfig, summary: dict) -> None:
    """The end of `sat train` (stderr, rank 0): the per-epoch table and where the best model is."""
    from ..evaluation.metrics import metrics_table
    from ..progress import console

    rows = read_metrics(cfg.out)
    if rows:
        console.print(metrics_table(rows, title=f"{cfg.out}/metrics.jsonl", width=console.width))
    if summary["stopped"]:
        console.print(f"Stopped. Continue with: sat train --resume {cfg.out}")
    else:
        console.print(f"Best {cfg.metric} {summary['best']:.2f} at epoch {summary['best_epoch']}: {cfg.out}/best")
