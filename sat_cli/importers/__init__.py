"""Checkpoints of other Show, Attend and Tell code, converted into sat checkpoints.

``unpickle`` reads pickled PyTorch files without running them; each other module converts one
project's layout (``sgrvinod``: a-PyTorch-Tutorial-to-Image-Captioning)."""

from .sgrvinod import import_sgrvinod

__all__ = ["import_sgrvinod"]
