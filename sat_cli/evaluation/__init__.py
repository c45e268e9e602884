"""Evaluation: caption metrics (``metrics``, ``cider``), caption datasets, the pointing game, ``sat eval``."""
