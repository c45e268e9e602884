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


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep large freed blocks for reuse instead of returning them to the kernel.

    glibc serves blocks above its mmap threshold (at most 32 MB) with mmap and unmaps them on
    free, so a tensor allocated and freed at every decoding step or encoder layer is page-faulted
    in anew each time: with the defaults a third of CPU beam-search time, and half of a 384-px
    Lite0 forward at batch 16, went to the kernel (measured on a 2-core Xeon). With mmap off and
    a 1 GB trim threshold, freed blocks stay in the heap and are reused. Linux with glibc only;
    True when applied. SAT_SYSTEM_MALLOC=1 in the environment leaves malloc as it is.
    """
    import ctypes
    import os
    import sys

    if not sys.platform.startswith("linux") or os.environ.get("SAT_SYSTEM_MALLOC", "") not in ("", "0"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))


def resolve_precision(device, precision: str = "auto", training: bool = False) -> str:
    """auto on CUDA: fp16 for inference (closest to fp32: 10 mantissa bits; the CNN encoders'
    activations fit its range), bf16 for training where supported (no loss scaling needed);
    fp32 elsewhere. On CUDA, fp32 really means fp32: TF32 is switched off."""
    import torch

    if precision == "auto":
        if device.type != "cuda":
            precision = "fp32"
        elif training and torch.cuda.is_bf16_supported():
            precision = "bf16"
        else:
            precision = "fp16"
    if device.type == "cuda" and precision == "fp32":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return precision


def autocast(device, precision: str):
    """Context for the encoder's forward pass (beam search always runs in fp32)."""
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
