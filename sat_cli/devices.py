"""Device and precision choice: --device auto|cpu|cuda|mps, --precision auto|fp32|fp16|bf16."""

from __future__ import annotations

import contextlib

from .errors import SatError

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")


def resolve_device(name: str = "auto"):
    import torch

    name = name.lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SatError("--device cuda: no CUDA GPU is visible to PyTorch (torch.cuda.is_available() is False)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise SatError("--device mps: Apple's Metal backend is not available on this machine")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise SatError(f"Unknown device {name!r}: use one of {', '.join(DEVICES)}") from exc


def resolve_precision(device, precision: str = "auto") -> str:
    """auto: bf16 on a CUDA GPU that supports it, else fp16 on CUDA, fp32 elsewhere."""
    import torch

    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def autocast(device, precision: str):
    """Context for the encoder's forward pass (the decoder always runs in fp32)."""
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
